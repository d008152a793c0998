"""CUDA-graph TTT steps (train/graphs.py): bucketed static-shape steps equal the eager steps.

CPU lane: ``StepGraphs(capture=False)`` runs the staged, bucketed body eagerly -- padding of rows, window
positions and score slots, the spare adapter rows of padding rows, the per-row optimizer, the ledger -- and
must score like the eager schedules. GPU lane: the captured graphs' replays against the eager steps.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from train.adapters import DocLoRA
from train.eval_fixtures import doc_stream, tiny_model
from train.graphs import StepGraphs
from train.rows import build_rows, plan_doc_batches, split_docs
from train.schedules import ttt_batch, ttt_rolling
from train.scoring import make_state
from train.bpb import ByteLUT
from train.ttt_config import TTTConfig
from train.ttt_optim import BatchedAdam, optimizer_for

pytestmark = pytest.mark.usefixtures("one_thread")

LENGTHS = [300, 50, 197, 1, 129, 64, 260, 5, 77, 140, 33]  # a 1-token doc, partial chunks, > window
CFG = TTTConfig(rank=4, chunk=32, window=96, batch_size=6, lr=0.01)


def _lut(V):
    return ByteLUT(torch.ones(V, dtype=torch.int16), torch.zeros(V, dtype=torch.bool), torch.zeros(V, dtype=torch.bool))


def _run(model, stream, cfg, schedule, graphs_mode, device="cpu", plan=None, lazy=False, cls=StepGraphs):
    """Score ``stream`` with per-document TTT; graphs_mode None (eager), False (bucketed eager), True (captured);
    ``plan(graphs, batches_ns)``: the keys to prepare (default all); ``lazy``: each captured at its first step
    (True), or the first one at its step and the rest right after it ("rest"), or at its first step with that step as
    the warm step ("real": ``warm_real``); ``cls``: the StepGraphs class."""
    lut = _lut(model.config.vocab_size)
    starts, ns = split_docs(stream.cpu())
    st = make_state(stream, lut, keep_nll=True)
    ad = DocLoRA(model, cfg, cfg.batch_size, stream.device, "bmm")
    opt = optimizer_for(ad.params, cfg, per_row=True)
    graphs = None
    batches = plan_doc_batches(ns, cfg.batch_size)
    if graphs_mode is not None:
        graphs = cls(model, ad, opt, cfg, st, capture=graphs_mode, lazy=bool(lazy), warm_real=lazy == "real")
        if lazy == "rest":  # the first step's graph at that step, the rest of the plan right after it (overlap's order)
            graphs.on_first_replay = graphs.capture_planned
        graphs.prepare(keys=plan(graphs, [ns[b] for b in batches]) if plan else None)
    if schedule == "batch":
        for i, docs in enumerate(batches):
            ttt_batch(model, stream, starts, ns, docs, cfg, ad, opt, st, i, graphs=graphs)
    else:
        it = iter(batches)
        ttt_rolling(model, stream, starts, ns, lambda: next(it, None), cfg, ad, opt, st, graphs=graphs)
    return st, graphs


# the records' options on every target: LoRA scale, AdamW with beta1 = 0 and decoupled decay, warm-start A
RECORDS_LIKE = TTTConfig(rank=8, chunk=32, window=96, batch_size=6, lr=1e-3, alpha=12.0,
                         targets=("q", "k", "v", "o", "mlp", "up", "down", "head"), optimizer="adamw", beta1=0.0,
                         beta2=0.999, eps=1e-10, weight_decay=1.0, warm_start_a=True)


@pytest.mark.parametrize("schedule,cfg", [("batch", CFG), ("rolling", CFG), ("rolling", RECORDS_LIKE)])
def test_bucketed_steps_score_like_eager(schedule, cfg):
    """Same targets scored once, same NLL per target (fp32: padding changes only GEMM shapes), same ledger
    counters; the buckets met cover rows 2..6 and several window lengths."""
    torch.manual_seed(0)
    model = tiny_model(seed=3)
    stream = doc_stream(LENGTHS, seed=5)
    eager, _ = _run(model, stream, cfg, schedule, None)
    bucketed, graphs = _run(model, stream, cfg, schedule, False)
    assert torch.equal(eager.ledger.count, bucketed.ledger.count)
    m = eager.ledger.count[:-1] > 0
    assert int(m.sum()) == sum(n for n in LENGTHS)
    torch.testing.assert_close(bucketed.ledger.nll[:-1][m], eager.ledger.nll[:-1][m], rtol=2e-5, atol=2e-5)
    assert eager.ledger.check()["double_scored"] == 0 and bucketed.ledger.check()["trained_unscored"] == 0
    assert (eager.ledger.n_records, eager.ledger.n_train_checks) == (bucketed.ledger.n_records,
                                                                     bucketed.ledger.n_train_checks)
    assert eager.steps == bucketed.steps
    assert len(graphs.buffers) == len(graphs.keys()) and graphs.r_buckets == [2, 4, 6]
    assert graphs.l_buckets == [32, 64, 96]
    use = graphs.usage()
    assert use["graph_steps"] == bucketed.steps and 0.3 < use["graph_fill"] <= 1.0


def test_per_row_adam_equals_batch_adam_when_rows_start_together():
    """The graphs need the per-row optimizer (device step count); in the batch schedule every row starts
    together, so it must take the batch-wide optimizer's steps."""
    torch.manual_seed(1)
    ps = [torch.randn(4, 3, 5) for _ in range(2)]
    qs = [p.clone() for p in ps]
    a, b = BatchedAdam(ps, 0.01), BatchedAdam(qs, 0.01, per_row=True)
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        for p, q in zip(ps, qs):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_bucket_choice_and_padding_rows():
    model = tiny_model(seed=3)
    stream = doc_stream(LENGTHS, seed=5)
    st = make_state(stream, _lut(model.config.vocab_size))
    ad = DocLoRA(model, CFG, CFG.batch_size, "cpu", "bmm")
    g = StepGraphs(model, ad, optimizer_for(ad.params, CFG, per_row=True), CFG, st, capture=False)
    assert g.bucket(1, 1) == (2, 32) and g.bucket(3, 33) == (4, 64) and g.bucket(6, 96) == (6, 96)
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        g.bucket(7, 10)
    starts, ns = split_docs(stream)
    rows = np.array([[starts[0], 0, 32], [starts[2], 32, 64], [starts[4], 0, 17]])
    rb = g.stage(stream, rows, np.array([3, 0, 5]), np.array([True, False, True]))
    buf = g.buffers[(4, 64)]
    assert rb.x.shape == (4, 64) and buf.rb.mask.shape == (4, 32)
    assert buf.rows.tolist()[:3] == [3, 0, 5] and buf.rows[3].item() not in (3, 0, 5)  # a spare adapter row
    assert buf.train.tolist() == [True, False, True, False] and not buf.rb.mask[3].any()
    assert torch.equal(buf.rb.y, rb.y) and torch.equal(buf.rb.pos, rb.pos)


