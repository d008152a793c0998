"""The records' TTT recipe as options of the eval driver, each against a plain-torch reference (CPU,
tiny shapes): adapter targets q/k/v/o/mlp/up/down/head with the alpha/rank scale, AdamW with beta1 = 0,
warm-start A, the phase plan, the global SGD pass, the int6 -> dense switch, the preset and the refusal
of bad arguments. Legality of the new options is in tests/test_compliance.py."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train.adapters import DocLoRA
from train.eval_fixtures import doc_stream, tiny_model
from train.forward import rows_nll
from train.model import rms_norm
from train.phased import global_pass, global_rows, phase_plan, unfreeze_int6
from train.rows import build_rows, split_docs
from train.scoring import make_state
from train.ttt_config import RECIPES, TARGETS, TTTConfig, recipe
from train.ttt_optim import BatchedAdam, optimizer_for

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = ("q", "k", "v", "o", "mlp", "up", "down", "head")


def _randomize(ad, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ad.params:  # non-zero B: every LoRA path contributes
            p.copy_(torch.randn(p.shape, generator=g) * std)


def ref_nll(model, rb, ad, scale):
    """Plain-torch reference of the adapted forward, one row at a time: every delta written out as
    scale * (x A_r^T) B_r^T at the place the record's BatchedTTTLoRA puts it."""
    out = []
    for r in range(rb.x.shape[0]):
        a_row = int(ad.rows[r]) if ad.rows is not None else r

        def D(t, i, inp):
            if t not in ad.A:
                return 0.0
            A, B = ad.A[t][i][a_row], ad.B[t][i][a_row]
            return scale * (inp @ A.t()) @ B.t()

        ids = rb.x[r:r + 1]
        x = rms_norm(model.tok_emb(ids))
        x0, skips = x, []
        n_enc = model.num_encoder_layers
        for i, blk in enumerate(model.blocks):
            if i >= n_enc and skips:
                x = x + model.skip_weights[i - n_enc] * skips.pop()
            mix = blk.resid_mix
            x = mix[0] * x + mix[1] * x0
            h = rms_norm(x)
            at = blk.attn
            q, k, v = at.c_q(h) + D("q", i, h), at.c_k(h) + D("k", i, h), at.c_v(h) + D("v", i, h)
            a = at(h, q, k, v) + D("o", i, h)
            x = x + blk.attn_scale * a
            m = rms_norm(x)
            u = blk.mlp.fc(m) + D("up", i, m)
            act = F.leaky_relu(u, blk.mlp.slope).square()
            y = blk.mlp.proj(act) + D("down", i, act) + D("mlp", i, m)
            x = x + blk.mlp_scale * y
            if i < n_enc:
                skips.append(x)
        hf = rms_norm(x)
        logits = F.linear(hf, model.head_weight()) + D("head", 0, hf)
        cap = model.config.logit_softcap
        logits = cap * torch.tanh(logits / cap)
        logp = torch.log_softmax(logits[0].double(), -1)
        out.append(-logp[rb.sel[r], rb.y[r]])
    return torch.stack(out)


def _rows(stream, ns, starts, window, n=3):
    rows = np.stack([starts[:n], np.full(n, 8), np.minimum(40, ns[:n])], 1)
    return build_rows(stream, rows, window)


@pytest.mark.parametrize("targets,alpha", [(ALL, 12.0), (("o", "mlp"), None), (("up", "down", "head"), 3.0),
                                           (("q", "k", "v", "o", "mlp", "head"), 144.0)],
                         ids=["all-alpha12", "o-mlp", "up-down-head", "records-targets"])
def test_adapter_targets_match_plain_torch(targets, alpha):
    m = tiny_model(seed=3)
    stream = doc_stream([60, 50, 45], seed=1)
    starts, ns = split_docs(stream)
    cfg = TTTConfig(rank=4, targets=targets, alpha=alpha, chunk=16, window=48, batch_size=3)
    ad = DocLoRA(m, cfg, 3, "cpu", "bmm")
    _randomize(ad)
    rb = _rows(stream, ns, starts, cfg.window)
    ad.set_rows(torch.tensor([2, 0, 1]))  # a permuted row map: row r uses adapter row rows[r]
    with torch.no_grad():
        got = rows_nll(m, rb, ad)
        want = ref_nll(m, rb, ad, cfg.scale)
    msk = rb.mask
    torch.testing.assert_close(got[msk].double(), want[msk], rtol=2e-5, atol=2e-5)
    # the adapters matter: zeroing B gives the base model's NLL, which differs
    with torch.no_grad():
        base = rows_nll(m, rb, None)
    assert (got[msk] - base[msk]).abs().max() > 1e-3
    assert cfg.scale == (1.0 if alpha is None else alpha / 4)