def test_refusals():
    model = tiny_model(seed=3)
    stream = doc_stream(LENGTHS, seed=5)
    lut = _lut(model.config.vocab_size)
    ad = DocLoRA(model, CFG, CFG.batch_size, "cpu", "bmm")
    st = make_state(stream, lut)
    with pytest.raises(ValueError, match="per-row optimizer"):
        StepGraphs(model, ad, BatchedAdam(ad.params, 0.01), CFG, st, capture=False)
    with pytest.raises(ValueError, match="non-strict ledger"):
        StepGraphs(model, ad, optimizer_for(ad.params, CFG, per_row=True), CFG, make_state(stream, lut, strict=True),
                   capture=False)
    with pytest.raises(ValueError, match="CUDA device"):
        StepGraphs(model, ad, optimizer_for(ad.params, CFG, per_row=True), CFG, st, capture=True)
    g = StepGraphs(model, ad, optimizer_for(ad.params, CFG, per_row=True), CFG, st, capture=False)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="warm_steps = "):
            g.prepare(warm_steps=bad)
    from train.eval import evaluate

    graphed = TTTConfig(cuda_graphs=True, rank=4, chunk=32, window=96, batch_size=6)
    with pytest.raises(ValueError, match="expected mode 'ttt'"):
        evaluate(model, stream, lut, mode="base", cfg=graphed)
    with pytest.raises(ValueError, match="expected strict=False and no train_hook"):
        evaluate(model, stream, lut, mode="ttt", cfg=graphed, strict=True)
    starts, _ = split_docs(stream)
    with pytest.raises(ValueError, match="shape = "):
        build_rows(stream, np.array([[starts[0], 0, 64]]), 96, shape=(2, 32, 32))


@pytest.mark.gpu
@pytest.mark.parametrize("schedule", ["batch", "rolling"])
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("rank", [8, 96])
def test_gpu_graph_replay_equals_eager(schedule, compiled, rank):
    """Captured steps (every bucket, both kinds) against eager steps on the GPU, fp32 weights, the seeds' rank
    and the records' (on every target): same targets, NLL within fp32 noise of the bucketed shapes, same
    ledger counters."""
    import dataclasses

    from train.forward import compile_rows_nll
    from train.ttt_config import TARGETS

    cfg = CFG if rank == 8 else dataclasses.replace(CFG, rank=rank, targets=TARGETS, alpha=144.0)
    cfg = dataclasses.replace(cfg, rank=rank)
    torch.manual_seed(0)
    model = tiny_model(seed=3).cuda()
    if compiled:
        compile_rows_nll(model)
    try:
        stream = doc_stream(LENGTHS, seed=5).cuda()
        eager, _ = _run(model, stream, cfg, schedule, None)
        graphed, graphs = _run(model, stream, cfg, schedule, True)
    finally:
        if compiled:
            compile_rows_nll(model, enable=False)
    assert graphs.stats["graphs"] == 2 * len(graphs.keys())
    assert torch.equal(eager.ledger.count, graphed.ledger.count)
    m = eager.ledger.count[:-1] > 0
    torch.testing.assert_close(graphed.ledger.nll[:-1][m], eager.ledger.nll[:-1][m], rtol=1e-4, atol=1e-4)
    assert graphed.ledger.check()["trained_unscored"] == 0
    assert (eager.ledger.n_records, eager.ledger.n_train_checks) == (graphed.ledger.n_records,
                                                                     graphed.ledger.n_train_checks)


class _RecordingSteps(StepGraphs):
    """StepGraphs whose capture, on the CPU, records the step instead of a CUDA graph: a "replay" runs the step body on
    the bucket's buffers and then takes back the host counters the body moved (a CUDA graph's replay runs no host
    code). What it checks is the lazy capture's bookkeeping: which step warms a bucket, which steps replay, that no
    step runs twice or not at all."""

    def __init__(self, *args, capture=None, **kw):
        super().__init__(*args, capture=False, **kw)
        self.capture = True  # after the constructor's check for a CUDA device
        self.replays = 0

    def _on_side(self):
        import contextlib

        return contextlib.nullcontext()

    def _record(self, k):
        from train.schedules import _step_body

        R, L, do_train = k
        buf, owner = self.buffers[(R, L)], self

        class Recorded:
            def replay(self):
                led, t = owner.st.ledger, owner.opt.t
                n = (led.n_records, led.n_train_checks)
                _step_body(owner.model, buf.rb, buf.rows, buf.train, do_train, owner.cfg, owner.adapter, owner.opt,
                           owner.st)
                (led.n_records, led.n_train_checks), owner.opt.t = n, t
                owner.replays += 1

        self.graphs[k] = Recorded()
        self.stats["graphs"] = len(self.graphs)


@pytest.mark.parametrize("schedule,cfg", [("batch", CFG), ("rolling", CFG), ("batch", RECORDS_LIKE),
                                          ("rolling", RECORDS_LIKE)])