def test_kernel_path_with_alpha_and_new_targets_equals_bmm():
    """The fused multi-LoRA path (Triton interpreter on CPU) for q/k/v/head with alpha, plus o and mlp on
    bmm, gives the bmm path's NLL and adapter gradients."""
    m = tiny_model(seed=3)
    stream = doc_stream([40, 36], seed=2)
    starts, ns = split_docs(stream)
    cfg = TTTConfig(rank=2, targets=("q", "v", "o", "mlp", "head"), alpha=3.0, chunk=16, window=32, batch_size=2)
    rb = _rows(stream, ns, starts, cfg.window, n=2)
    res = {}
    for be in ("kernel", "bmm"):
        ad = DocLoRA(m, cfg, 2, "cpu", be)
        _randomize(ad, seed=1)
        ad.set_rows(torch.tensor([0, 1]))
        nll = rows_nll(m, rb, ad)
        (nll * rb.mask).sum().backward()
        res[be] = (nll.detach(), [p.grad.clone() for p in ad.params], ad)
    assert res["kernel"][2].backend == "kernel" and res["kernel"][2].bmm_targets == ["o", "mlp"]
    torch.testing.assert_close(res["kernel"][0], res["bmm"][0], rtol=1e-4, atol=1e-4)
    for gk, gb in zip(res["kernel"][1], res["bmm"][1]):
        torch.testing.assert_close(gk, gb, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("per_row", [False, True])
def test_adamw_beta1_zero_matches_torch(per_row, fused, steps_match):
    """BatchedAdam (AdamW, beta1 = 0), batch-wide or per row, torch ops or fused (pgolf_kernels.adam_rows, the
    kernel interpreted on the CPU lane), against torch.optim.AdamW."""
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(3, 5, 4, generator=g), torch.randn(3, 2, 4, generator=g)]
    ref = [p.clone().requires_grad_(True) for p in ps]
    cfg = TTTConfig(optimizer="adamw", lr=1e-2, beta1=0.0, beta2=0.999, eps=1e-10, weight_decay=1.0,
                    fused_optimizer=fused)
    opt = optimizer_for(ps, cfg, per_row=per_row)
    assert opt.fused is fused
    topt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.0, 0.999), eps=1e-10, weight_decay=1.0)
    steps_match(opt, topt, ps, ref, g)
    # the decay is what made the difference: plain Adam on the same gradients ends elsewhere
    assert optimizer_for(ps, TTTConfig()).weight_decay == 0.0
    g = torch.Generator().manual_seed(0)
    plain = [torch.randn(3, 5, 4, generator=g), torch.randn(3, 2, 4, generator=g)]
    opt2 = BatchedAdam(plain, 1e-2, (0.0, 0.999), 1e-10, per_row=per_row)
    for step in range(4):
        for p in plain:
            p.grad = torch.randn(p.shape, generator=g)
        opt2.step()
    assert (plain[0] - ps[0]).abs().max() > 1e-3


def test_warm_start_a_keeps_a_and_zeroes_b():
    m = tiny_model(seed=3)
    cfg = TTTConfig(rank=2, targets=("q", "down", "head"), warm_start_a=True)
    ad = DocLoRA(m, cfg, 2, "cpu", "bmm")
    a0 = [a.clone() for a in ad._A_list]
    _randomize(ad, seed=4)  # as if trained
    trained = [a.clone() for a in ad._A_list]
    ad.reset([100, 200])
    for a, t in zip(ad._A_list, trained):
        assert torch.equal(a, t)  # A kept
    assert all(int(b.count_nonzero()) == 0 for b in ad._B_list)
    _randomize(ad, seed=5)
    ad.reset_rows([1], [300])  # rolling refill: B of that row zeroed, A kept
    assert all(int(b[1].count_nonzero()) == 0 and int(b[0].count_nonzero()) > 0 for b in ad._B_list)
    ad.invalidate_a()
    ad.reset([0, 1])  # the first draw again (document ids 0, 1 as at construction)
    for a, t in zip(ad._A_list, a0):
        assert torch.equal(a, t)
    # without warm start every reset draws A from the documents' ids
    cold = DocLoRA(m, TTTConfig(rank=2, targets=("q", "down", "head")), 2, "cpu", "bmm")
    _randomize(cold, seed=4)
    cold.reset([0, 1])
    for a, t in zip(cold._A_list, a0):
        assert torch.equal(a, t)
    # A's bound follows each target's input size: down reads the MLP activation (mlp_mult * d wide)
    d, hid = m.config.model_dim, m.config.mlp_mult * m.config.model_dim
    assert float(ad.A["down"][0].detach().abs().max()) <= 1 / math.sqrt(hid) < float(ad.A["q"][0].detach().abs().max()) <= 1 / math.sqrt(d)
    # rolling refills after invalidate_a (a global pass): each row draws A once, from its first document, and keeps it
    ad.invalidate_a()
    _randomize(ad, seed=6)
    ad.reset_rows([1], [0])  # row 1 drawn from document 0: a0's row 0; row 0 not drawn yet
    first = [a.clone() for a in ad._A_list]
    for a, t in zip(first, a0):
        assert torch.equal(a[1], t[0]) and not torch.equal(a[0], t[0])
    _randomize(ad, seed=7)
    trained = [a.clone() for a in ad._A_list]
    ad.reset_rows([1, 0], [300, 1])  # row 1 keeps its A; row 0 draws its first, from document 1 (a0's row 1)
    for a, t, z in zip(ad._A_list, trained, a0):
        assert torch.equal(a[1], t[1]) and torch.equal(a[0], z[1])


def test_phase_plan():
    ns = np.array([5, 50, 7, 30, 30, 1, 90, 12])
    plan = phase_plan(ns, phase_docs=5, phases=2)
    order = np.argsort(-ns, kind="stable")
    assert [p.tolist() for p in plan] == [order[:2].tolist(), order[2:5].tolist(), order[5:].tolist()]
    assert sum(len(p) for p in plan) == len(ns)
    full = phase_plan(ns, phase_docs=100, phases=3)  # more phase docs than documents: every doc in a phase
    assert [len(p) for p in full] == [2, 3, 3, 0]
    with pytest.raises(ValueError, match="phases: 9"):
        phase_plan(ns, phase_docs=9, phases=9)


def global_case():
    """A small global pass: (tiny model, stream of 4 documents, their starts, the config, the rows of documents 2, 0,
    1): 3 SGD steps with momentum and clipping."""
    m = tiny_model(seed=3)
    stream = doc_stream([70, 40, 90, 20], seed=3)
    starts, ns = split_docs(stream)
    cfg = TTTConfig(global_lr=0.05, global_momentum=0.9, global_clip=0.5, global_seq_len=32, global_chunk_tokens=64,
                    global_batch_seqs=2)
    return m, stream, starts, cfg, global_rows(starts, ns, np.array([2, 0, 1]), cfg.global_seq_len)


def test_global_pass_matches_plain_sgd(lut):
    """global_pass == a plain loop: per chunk (the last skipped) one SGD step with momentum on the mean
    NLL of the chunk's targets, each row a piece of one document seen through a window of seq_len
    ending at the piece's end (never crossing the document's BOS), clipped."""
    m, stream, starts, cfg, rows = global_case()
    ref = copy.deepcopy(m)
    assert [tuple(r) for r in rows[:3]] == [(starts[2], 0, 32), (starts[2], 32, 64), (starts[2], 64, 90)]
    st = make_state(stream, lut)
    st.ledger.count[:] = 1  # every target "scored" (this test is about the math; legality is tested elsewhere)
    info = global_pass(m, stream, rows, cfg, st)
    # reference
    params = [p for p in ref.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=cfg.global_lr, momentum=cfg.global_momentum)
    n_t = rows[:, 2] - rows[:, 1]
    chunk = (np.cumsum(n_t) - n_t) // cfg.global_chunk_tokens
    K = int(chunk.max()) + 1
    for c in range(K - 1):
        for g_ in opt.param_groups:
            g_["lr"] = cfg.global_lr * 0.5 * (1 + math.cos(math.pi * c / (K - 1)))
        tot, n = 0.0, 0
        for s, a, b in rows[chunk == c]:
            w = max(0, b - cfg.global_seq_len)        # a window of seq_len ending at the piece's end
            x = stream[s + w: s + b][None]
            tot = tot + ref(x, stream[s + w + 1: s + b + 1][None])[0, a - w:].sum()
            n += int(b - a)
        (tot / n).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.global_clip)
        opt.step()
        opt.zero_grad()
    assert info["steps"] == K - 1 and info["chunks"] == K
    for p, r in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(p, r.detach(), rtol=1e-4, atol=1e-5)
    assert not any(p.requires_grad for p in m.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(m.parameters(), tiny_model(seed=3).parameters()))


def test_unfreeze_int6_switches_to_dequantized_weights():
    from pgolf_kernels.int6_linear import Int6Linear, convert_linears_to_int6

    m = tiny_model(seed=3)
    convert_linears_to_int6(m)
    q0 = m.blocks[0].attn.c_q
    assert isinstance(q0, Int6Linear)
    w = q0.q.float() * q0.scale.float()[:, None]
    msg = unfreeze_int6(m)
    n = sum(1 for _ in m.modules() if isinstance(_, torch.nn.Linear))
    assert "int6 matrices replaced" in msg and str(n) in msg
    assert not any(isinstance(x, Int6Linear) for x in m.modules())
    torch.testing.assert_close(m.blocks[0].attn.c_q.weight, w)
    assert unfreeze_int6(m) == "dense base weights trained in place"


def test_records_preset_values():
    cfg = recipe("records")
    assert (cfg.rank, cfg.alpha, cfg.targets, cfg.chunk, cfg.window, cfg.batch_size) == (
        96, 144.0, ("q", "k", "v", "o", "mlp", "head"), 48, 2048, 64)
    assert (cfg.optimizer, cfg.lr, cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay, cfg.warm_start_a) == (
        "adamw", 1e-4, 0.0, 0.999, 1e-10, 1.0, True)
    assert (cfg.phases, cfg.phase_docs, cfg.global_lr, cfg.global_momentum, cfg.global_clip) == (3, 2000, 1e-3, 0.9, 1.0)
    assert cfg.scale == 1.5 and TTTConfig().scale == 1.0 and RECIPES["seeds"] == {"window": 1024}
    assert recipe("records", rank=8).rank == 8  # explicit options override the preset
    # the eval's own settings as case (c) was measured; the window-bucket step falls back to the default rule when a
    # smaller window than the step is given, and stays when it is given itself
    assert cfg.tail_block is True and cfg.graph_window_step == 96
    assert recipe("records", window=64).graph_window_step is None
    assert recipe("records", window=64, graph_window_step=32).graph_window_step == 32
    from train.eval import _parse

    assert _parse(["--artifact", "x.ptz", "--recipe", "records"]).ttt_cfg.tail_block is True
    assert _parse(["--artifact", "x.ptz", "--recipe", "records", "--no-tail-block"]).ttt_cfg.tail_block is False
    assert _parse(["--artifact", "x.ptz", "--tail-block"]).ttt_cfg.tail_block is True
    assert _parse(["--artifact", "x.ptz"]).ttt_cfg.tail_block is False