def test_first_use_capture_runs_each_buckets_first_step_as_its_warm_step(schedule, cfg):
    """warm_real (``--graph-capture first-use``), bookkeeping on the CPU: each (bucket, kind) is captured at its first
    step, which runs once without a graph and is not replayed; every later step replays; no synthetic warm step; scores,
    ledger counters and adapters bitwise as the same bucketed steps run eagerly (AdamW, warm-start A included)."""
    torch.manual_seed(0)
    model = tiny_model(seed=3)
    stream = doc_stream(LENGTHS, seed=5)
    eager, g0 = _run(model, stream, cfg, schedule, False)
    real, g1 = _run(model, stream, cfg, schedule, True, lazy="real", cls=_RecordingSteps)
    assert g1.lazy and g1.warm_real and set(g1.used) == set(g1.graphs) and g1.eager_steps == 0
    assert g1.stats["graph_real_warm_steps"] == len(g1.graphs) > 1 and g1.stats["graph_warm_steps"] == 0
    assert g1.replays + len(g1.graphs) == sum(g1.used.values()) == g1.steps == g0.steps
    assert torch.equal(eager.ledger.count, real.ledger.count) and eager.ledger.count[:-1].max() == 1
    torch.testing.assert_close(real.ledger.nll, eager.ledger.nll, rtol=0, atol=0, equal_nan=True)
    assert (eager.ledger.n_records, eager.ledger.n_train_checks) == (real.ledger.n_records, real.ledger.n_train_checks)
    for a, b in zip(g0.adapter.params, g1.adapter.params):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="warm_real=True needs lazy=True"):
        StepGraphs(model, g0.adapter, g0.opt, cfg, eager, capture=False, warm_real=True)


@pytest.mark.parametrize("schedule,cfg", [("batch", CFG), ("batch", RECORDS_LIKE), ("rolling", RECORDS_LIKE)])
def test_prepared_graphs_leave_the_adapters_as_eager(schedule, cfg):
    """Graphs prepared up front (synthetic warm steps on every bucket before the first document; recorded on the CPU
    instead of captured) score bitwise as the same bucketed steps run eagerly, warm-start A included: the warm steps
    trained A, and A is drawn again as it was before them. Before this, the next reset drew warm-start A from the
    first batch's document ids instead of the constructor's, and the kernel path's replay tests on an H100 differed
    from eager by 4.8e-5 / 1.2e-4 relative BPB at rank 8 / 96 (logs/gpu-tests-fused-mlp-kernel-graphs-h100.txt)."""
    torch.manual_seed(0)
    model = tiny_model(seed=3)
    stream = doc_stream(LENGTHS, seed=5)
    eager, g0 = _run(model, stream, cfg, schedule, False)
    rec, g1 = _run(model, stream, cfg, schedule, True, cls=_RecordingSteps)
    assert g1.stats["graph_warm_steps"] > 0 and g1.replays == g1.steps == g0.steps
    assert torch.equal(eager.ledger.count, rec.ledger.count)
    torch.testing.assert_close(rec.ledger.nll, eager.ledger.nll, rtol=0, atol=0, equal_nan=True)
    for a, b in zip(g0.adapter.params, g1.adapter.params):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("lazy", [True, "rest", "real"])
@pytest.mark.parametrize("schedule,cfg", [("batch", CFG), ("rolling", CFG), ("batch", RECORDS_LIKE),
                                          ("rolling", RECORDS_LIKE)])