@pytest.mark.parametrize("kw,name", [(dict(rank=0), "rank: 0"), (dict(rank=129), "rank: 129"),
                                     (dict(targets=("q", "x")), "targets"), (dict(alpha=0.0), "alpha: 0.0"),
                                     (dict(alpha=-2.0), "alpha: -2.0"), (dict(lr=-1.0), "lr: -1.0"),
                                     (dict(optimizer="adamw", weight_decay=-1.0), "weight_decay: -1.0"),
                                     (dict(phases=3, phase_docs=2), "phase_docs: 2"), (dict(optimizer="sgd"), "optimizer"),
                                     (dict(global_lr=-1.0), "global_lr"), (dict(beta1=1.0), "beta1"),
                                     (dict(graph_capture="lazy"), "graph_capture: 'lazy'")])
def test_bad_arguments_refused_by_name(kw, name):
    with pytest.raises(ValueError, match=name):
        TTTConfig(**kw)


def test_cli_refuses_bad_arguments_in_one_line(capsys):
    from train.eval import _parse

    from train.checks import CheckError

    with pytest.raises(CheckError, match="--rank = 0: expected"):  # explicit numbers: by flag name
        _parse(["--artifact", "x.ptz", "--rank", "0"])
    for argv, name in ((["--lora-targets", "q,wq"], "targets"),
                       (["--alpha", "0"], "alpha: 0.0"), (["--global-lr", "-1"], "global_lr: -1.0")):
        with pytest.raises(SystemExit):
            _parse(["--artifact", "x.ptz"] + argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert name in err[-1] and err[-1].startswith("python3 -m train.eval: error:")
    args = _parse(["--artifact", "x.ptz", "--recipe", "records", "--lora-targets", "q,v,up,down"])
    assert args.ttt_cfg.targets == ("q", "v", "up", "down") and args.ttt_cfg.rank == 96
    assert args.ttt_cfg.graph_capture == "ahead"
    assert _parse(["--artifact", "x.ptz", "--graph-capture", "first-use"]).ttt_cfg.graph_capture == "first-use"
    assert args.ttt_cfg.graph_min_steps == 3
    assert _parse(["--artifact", "x.ptz", "--graph-min-steps", "1"]).ttt_cfg.graph_min_steps == 1
    for bad in ("0", "-2"):
        with pytest.raises(SystemExit):
            _parse(["--artifact", "x.ptz", "--graph-min-steps", bad])
        assert "graph_min_steps" in capsys.readouterr().err
    assert set(TARGETS) == set(ALL)


def test_phases_more_than_documents_refused(lut):
    from train.eval import evaluate

    stream = doc_stream([30, 20], seed=1)
    cfg = TTTConfig(rank=2, chunk=16, window=32, batch_size=2, phases=3, phase_docs=3)
    with pytest.raises(ValueError, match="phases: 3"):
        evaluate(tiny_model(seed=1), stream, lut, mode="ttt", cfg=cfg, backend="bmm")


def test_before_global_runs_once_before_the_first_global_pass(lut, monkeypatch):
    """evaluate(before_global=fn) (the CLI's --parallel-compile waits there for its global-pass child): fn runs once,
    after phase 1 is scored and before the first global pass; what it returns is the report's before_global."""
    import train.eval as ev

    order = []
    real = ev.global_pass

    def recording_pass(*a, **k):
        order.append("pass")
        return real(*a, **k)

    monkeypatch.setattr(ev, "global_pass", recording_pass)
    stream = doc_stream([60, 50, 45, 40, 30], seed=1)
    cfg = recipe("records", rank=2, alpha=3.0, chunk=16, window=32, batch_size=2, phase_docs=4, phases=2,
                 global_seq_len=32, global_chunk_tokens=32)
    rep = ev.evaluate(tiny_model(seed=1), stream, lut, mode="ttt", cfg=cfg, backend="bmm", log=lambda *a: None,
                      before_global=lambda: order.append("hook") or {"rc": 0})
    assert order == ["hook", "pass", "pass"] and rep["before_global"] == {"rc": 0}


def test_parallel_compile_child_outcomes_are_said(tmp_path):
    """The eval's wait for its --parallel-compile children: a success and a failure each logged on one line and
    returned for the report (the failure with the tail of the child's output); the failed part then compiles here."""
    import sys

    from train.eval import _wait_children
    from train.overlap import CompileChild

    lines = []
    outs = _wait_children({"ttt-head": CompileChild(cmd=[sys.executable, "-c", "pass"]).start(),
                           "global": CompileChild(cmd=[sys.executable, "-c", "import sys; print('oom'); sys.exit(3)"])
                           .start()}, lines.append, "the warm-up")
    assert outs["ttt-head"]["rc"] == 0 and "tail" not in outs["ttt-head"] and "ttt-head child done" in lines[0]
    assert outs["global"]["rc"] == 3 and "oom" in outs["global"]["tail"] and "exit 3" in lines[1] and "oom" in lines[1]
    with pytest.raises(TypeError, match="--parallel-compile: argv: expected a list of str"):
        CompileChild("--reference", who="--parallel-compile")
    with pytest.raises(RuntimeError, match="not started"):
        CompileChild([]).wait()


def test_phased_deadline_fallback_skips_global_passes(lut):
    """Past the deadline every remaining document is scored by the base model and no global pass runs
    (training of any kind stops); every target is still scored once."""
    from train.eval import evaluate

    stream = doc_stream([60, 50, 45, 40, 30], seed=1)
    cfg = recipe("records", rank=2, alpha=3.0, chunk=16, window=32, batch_size=2, phase_docs=4, phases=2,
                 global_seq_len=32, global_chunk_tokens=32)
    m = tiny_model(seed=1)
    w0 = [p.clone() for p in m.parameters()]
    rep = evaluate(m, stream, lut, mode="ttt", cfg=cfg, backend="bmm", strict=True, budget_s=0.0,
                   rates={"ttt_pos_per_s": 1.0, "base_pos_per_s": 1e9}, log=lambda *a: None)
    assert rep["docs_no_ttt_deadline"] == 5 and rep["docs_ttt"] == 0 and rep["phases"] == []
    assert all(torch.equal(a, b) for a, b in zip(w0, m.parameters()))
    assert rep["legality"]["missing"] == 0 and rep["legality"]["multi"] == 0


def test_global_pass_bf16_weights_step_through_fp32_masters(lut):
    """A bf16 base (the CUDA default) steps through fp32 masters: the per-gain weights (near 1, where a
    bf16 ulp is 2^-7) end at the fp32 run's values rounded to bf16, although most single steps are below
    half an ulp and would round away if applied to the bf16 weights in place."""
    stream = doc_stream([70, 40, 90, 20], seed=3)
    starts, ns = split_docs(stream)
    cfg = TTTConfig(global_lr=1.0, global_momentum=0.0, global_clip=0.0, global_seq_len=32, global_chunk_tokens=16)
    rows = global_rows(starts, ns, np.array([2, 0, 1]), cfg.global_seq_len)
    out = {}
    for dt in (torch.float32, torch.bfloat16):
        m = tiny_model(seed=3).to(dt)
        st = make_state(stream, lut)
        st.ledger.count[:] = 1
        global_pass(m, stream, rows, cfg, st)
        out[dt] = {n: p.detach().float() for n, p in m.named_parameters() if n.endswith(("_scale", "q_gain"))}
    init = {n: p.detach().float() for n, p in tiny_model(seed=3).to(torch.bfloat16).named_parameters() if n in out[dt]}
    should = moved = agree = 0
    for n in init:
        want = out[torch.float32][n].to(torch.bfloat16).float()
        got = out[torch.bfloat16][n]
        should += int((want != init[n]).sum())
        moved += int(((got != init[n]) & (want != init[n])).sum())
        agree += int((got == want).sum())
    total = sum(v.numel() for v in init.values())
    assert should > 20 and moved >= 0.8 * should, (moved, should)
    assert agree >= 0.95 * total, (agree, total)


def test_cli_records_recipe_end_to_end(shared_data, tmp_path):
    """``--recipe records`` through the CLI on the FineWeb sample (``--reference``: the int6 kernel path
    under the Triton interpreter takes minutes here; it is tested at unit size above), shrunk by explicit
    options: phased passes run, the report carries every option, every target is scored once."""
    import json
    import os

    from train import eval as ev
    from train.artifact import save_artifact

    m = tiny_model(seed=7, num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1)
    art = str(tmp_path / "tiny.ptz")
    save_artifact(m, art, code_paths=[], warn=False)
    out = tmp_path / "rep.json"
    rep = ev.main(["--artifact", art, "--val", os.path.join(shared_data, "fineweb_sample",
                                                            "fineweb_sample200_sp1024_000000.bin"),
                   "--tokenizer", os.path.join(shared_data, "fineweb_1024_bpe.model"), "--max-docs", "4",
                   "--reference", "--recipe", "records", "--rank", "2", "--alpha", "3", "--chunk", "128", "--window", "256",
                   "--batch-size", "2", "--phases", "2", "--phase-docs", "4", "--global-seq-len", "256",
                   "--global-chunk-tokens", "2048", "--device", "cpu", "--no-warmup", "--json", str(out)])
    saved = json.load(open(out))
    assert saved["ttt"]["targets"] == ["q", "k", "v", "o", "mlp", "head"] and saved["ttt"]["optimizer"] == "adamw"
    assert saved["ttt"]["warm_start_a"] is True and saved["ttt"]["phases"] == 2 and saved["ttt"]["alpha"] == 3.0
    assert len(rep["phases"]) == 2 and rep["base_weights"] == "dense base weights trained in place"
    # what each global pass compiled (eager here: nothing)
    assert all(p["compiled"] == {"frames": 0, "seconds": 0.0} for p in rep["phases"]), rep["phases"]
    assert rep["lora_backend"] == "bmm" and all(p["steps"] > 0 for p in rep["phases"])
    assert rep["docs"] == 4 and rep["docs_ttt"] == 4 and rep["legality"]["missing"] == 0
    assert math.isfinite(rep["val_bpb"])


def test_unfreeze_at_load_replaces_the_codes_only_for_phased_ttt(tmp_path):
    """train.eval.unfreeze_at_load: int6 codes -> dense weights equal to their dequantization, only for mode ttt with
    phases and how "load"; None (model untouched) otherwise; a bad how refused by name."""
    from pgolf_kernels.int6_linear import Int6Linear
    from train import eval as ev
    from train.artifact import save_artifact

    art = str(tmp_path / "tiny.ptz")
    save_artifact(tiny_model(seed=3, num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1), art, code_paths=[],
                  warn=False)
    phased = TTTConfig(phases=2, phase_docs=4)
    for mode, cfg, how in [("ttt", phased, "first-pass"), ("ttt", TTTConfig(), "load"), ("base", phased, "load")]:
        m, _ = ev.load_model(art, reference=False, device=torch.device("cpu"))
        assert ev.unfreeze_at_load(m, mode, cfg, how) is None
        assert any(isinstance(x, Int6Linear) for x in m.modules())
    m, _ = ev.load_model(art, reference=False, device=torch.device("cpu"))
    ref, _ = ev.load_model(art, reference=True, device=torch.device("cpu"))
    said = ev.unfreeze_at_load(m, "ttt", phased)
    assert said == "6 int6 matrices replaced by their dequantized float32 weights at load (--unfreeze-int6 load)"
    assert not any(isinstance(x, Int6Linear) for x in m.modules())
    for (n, p), (n2, p2) in zip(m.named_parameters(), ref.named_parameters()):
        assert n == n2 and torch.equal(p, p2), n
    assert ev.unfreeze_at_load(m, "ttt", phased) is None  # nothing left to replace
    with pytest.raises(ValueError, match="unfreeze_at_load: how = 'later': expected 'load' or 'first-pass'"):
        ev.unfreeze_at_load(m, "ttt", phased, "later")
    with pytest.raises(ValueError, match="unfreeze_at_load: mode = 'tt': expected one of"):
        ev.unfreeze_at_load(m, "tt", phased)
    with pytest.raises(TypeError, match="unfreeze_at_load: cfg: expected a TTTConfig, got dict"):
        ev.unfreeze_at_load(m, "ttt", {"phases": 2})
    with pytest.raises(TypeError, match="unfreeze_at_load: model: expected a torch.nn.Module"):
        ev.unfreeze_at_load("model.ptz", "ttt", phased)
    base = ["--artifact", "a", "--val", "v", "--tokenizer", "t"]
    assert ev._parse(base).unfreeze_int6 == "load"  # the CLI's default
    assert ev._parse(base + ["--unfreeze-int6", "first-pass"]).unfreeze_int6 == "first-pass"


@pytest.mark.parametrize("how,phases,int6_scored", [("load", 2, False), ("first-pass", 2, True), ("load", 0, True)])
def test_cli_unfreezes_int6_at_load_for_phased_ttt(shared_data, tmp_path, monkeypatch, how, phases, int6_scored):
    """--unfreeze-int6: with phases the kernel path's int6 codes are replaced by their dequantized weights at load
    (the model evaluate() receives is dense, the log and the report say so), or left for the first global pass
    (first-pass); without phases the codes stay. evaluate is stopped at its call: the kernel path's eval itself runs
    the Triton interpreter here (minutes), the first-pass switch is tested on evaluate above."""
    import os

    from pgolf_kernels.int6_linear import Int6Linear
    from train import eval as ev
    from train.artifact import save_artifact

    class Called(Exception):
        pass

    def stop(model, *a, **k):
        raise Called(any(isinstance(m, Int6Linear) for m in model.modules()))

    monkeypatch.setattr(ev, "evaluate", stop)
    art = str(tmp_path / "tiny.ptz")
    save_artifact(tiny_model(seed=7, num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1), art, code_paths=[],
                  warn=False)
    lines = []
    argv = ["--artifact", art, "--val", os.path.join(shared_data, "fineweb_sample", "fineweb_sample200_sp1024_000000.bin"),
            "--tokenizer", os.path.join(shared_data, "fineweb_1024_bpe.model"), "--max-docs", "2", "--recipe",
            "records", "--rank", "2", "--chunk", "128", "--window", "256", "--batch-size", "2", "--phases",
            str(phases), "--phase-docs", "2", "--device", "cpu", "--no-warmup", "--unfreeze-int6", how]
    monkeypatch.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
    with pytest.raises(Called) as e:
        ev.main(argv)
    monkeypatch.undo()
    assert e.value.args[0] is int6_scored
    said = [ln for ln in lines if "at load (--unfreeze-int6 load)" in ln]
    assert len(said) == (0 if int6_scored else 1), lines
    if said:
        assert "6 int6 matrices replaced by their dequantized float32 weights" in said[0]


def test_warmup_global_leaves_the_model_as_it_was():
    """train.warmup.warmup_global (the --parallel-compile global child's work): forward and backward of the global pass on
    synthetic tokens, and the model's weights, requires_grad flags and .grad exactly as before (no optimizer step);
    it does reach every base weight (a hook sees their gradients)."""
    from train.warmup import warmup_global

    m = tiny_model(seed=1)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    seen = set()
    for n, p in m.named_parameters():  # (a hook needs requires_grad at registration; the model's flags are False)
        p.requires_grad_(True)
        p.register_hook(lambda g, n=n: seen.add(n))
        p.requires_grad_(False)
    rates = warmup_global(m, TTTConfig(global_seq_len=32), torch.device("cpu"))
    assert rates["global_warmup_s"] > 0 and "dynamo_frames" in rates
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert all(not p.requires_grad and p.grad is None for p in m.parameters())
    assert seen == {n for n, p in m.named_parameters() if p.is_floating_point()}


def test_compile_rows_nll_only_compiles_the_named_functions(monkeypatch):
    """compile_rows_nll(only=...) (a --parallel-compile child): torch.compile on the named functions only, the others
    run as plain Python (so the child's steps compile exactly its part); bad names, an empty set, and only= with a
    precompiled folder refused by name; the forward still scores the same."""
    import train.forward as fw

    compiled = []
    monkeypatch.setattr(fw.torch, "compile", lambda f, **kw: compiled.append(f.__name__) or f)
    stream = doc_stream([40, 30], seed=1)
    m = tiny_model(seed=1)
    from train.bpb import ByteLUT
    from train.eval import evaluate

    V = m.config.vocab_size
    lut = ByteLUT(torch.ones(V, dtype=torch.int16), torch.zeros(V, dtype=torch.bool), torch.zeros(V, dtype=torch.bool))
    cfg = TTTConfig(rank=2, chunk=16, window=32, batch_size=2)
    ref = evaluate(m, stream, lut, mode="ttt", cfg=cfg, backend="bmm", log=lambda *a: None)
    fw.compile_rows_nll(m, only=("head_adapted", "block_tail"))
    assert compiled == ["_head_adapted", "_block_tail"]
    rep = evaluate(m, stream, lut, mode="ttt", cfg=cfg, backend="bmm", log=lambda *a: None)
    assert rep["val_bpb"] == ref["val_bpb"]
    fw.compile_rows_nll(m, enable=False)
    for bad in (("head",), ()):
        with pytest.raises(ValueError, match="compile_rows_nll: only = "):
            fw.compile_rows_nll(m, only=bad)
    with pytest.raises(ValueError, match="only= and precompiled="):
        fw.compile_rows_nll(m, only=("head_adapted",), precompiled="x")


def test_parallel_compile_parts_refuse_bad_arguments_by_name():
    """warmup_ttt_steps / warmup_global: a model that is not the GPT, a config that is not a TTTConfig, or a device
    other than the model's, refused by name before any work."""
    from train.warmup import warmup_global, warmup_ttt_steps

    m = tiny_model(seed=1)
    with pytest.raises(TypeError, match="warmup_global: model: expected a train.model.GPT"):
        warmup_global(torch.nn.Linear(2, 2), TTTConfig(), "cpu")
    with pytest.raises(TypeError, match="warmup_global: cfg: expected a TTTConfig"):
        warmup_global(m, dict(global_seq_len=32), "cpu")
    with pytest.raises(ValueError, match=r"warmup_ttt_steps: device: expected the model's device \(cpu\)"):
        warmup_ttt_steps(m, None, TTTConfig(), "bmm", "meta")
    from train.bpb import ByteLUT

    V = m.config.vocab_size
    lut = ByteLUT(torch.ones(V, dtype=torch.int16), torch.zeros(V, dtype=torch.bool), torch.zeros(V, dtype=torch.bool))
    with pytest.raises(TypeError, match="warmup_ttt_steps: lut: expected a train.bpb.ByteLUT, got NoneType"):
        warmup_ttt_steps(m, None, TTTConfig(), "bmm", "cpu")
    with pytest.raises(ValueError, match="warmup_ttt_steps: backend: expected 'bmm' or 'kernel', got 'nope'"):
        warmup_ttt_steps(m, lut, TTTConfig(), "nope", "cpu")
    with pytest.raises(ValueError, match=r"warmup_ttt_steps: n_docs: expected a whole number >= 1, got 0"):
        warmup_ttt_steps(m, lut, TTTConfig(), "bmm", "cpu", n_docs=0, doc_len=40)
    with pytest.raises(ValueError, match=r"warmup_ttt_steps: doc_len: expected a whole number >= 2, got 1.5"):
        warmup_ttt_steps(m, lut, TTTConfig(), "bmm", "cpu", doc_len=1.5)


def test_warmup_ttt_steps_runs_the_evals_warmup_batch(monkeypatch):
    """A --parallel-compile TTT child compiles on the eval's own warm-up batch (cfg.batch_size documents of window +
    chunk tokens, as warmup() builds it): the forward compiles with dynamic shapes and keeps the kernels the first
    call's sizes chose, so a smaller batch would hand the eval kernels tuned for small sizes."""
    import train.warmup as wu
    from train.bpb import ByteLUT

    seen = {}

    def fake_batch(model, stream, starts, ns, batch, cfg, ad, opt, st, **kw):
        seen.update(ns=[int(n) for n in ns], batch=list(batch), rows=ad.n_docs)

    monkeypatch.setattr(wu, "ttt_batch", fake_batch)
    m = tiny_model(seed=1)
    V = m.config.vocab_size
    lut = ByteLUT(torch.ones(V, dtype=torch.int16), torch.zeros(V, dtype=torch.bool), torch.zeros(V, dtype=torch.bool))
    cfg = TTTConfig(rank=2, chunk=16, window=32, batch_size=3)
    wu.warmup_ttt_steps(m, lut, cfg, "bmm", "cpu")
    assert seen == dict(ns=[48] * 3, batch=[0, 1, 2], rows=3), seen
    wu.warmup_ttt_steps(m, lut, cfg, "bmm", "cpu", n_docs=5, doc_len=20)  # more documents than rows: one batch
    assert seen == dict(ns=[20] * 5, batch=[0, 1, 2], rows=3), seen


def test_compile_rows_nll_mode_is_passed_and_refused_by_name(monkeypatch):
    """compile_rows_nll(mode=...) hands its mode to torch.compile; a mode with Inductor's own CUDA graphs, or a mode
    with a precompiled folder, is refused by name before anything compiles."""
    import train.forward as fw

    m = tiny_model(seed=1)
    seen = []
    monkeypatch.setattr(fw.torch, "compile", lambda f, **kw: seen.append(kw) or f)
    fw.compile_rows_nll(m, mode="max-autotune-no-cudagraphs")
    assert seen and all(kw == {"dynamic": True, "mode": "max-autotune-no-cudagraphs"} for kw in seen)
    fw.compile_rows_nll(m, enable=False)
    for bad in ("max-autotune", "reduce-overhead", "fast"):
        with pytest.raises(ValueError, match=f"mode = '{bad}': expected one of"):
            fw.compile_rows_nll(m, mode=bad)
    with pytest.raises(ValueError, match="mode= and precompiled= do not go together"):
        fw.compile_rows_nll(m, mode="default", precompiled="x")


def test_fused_optimizer_defaults_by_path_and_keeps_the_scores():
    """The adapters' optimizer is fused (pgolf_kernels.adam_rows) on the kernel path and plain torch ops for
    --reference unless --fused-optimizer says otherwise; fused or not, the eval's scores agree (same formula)."""
    import dataclasses

    from train.eval import _parse, evaluate

    assert _parse(["--artifact", "x.ptz"]).ttt_cfg.fused_optimizer is None
    assert _parse(["--artifact", "x.ptz", "--fused-optimizer", "on"]).ttt_cfg.fused_optimizer is True
    assert _parse(["--artifact", "x.ptz", "--fused-optimizer", "off"]).ttt_cfg.fused_optimizer is False
    with pytest.raises(ValueError, match="fused_optimizer: 'yes'"):
        TTTConfig(fused_optimizer="yes")
    ps = [torch.zeros(2, 3)]
    assert optimizer_for(ps, TTTConfig(), backend="kernel").fused is True
    assert optimizer_for(ps, TTTConfig(), backend="bmm").fused is False
    assert optimizer_for(ps, TTTConfig(fused_optimizer=True), backend="bmm").fused is True
    assert optimizer_for(ps, TTTConfig(fused_optimizer=False), backend="kernel").fused is False
    stream = doc_stream([60, 45, 30, 70], seed=4)
    V = tiny_model(seed=2).config.vocab_size
    from train.bpb import ByteLUT

    lut = ByteLUT(torch.ones(V, dtype=torch.int16), torch.zeros(V, dtype=torch.bool), torch.zeros(V, dtype=torch.bool))
    cfg = TTTConfig(rank=2, chunk=16, window=32, batch_size=2, optimizer="adamw", weight_decay=0.5, beta1=0.0,
                    lr=1e-2)
    reps = {f: evaluate(tiny_model(seed=2), stream, lut, mode="ttt", cfg=dataclasses.replace(cfg, fused_optimizer=f),
                        backend="bmm", log=lambda *a: None) for f in (False, True)}
    assert reps[True]["fused_optimizer"] is True and reps[False]["fused_optimizer"] is False
    assert reps[True]["targets"] == reps[False]["targets"]
    assert abs(reps[True]["val_bpb"] - reps[False]["val_bpb"]) < 1e-6 * reps[False]["val_bpb"]