def test_gpu_lazy_capture_equals_prepared_graphs(schedule, cfg, lazy):
    """Lazy graphs (each bucket warmed on synthetic tokens and captured at its first step, mid-batch, with live
    adapter rows) score as the same bucketed steps run eagerly: the warm steps' updates of the adapters and the
    optimizer rows are undone (AdamW with decay and warm-start A included); no step eager; and bitwise as the graphs
    prepared up front (which draw warm-start A again as it was before their synthetic warm steps)."""
    torch.manual_seed(0)
    model = tiny_model(seed=3).cuda()
    stream = doc_stream(LENGTHS, seed=5).cuda()
    plan = lambda graphs, batches_ns: graphs.plan(batches_ns) if schedule == "batch" else None  # noqa: E731
    eager, _ = _run(model, stream, cfg, schedule, False)
    mode = lazy
    lazy, g1 = _run(model, stream, cfg, schedule, True, plan=plan, lazy=mode)
    assert g1.stats["lazy"] and g1.eager_steps == 0 and set(g1.used) <= set(g1.graphs)
    if mode == "real":  # each bucket's first step ran without a graph, as its warm step
        assert g1.stats["graph_real_warm_steps"] == len(g1.graphs) and g1.stats["graph_warm_steps"] == 0
    if mode == "rest":
        assert len(g1.graphs) == (len(g1.planned) if g1.planned is not None else 2 * len(g1.keys()))
    assert torch.equal(eager.ledger.count, lazy.ledger.count)
    m = eager.ledger.count[:-1] > 0
    torch.testing.assert_close(lazy.ledger.nll[:-1][m], eager.ledger.nll[:-1][m], rtol=1e-4, atol=1e-4)
    assert (eager.ledger.n_records, eager.ledger.n_train_checks) == (lazy.ledger.n_records, lazy.ledger.n_train_checks)
    if mode != "real":  # (real: a bucket's first step runs without its graph)
        up_front, g0 = _run(model, stream, cfg, schedule, True, plan=plan)
        assert set(g1.graphs) <= set(g0.graphs)
        torch.testing.assert_close(lazy.ledger.nll, up_front.ledger.nll, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("cfg", [CFG, RECORDS_LIKE, TTTConfig(rank=2, chunk=16, window=112, batch_size=4)])
def test_plan_predicts_the_batch_schedules_buckets(cfg):
    """StepGraphs.plan from the batches' target counts == the (bucket, kind) pairs the batch schedule stages."""
    torch.manual_seed(0)
    stream = doc_stream(LENGTHS, seed=5)
    _, ns = split_docs(stream)
    _, graphs = _run(tiny_model(seed=3), stream, cfg, "batch", False)
    planned = graphs.plan([ns[b] for b in plan_doc_batches(ns, cfg.batch_size)])
    assert set(graphs.used) == set(planned) and len(planned) < 2 * len(graphs.keys())
    assert sum(graphs.used.values()) == graphs.steps and graphs.eager_steps == 0  # not captured: not counted


@pytest.mark.parametrize("cfg", [CFG, RECORDS_LIKE, TTTConfig(rank=2, chunk=16, window=112, batch_size=4)])
def test_plan_rolling_predicts_the_rolling_schedules_buckets(cfg):
    """StepGraphs.plan_rolling from the claim order == the (bucket, kind) pairs the rolling schedule stages, and
    fewer than all (else planning would buy nothing)."""
    torch.manual_seed(0)
    stream = doc_stream(LENGTHS, seed=5)
    _, ns = split_docs(stream)
    _, graphs = _run(tiny_model(seed=3), stream, cfg, "rolling", False)
    planned = graphs.plan_rolling(ns, [plan_doc_batches(ns, cfg.batch_size)])
    assert set(graphs.used) == set(planned) and len(planned) < 2 * len(graphs.keys())
    # another claim order meets other buckets: the plan follows the order, not only the lengths
    order = plan_doc_batches(ns, cfg.batch_size)[::-1]
    assert graphs.plan_rolling(ns, [order]) != planned or len(order) == 1


@pytest.mark.parametrize("share", [None, (1, 2)])
def test_eval_rolling_captures_only_the_planned_graphs(share):
    """evaluate() with the rolling schedule in one process (all batches, or a static share; phased): the graphs
    prepared are the plan's, every step replays one of them (none runs eagerly), same BPB as without graphs."""
    import dataclasses

    from train.eval import evaluate

    torch.manual_seed(0)
    stream = doc_stream(LENGTHS, seed=5)
    lut = _lut(tiny_model(seed=3).config.vocab_size)
    cfg = dataclasses.replace(RECORDS_LIKE, batch_size=4, schedule="rolling", phases=2, phase_docs=4,
                              global_seq_len=64, global_batch_seqs=2, global_chunk_tokens=128)
    ref = evaluate(tiny_model(seed=3), stream, lut, mode="ttt", cfg=cfg, backend="bmm", share=share)
    logs = []
    rep = evaluate(tiny_model(seed=3), stream, lut, mode="ttt",
                   cfg=dataclasses.replace(cfg, cuda_graphs=True, graph_min_steps=1), backend="bmm", share=share,
                   log=logs.append)
    cg = rep["cuda_graphs"]
    assert cg["graph_steps"] == rep["steps"] > 0
    # a plan, smaller than all 2 x buckets, that every step of every phase's queue fell into
    from train.graphs import graph_buckets

    rb, lb = graph_buckets(cfg.batch_size, cfg.window, cfg.chunk)
    assert isinstance(cg["graphs_planned"], int) and cg["buckets_used"] <= cg["graphs_planned"] < 2 * len(rb) * len(lb)
    assert cg["unplanned_steps"] == 0 and cg["rare_graphs"] == cg["rare_steps"] == 0
    assert rep["targets"] == ref["targets"] and rep["legality"] == ref["legality"]
    assert abs(rep["val_bpb"] - ref["val_bpb"]) < 1e-5 * ref["val_bpb"], (rep["val_bpb"], ref["val_bpb"])
    # the default leaves out the graphs met in fewer than 3 steps: their steps run without one, same scores
    rep3 = evaluate(tiny_model(seed=3), stream, lut, mode="ttt", cfg=dataclasses.replace(cfg, cuda_graphs=True),
                    backend="bmm", share=share)
    c3 = rep3["cuda_graphs"]
    assert c3["graphs_planned"] + c3["rare_graphs"] == cg["graphs_planned"] and c3["rare_graphs"] > 0
    assert c3["rare_steps"] > 0 and c3["unplanned_steps"] == 0  # (on a GPU they are also graph_eager_steps)
    assert rep3["val_bpb"] == rep["val_bpb"] and rep3["legality"] == rep["legality"]
    # the first-score line, once, when the first step's scores are in (a bench reads it from a stopped run)
    first = [line for line in logs if line.startswith("[eval] first score ")]
    assert len(first) == 1 and "after process start" in first[0], first


@pytest.mark.parametrize("phases", [0, 2])
def test_eval_batch_share_plans_only_its_own_batches(phases):
    """evaluate() with the batch schedule on a static share in one process plans the graphs of the share's own
    batches: every planned (bucket, kind) is used (none prepared for the other shares' batches, which the records'
    1/8 share did: 119 planned, 64 used), no step runs outside the plan, same BPB as without graphs."""
    import dataclasses

    from train.eval import evaluate

    torch.manual_seed(0)
    stream = doc_stream(LENGTHS, seed=5)
    lut = _lut(tiny_model(seed=3).config.vocab_size)
    cfg = dataclasses.replace(RECORDS_LIKE, batch_size=2, phases=phases, phase_docs=4, global_seq_len=64,
                              global_batch_seqs=2, global_chunk_tokens=128)
    for share in ((0, 2), (1, 2)):
        ref = evaluate(tiny_model(seed=3), stream, lut, mode="ttt", cfg=cfg, backend="bmm", share=share)
        rep = evaluate(tiny_model(seed=3), stream, lut, mode="ttt",
                       cfg=dataclasses.replace(cfg, cuda_graphs=True, graph_min_steps=1), backend="bmm", share=share)
        cg = rep["cuda_graphs"]
        assert cg["graph_steps"] == rep["steps"] > 0 and cg["unplanned_steps"] == 0
        assert cg["graphs_planned"] == cg["buckets_used"], (share, cg)
        assert rep["targets"] == ref["targets"] and rep["legality"] == ref["legality"]
        assert abs(rep["val_bpb"] - ref["val_bpb"]) < 1e-5 * ref["val_bpb"], (rep["val_bpb"], ref["val_bpb"])


def test_batch_steps_refuse_bad_arguments():
    from train.rows import batch_steps

    for chunk in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="batch_steps: chunk"):
            list(batch_steps(np.array([5, 3]), chunk))
    for n in (np.array([[5, 3]]), np.array([5.0, 3.0]), np.array([5, -1])):
        with pytest.raises(ValueError, match="batch_steps: n must be a 1-D array"):
            list(batch_steps(n, 4))
    assert list(batch_steps(np.zeros(0, dtype=np.int64), 4)) == []


def test_prepare_refuses_keys_that_are_not_buckets():
    torch.manual_seed(0)
    stream = doc_stream(LENGTHS, seed=5)
    model = tiny_model(seed=3)
    st = make_state(stream, _lut(model.config.vocab_size), keep_nll=True)
    ad = DocLoRA(model, CFG, CFG.batch_size, stream.device, "bmm")
    graphs = StepGraphs(model, ad, optimizer_for(ad.params, CFG, per_row=True), CFG, st, capture=False)
    with pytest.raises(ValueError, match=r"keys \[\(3, 96, True\)\] are not buckets"):
        graphs.prepare(keys=[(2, 96, True), (3, 96, True)])


@pytest.mark.gpu
@pytest.mark.parametrize("drop", [False, True, "rare"])
def test_gpu_planned_graphs_equal_eager(drop):
    """Only the batch plan's graphs captured: no step runs eagerly and the scores equal the eager eval; with the
    plan's most used graph left out, or the graphs met in fewer than 3 steps (``graph_min_steps``), their steps run
    eagerly (counted) and the scores are still equal."""
    torch.manual_seed(0)
    model = tiny_model(seed=3).cuda()
    stream = doc_stream(LENGTHS, seed=5).cuda()
    eager, _ = _run(model, stream, CFG, "batch", None)
    state = {}

    def plan(graphs, batches_ns):
        keys = state["keys"] = graphs.plan(batches_ns, min_steps=3 if drop == "rare" else 1)
        if drop == "rare":
            assert graphs.rare and all(n < 3 for n in graphs.rare.values())
        elif drop:  # the (R_b, L_b, trains) the staged steps use most, from a bucketed dry run
            _, dry = _run(model, stream, CFG, "batch", False)
            state["dropped"] = max(dry.used, key=dry.used.get)
            keys = state["keys"] = [k for k in keys if k != state["dropped"]]
        return keys

    graphed, graphs = _run(model, stream, CFG, "batch", True, plan=plan)
    planned = set(state["keys"])
    assert set(graphs.graphs) == planned and graphs.stats["graphs"] == len(planned)
    if drop == "rare":
        assert set(graphs.used) == planned | set(graphs.rare)
        assert graphs.eager_steps == sum(graphs.rare.values()) == graphs.usage()["rare_steps"] > 0
    else:
        assert set(graphs.used) == planned | ({state["dropped"]} if drop else set())
        assert graphs.eager_steps == (graphs.used[state["dropped"]] if drop else 0)
    assert torch.equal(eager.ledger.count, graphed.ledger.count)
    m = eager.ledger.count[:-1] > 0
    torch.testing.assert_close(graphed.ledger.nll[:-1][m], eager.ledger.nll[:-1][m], rtol=1e-4, atol=1e-4)


def _phased_model(int6: bool):
    m = tiny_model(seed=3)
    if int6:
        from pgolf_kernels.int6_linear import convert_linears_to_int6

        convert_linears_to_int6(m)
    return m


def _recaptures_expected(rep, cfg, int6: bool) -> None:
    """A global pass that trains dense weights in place keeps the captured steps (same storage); the first pass on
    an int6 model swaps its layers for dense ones, so the steps are staged again once."""
    cg = rep["cuda_graphs"]
    assert len(rep["phases"]) == cfg.phases
    assert len(cg.get("recaptures", [])) == (1 if int6 else 0), cg.get("recaptures")
    assert cg.get("kept_after_pass", 0) == cfg.phases - (1 if int6 else 0)


@pytest.mark.parametrize("int6", [False, True])
def test_eval_with_graphs_on_cpu_runs_bucketed_steps_and_equals_eager(int6, monkeypatch):
    """evaluate() with cuda_graphs on a CPU device: the bucketed steps, eagerly (reported as not captured), the
    phased recipe included (steps staged again only when a global pass replaced the tensors they read): same
    targets and BPB as without."""
    import dataclasses

    from train.eval import evaluate

    import train.eval as ev

    if int6:  # the int6 layers as torch ops: this checks when the steps are staged again, not the int6 kernels
        from conftest import torch_references

        torch_references(monkeypatch)  # (tests/test_int6_linear.py; interpreted here: 217 s)
    # staging again after a pass: the replaced steps' buffers (on a GPU their graphs and pool) are released first
    made, real_prepare = [], ev.StepGraphs.prepare

    def prepare(self, *a, **k):
        assert all(not g.buffers and not g.graphs for g in made), "the replaced steps still held their buffers"
        made.append(self)
        return real_prepare(self, *a, **k)

    monkeypatch.setattr(ev.StepGraphs, "prepare", prepare)
    torch.manual_seed(0)
    stream = doc_stream(LENGTHS, seed=5)
    lut = _lut(tiny_model(seed=3).config.vocab_size)
    phased = dataclasses.replace(RECORDS_LIKE, phases=2, phase_docs=4, global_seq_len=64, global_batch_seqs=2,
                                 global_chunk_tokens=128)
    for cfg in ((CFG, phased) if not int6 else (phased,)):
        ref = evaluate(_phased_model(int6), stream, lut, mode="ttt", cfg=cfg, backend="bmm")
        rep = evaluate(_phased_model(int6), stream, lut, mode="ttt", cfg=dataclasses.replace(cfg, cuda_graphs=True),
                       backend="bmm")
        # every TTT step went through the buckets (counted across any re-staging after a global pass)
        assert rep["cuda_graphs"]["captured"] is False and rep["cuda_graphs"]["graph_steps"] == rep["steps"] > 0
        assert rep["targets"] == ref["targets"] and rep["legality"] == ref["legality"]
        assert abs(rep["val_bpb"] - ref["val_bpb"]) < 1e-5 * ref["val_bpb"], (rep["val_bpb"], ref["val_bpb"])
        if cfg.phases:
            _recaptures_expected(rep, cfg, int6)
        assert len(made) == 1 + (1 if int6 else 0)
        made.clear()


@pytest.mark.gpu
@pytest.mark.parametrize("int6", [False, True])
def test_gpu_phased_eval_with_graphs_equals_eager(int6):
    """The phased records-like recipe through evaluate() on the GPU: captured steps, replayed on the base weights
    each global pass moved in place (dense), or captured again once after the first pass swapped the int6 layers
    for dense ones, against the eager eval (fp32 weights)."""
    import dataclasses

    from train.eval import evaluate

    torch.manual_seed(0)
    stream = doc_stream(LENGTHS, seed=5).cuda()
    lut = _lut(tiny_model(seed=3).config.vocab_size)
    cfg = dataclasses.replace(RECORDS_LIKE, phases=2, phase_docs=4, global_seq_len=64, global_batch_seqs=2,
                              global_chunk_tokens=128)
    ref = evaluate(_phased_model(int6).cuda(), stream, lut, mode="ttt", cfg=cfg, backend="bmm")
    rep = evaluate(_phased_model(int6).cuda(), stream, lut, mode="ttt", cfg=dataclasses.replace(cfg, cuda_graphs=True),
                   backend="bmm")
    cg = rep["cuda_graphs"]
    assert cg["captured"] and cg["graphs"] > 0
    _recaptures_expected(rep, cfg, int6)
    assert cg["graph_steps"] == rep["steps"] and rep["targets"] == ref["targets"]
    assert rep["legality"] == ref["legality"]
    assert abs(rep["val_bpb"] - ref["val_bpb"]) < 1e-4 * ref["val_bpb"], (rep["val_bpb"], ref["val_bpb"])


@pytest.mark.gpu
# fp32, so that replay against eager is a check to 1e-4 and not a bf16 noise bound (replay pads steps to bucket shapes,
# whose GEMMs round differently, and AdamW at eps 1e-10 amplifies last-bit differences). The 4.8e-5 (rank 8) and
# 1.2e-4 (rank 96) relative BPB once measured here in bf16 (H100) were warm-start A drawn again after the graphs'
# synthetic warm steps, not rounding (test_prepared_graphs_leave_the_adapters_as_eager)
@pytest.mark.parametrize("rank,int6,phases", [(8, False, 0), (96, False, 0), (8, True, 2), (96, True, 0)],
                         ids=["r8", "r96", "r8-int6-phased", "r96-int6"])
def test_gpu_kernel_path_eval_with_graphs_equals_eager(rank, int6, phases):
    """The kernel path (fused and merged-weight multi-LoRA on q, k, v and the head, int6 codes) through evaluate()
    with its TTT steps captured as CUDA graphs, against the same eval run eagerly: same targets and ledger, BPB
    within 1e-4. What ``--cuda-graphs auto`` waits for before it turns graphs on for the kernel path."""
    import dataclasses

    from train.eval import evaluate

    torch.manual_seed(0)
    stream = doc_stream(LENGTHS, seed=5).cuda()
    lut = _lut(tiny_model(seed=3).config.vocab_size)
    cfg = dataclasses.replace(RECORDS_LIKE, rank=rank, alpha=1.5 * rank, phases=phases, phase_docs=4,
                              global_seq_len=64, global_batch_seqs=2, global_chunk_tokens=128)
    ref = evaluate(_phased_model(int6).cuda(), stream, lut, mode="ttt", cfg=cfg, backend="kernel")
    rep = evaluate(_phased_model(int6).cuda(), stream, lut, mode="ttt",
                   cfg=dataclasses.replace(cfg, cuda_graphs=True, graph_min_steps=1), backend="kernel")
    assert rep["lora_backend"] == ref["lora_backend"] == "kernel"
    cg = rep["cuda_graphs"]
    assert cg["captured"] and cg["graphs"] > 0 and cg["graph_steps"] == rep["steps"] and cg["graph_eager_steps"] == 0
    assert 0 < cg["reserved_gib"] and 0 <= cg["graph_reserved_gib"] <= cg["reserved_gib"]  # the memory it reports
    if phases:
        _recaptures_expected(rep, cfg, int6)
    assert rep["targets"] == ref["targets"] and rep["legality"] == ref["legality"]
    assert abs(rep["val_bpb"] - ref["val_bpb"]) < 1e-4 * ref["val_bpb"], (rep["val_bpb"], ref["val_bpb"])


@pytest.mark.gpu
@pytest.mark.parametrize("rank", [8, 96])
def test_gpu_kernel_path_replay_equals_its_bucketed_steps_run_eagerly_in_bf16(rank, monkeypatch):
    """The replay itself in the records' dtype: evaluate() on the kernel path in bf16 with its steps captured, against
    the same bucketed steps (the same padded shapes, so the same GEMM tilings) run eagerly (``StepGraphs(capture=
    False)``): BPB within 1e-5, a bound rounding at other shapes cannot hide a replay bug behind. It failed at 4.8e-5 /
    1.2e-4 relative (rank 8 / 96) while the preparation drew warm-start A again from other document ids, and passes
    since (H100, logs/gpu-tests-kernel-graphs-redraw-h100.txt)."""
    import dataclasses
    import functools

    import train.eval as ev

    torch.manual_seed(0)
    stream = doc_stream(LENGTHS, seed=5).cuda()
    lut = _lut(tiny_model(seed=3).config.vocab_size)
    cfg = dataclasses.replace(RECORDS_LIKE, rank=rank, alpha=1.5 * rank, cuda_graphs=True, graph_min_steps=1)
    rep = ev.evaluate(tiny_model(seed=3).to(torch.bfloat16).cuda(), stream, lut, mode="ttt", cfg=cfg, backend="kernel")
    monkeypatch.setattr(ev, "StepGraphs", functools.partial(ev.StepGraphs, capture=False))
    ref = ev.evaluate(tiny_model(seed=3).to(torch.bfloat16).cuda(), stream, lut, mode="ttt", cfg=cfg, backend="kernel")
    assert rep["cuda_graphs"]["captured"] and not ref["cuda_graphs"]["captured"]
    assert rep["targets"] == ref["targets"] and rep["legality"] == ref["legality"]
    assert abs(rep["val_bpb"] - ref["val_bpb"]) < 1e-5 * ref["val_bpb"], (rep["val_bpb"], ref["val_bpb"])


@pytest.mark.parametrize("compiling,first,most,calls", [
    (0, 1, 3, 1),   # nothing compiles: one call settles the bucket
    (1, 1, 3, 2),   # the first call compiled: one more, which compiled nothing
    (2, 1, 3, 3),   # two calls compiled: a third
    (5, 1, 3, 3),   # still compiling: stop at the cap (the capture then fails loudly, as before)
    (0, 2, 2, 2),   # a fixed count: exactly that many
])
def test_warm_until_settled(compiling, first, most, calls):
    from train.graphs import warm_until_settled

    made = []
    frames = [0]

    def step():
        made.append(1)
        if len(made) <= compiling:
            frames[0] += 1

    assert warm_until_settled(step, lambda: frames[0], first, most) == calls == len(made)


def test_warm_until_settled_refuses_bad_counts():
    from train.graphs import warm_until_settled

    for first, most in ((0, 3), (4, 3), (True, 3)):
        with pytest.raises(ValueError, match="warm_until_settled: first = "):
            warm_until_settled(lambda: None, lambda: 0, first, most)
    with pytest.raises(TypeError, match="warm_until_settled: step and compiles must be callables"):
        warm_until_settled(None, lambda: 0)


def _overlap_eval(cfg, device, compile_, child=None):
    """evaluate() with --overlap-compile's hand-over: the warm-up of ``train.warmup`` in the background thread. The
    thread starts after the first step; here the first batch boundary after that waits for it (``ready()`` joins),
    so the hand-over happens at batch 1 on every run instead of whenever the thread happens to finish."""
    import dataclasses

    from train.eval import evaluate
    from train.overlap import BackgroundCompile, ProcessCompile
    from train.warmup import warmup

    stream = doc_stream(LENGTHS, seed=5).to(device)
    lut = _lut(tiny_model(seed=3).config.vocab_size)
    gcfg = dataclasses.replace(cfg, cuda_graphs=True)
    ref = evaluate(tiny_model(seed=3).to(device), stream, lut, mode="ttt", cfg=gcfg, backend="bmm")
    model = tiny_model(seed=3).to(device)
    warm = lambda: warmup(model, lut, gcfg, "bmm", device, n_docs=cfg.batch_size, doc_len=cfg.window + cfg.chunk,  # noqa: E731
                          graphs=True)
    class Joining(BackgroundCompile):
        def ready(self) -> bool:
            self.thread.join()
            return True

    class Waiting(ProcessCompile):
        def ready(self) -> bool:
            self.child.proc.wait()
            return True

    bg = Joining(model, warm, compile=compile_) if child is None else Waiting(model, [], warm, cmd=child)
    rep = evaluate(model, stream, lut, mode="ttt", cfg=gcfg, backend="bmm", background=bg)
    return ref, rep, bg


def test_overlap_compile_hands_over_between_batches_and_scores_the_same():
    """The hand-over on CPU (no compile in the thread: one thread in Dynamo at most): the eval starts on the first
    graphs, takes the second set at a batch boundary, every step staged through the buckets, and scores exactly as
    the eval without the thread; the thread's warm-up trained its own adapters only."""
    ref, rep, bg = _overlap_eval(CFG, "cpu", compile_=False)
    ov = rep["overlap_compile"]
    assert bg.ready() and bg.error is None and ov["background_compile_s"] > 0
    assert ov["eager_batches"] == 1 and "switched_after_s" in ov and ov["warmup_rates"]["ttt_pos_per_s"] > 0
    assert rep["cuda_graphs"]["graph_steps"] == rep["steps"] == ref["steps"]
    assert rep["targets"] == ref["targets"] and rep["legality"] == ref["legality"]
    assert rep["val_bpb"] == ref["val_bpb"], (rep["val_bpb"], ref["val_bpb"])


def test_overlap_compile_compiles_in_the_thread_and_the_main_thread_reuses_it():
    """torch.compile in the background thread (per-thread Dynamo config from torch 2.12 on): the thread compiles the
    step's frames, the main thread runs the compiled forward after the hand-over without compiling again, and the
    score matches the eager eval to compile rounding. Until the hand-over the main thread's forward stays eager
    (``set_thread_eager``), so no two threads are in Dynamo at once."""
    from train.warmup import compile_cache_counts

    ref, rep, bg = _overlap_eval(CFG, "cpu", compile_=True)
    ov = rep["overlap_compile"]
    frames = ov["warmup_rates"]["dynamo_frames"]
    assert bg.error is None and frames > 0 and "switched_after_s" in ov
    assert compile_cache_counts()["dynamo_frames"] == frames   # nothing compiled on the main thread
    assert rep["targets"] == ref["targets"] and rep["legality"] == ref["legality"]
    assert abs(rep["val_bpb"] - ref["val_bpb"]) < 1e-6 * ref["val_bpb"], (rep["val_bpb"], ref["val_bpb"])


def test_overlap_compile_process_hands_over_and_compiles_here():
    """``--overlap-compile process``: the child runs (here a stand-in that only exits 0), the first batch runs eagerly,
    then the compile and warm-up happen on this thread at the boundary and the rest runs compiled; scores match the
    eager eval to compile rounding. A failing child is raised with its exit code and output."""
    import sys

    from train.forward import is_compiled, set_thread_eager

    ref, rep, bg = _overlap_eval(CFG, "cpu", compile_=True, child=[sys.executable, "-c", "pass"])
    ov = rep["overlap_compile"]
    assert bg.error is None  # the interface BackgroundCompile has (the GPU test reads it for both kinds)
    assert ov["eager_batches"] == 1 and ov["child_s"] > 0 and ov["here_compile_s"] > 0
    assert is_compiled(bg.model) and bg.rates["dynamo_frames"] >= 1   # compiled here, after the child
    assert rep["targets"] == ref["targets"] and rep["legality"] == ref["legality"]
    assert abs(rep["val_bpb"] - ref["val_bpb"]) < 1e-6 * ref["val_bpb"], (rep["val_bpb"], ref["val_bpb"])
    assert set_thread_eager(False) is False

    with pytest.raises(RuntimeError, match="compile child exited 3: boom"):
        _overlap_eval(CFG, "cpu", compile_=True,
                      child=[sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"])


def test_compile_child_argv_drops_what_the_child_must_not_do():
    from train.eval import _compile_child_argv

    assert _compile_child_argv(["--artifact", "a.pgolf", "--overlap-compile", "process", "--json", "r.json",
                                "--reference", "--max-docs=5"]) == ["--artifact", "a.pgolf", "--reference",
                                                                    "--warmup-only"]
    assert _compile_child_argv(["--overlap-compile", "--reference"]) == ["--reference", "--warmup-only"]
    assert _compile_child_argv(["--overlap-compile=process", "--json=r.json", "--recipe", "records"]) == [
        "--recipe", "records", "--warmup-only"]


def test_thread_eager_keeps_this_thread_out_of_the_compiled_forward():
    """``set_thread_eager(True)``: with the compile attached, the calling thread's ``rows_nll`` runs eagerly (no Dynamo
    frame, same NLL bitwise as the uncompiled model); another thread still runs the compiled one; the setting is
    restored by its return value."""
    import threading

    from train.forward import compile_rows_nll, rows_nll, set_thread_eager
    from train.warmup import compile_cache_counts

    torch.manual_seed(0)
    model = tiny_model(seed=3)
    rb = build_rows(doc_stream(LENGTHS, seed=5), np.array([[0, 4, 20], [40, 2, 9]]), CFG.window,
                    shape=(2, CFG.window, CFG.chunk))
    with torch.no_grad():
        plain = rows_nll(model, rb)
    compile_rows_nll(model)
    try:
        frames = compile_cache_counts()["dynamo_frames"]
        before = set_thread_eager(True)
        try:
            with torch.no_grad():
                eager = rows_nll(model, rb)
            assert compile_cache_counts()["dynamo_frames"] == frames   # nothing traced on this thread
            out = {}

            def other():
                with torch.no_grad():
                    out["nll"] = rows_nll(model, rb)

            t = threading.Thread(target=other)
            t.start()
            t.join()
        finally:
            assert set_thread_eager(before) is True
        assert torch.equal(eager, plain)
        assert compile_cache_counts()["dynamo_frames"] > frames      # the other thread compiled
        torch.testing.assert_close(out["nll"], plain, rtol=1e-4, atol=1e-4)
    finally:
        compile_rows_nll(model, enable=False)


def test_overlap_compile_refuses_what_it_cannot_hand_over():
    """Rolling schedule or phased TTT: refused by name before anything runs; a failed thread raises on the main
    thread with the thread's error."""
    import dataclasses

    from train.eval import evaluate
    from train.overlap import BackgroundCompile

    stream = doc_stream(LENGTHS, seed=5)
    lut = _lut(tiny_model(seed=3).config.vocab_size)
    model = tiny_model(seed=3)
    for cfg in (dataclasses.replace(CFG, cuda_graphs=True, schedule="rolling"),
                dataclasses.replace(RECORDS_LIKE, cuda_graphs=True, phases=2, phase_docs=4)):
        with pytest.raises(ValueError, match="overlap-compile"):
            evaluate(model, stream, lut, mode="ttt", cfg=cfg, backend="bmm",
                     background=BackgroundCompile(model, dict, compile=False))

    with pytest.raises(TypeError, match="BackgroundCompile: warm: expected a callable"):
        BackgroundCompile(model, None)
    with pytest.raises(TypeError, match="BackgroundCompile: model: expected a torch.nn.Module"):
        BackgroundCompile(object(), dict)
    from train.forward import set_thread_eager
    from train.overlap import ProcessCompile

    with pytest.raises(TypeError, match="ProcessCompile: argv: expected a list of str"):
        ProcessCompile(model, "--reference", dict)
    with pytest.raises(TypeError, match="ProcessCompile: warm: expected a callable"):
        ProcessCompile(model, [], None)
    with pytest.raises(RuntimeError, match="ProcessCompile.result: not started"):
        ProcessCompile(model, [], dict).result()
    with pytest.raises(TypeError, match="set_thread_eager: on: expected a bool"):
        set_thread_eager(1)
    with pytest.raises(TypeError, match="evaluate: background: expected a train.overlap.BackgroundCompile"):
        evaluate(model, stream, lut, mode="ttt", cfg=dataclasses.replace(CFG, cuda_graphs=True), backend="bmm",
                 background=object())

    def boom():
        raise RuntimeError("synthetic failure")

    with pytest.raises(RuntimeError, match="background compile failed: RuntimeError: synthetic failure"):
        evaluate(model, stream, lut, mode="ttt", cfg=dataclasses.replace(CFG, cuda_graphs=True), backend="bmm",
                 background=BackgroundCompile(model, boom, compile=False))
    from train.forward import set_thread_eager

    assert set_thread_eager(False) is False   # the failed eval left this thread's forward as it found it


@pytest.mark.gpu
@pytest.mark.parametrize("where", ["thread", "process"])  # both passed on an H200 (bench/results/logs/gpu-tests-graphs-h200.txt)
def test_gpu_overlap_compile_equals_plain_graphs(where):
    """On the GPU with the compile in the thread, or (process) on this thread after a child (a stand-in that exits 0):
    eager graphs first, compiled graphs after the hand-over, against the plain compiled-graph eval (BPB within 1e-4
    relative: the eager and compiled steps round differently)."""
    import dataclasses
    import sys

    from train.eval import evaluate
    from train.forward import compile_rows_nll

    ref, rep, bg = _overlap_eval(CFG, "cuda", compile_=True,
                                 child=[sys.executable, "-c", "pass"] if where == "process" else None)
    stream = doc_stream(LENGTHS, seed=5).cuda()
    lut = _lut(tiny_model(seed=3).config.vocab_size)
    m = tiny_model(seed=3).cuda()
    compile_rows_nll(m)
    comp = evaluate(m, stream, lut, mode="ttt", cfg=dataclasses.replace(CFG, cuda_graphs=True), backend="bmm")
    assert bg.error is None and rep["cuda_graphs"]["captured"]
    assert rep["targets"] == comp["targets"] == ref["targets"] and rep["legality"] == comp["legality"]
    assert abs(rep["val_bpb"] - comp["val_bpb"]) < 1e-4 * comp["val_bpb"], (rep["val_bpb"], comp["val_bpb"])


def test_graph_window_step_sets_the_window_buckets_and_keeps_the_scores():
    """TTTConfig.graph_window_step: the graphs' window buckets are its multiples (the default's are
    max(chunk, window / 8)); the bucketed steps pad less at a finer step (higher fill) and score the same; a bad
    step is refused by name, from the config and from the CLI."""
    import dataclasses

    from train.eval import _parse, evaluate

    stream = doc_stream(LENGTHS, seed=5)
    lut = _lut(tiny_model(seed=3).config.vocab_size)
    cfg = dataclasses.replace(RECORDS_LIKE, cuda_graphs=True, schedule="batch")
    reps = {}
    for step in (None, cfg.window):  # the default here: multiples of the chunk (32); the coarsest: the window
        reps[step] = evaluate(tiny_model(seed=3), stream, lut, mode="ttt",
                              cfg=dataclasses.replace(cfg, graph_window_step=step), backend="bmm")
    fine, coarse = reps[None]["cuda_graphs"], reps[cfg.window]["cuda_graphs"]
    assert fine["graph_steps"] == coarse["graph_steps"] > 0
    assert fine["graph_fill"] > coarse["graph_fill"], (fine["graph_fill"], coarse["graph_fill"])
    assert reps[cfg.window]["targets"] == reps[None]["targets"]
    assert abs(reps[cfg.window]["val_bpb"] - reps[None]["val_bpb"]) < 1e-5 * reps[None]["val_bpb"]
    for bad in (0, cfg.window + 1, True, 2.5):
        with pytest.raises(ValueError, match="graph_window_step"):
            dataclasses.replace(cfg, graph_window_step=bad)
    with pytest.raises(SystemExit):
        _parse(["--artifact", "a", "--val", "v", "--tokenizer", "t", "--graph-window-step", "0"])
