"""Compliance suite for the eval driver (CPU lane, tiny model).

The challenge's rules for test-time training, each checked here:
  (1) coverage: every target scored exactly once; counts add up, per mode and across 2 simulated ranks;
  (2) causality: perturbing tokens after position t (and other documents) leaves the scores of targets
      <= t unchanged, TTT steps included;
  (3) score before update: every optimizer step's loss contains only targets already scored;
  (4) full softmax: the scored distributions are normalized over the whole vocabulary;
  (5) single pass: no score is ever overwritten or re-taken.
Every check runs on the per-document TTT mode and, where it applies, on the chunked mode (one shared
adapter, several epochs on each already-scored chunk).

Illegal test doubles run through the same checks, which must catch them (a test fails if a double
passes):
  * train on a chunk, then score it;
  * a second epoch that re-scores and overwrites;
  * PR #713's pattern: per-document multi-epoch TTT that scores in the final epoch only (each target
    scored exactly once, so coverage counts pass; the ledger's train-before-score check and the
    causality perturbation catch it);
  * PR #605's pattern: score in every epoch and keep (overwrite with) the last score (caught by the
    ledger's double-score check, the coverage counts and the causality perturbation).
The causality check needs only each target's final stored score, so it is black-box: it also catches a
scorer that never told the ledger anything.
"""
import copy
import dataclasses
import math

import numpy as np
import pytest
import torch

from train.eval import evaluate
from train.eval_fixtures import doc_stream, tiny_model
from train.adapters import DocLoRA
from train.chunked import ChunkedConfig
from train.forward import rows_nll
from train.ledger import LegalityError, ScoreLedger
from train.rows import build_rows, plan_doc_batches, split_docs
from train.schedules import ttt_batch
from train.scoring import make_state, take_score
from train.ttt_config import TTTConfig, recipe
from train.ttt_optim import BatchedAdam

pytestmark = pytest.mark.usefixtures("one_thread")

LENGTHS = [300, 50, 197, 1, 129, 64, 260, 5, 77, 140]  # awkward: 1-token doc, partial chunks, > window
CFG = TTTConfig(rank=4, chunk=32, window=96, batch_size=4, lr=0.01)
# chunked mode: the smallest legal chunk; stride 40 does not divide the window (96) or the chunk (2048),
# so sliding rows are cut at chunk boundaries; training windows (128) longer than the scoring window
CHUNKED = ChunkedConfig(chunk_tokens=2048, rank=4, epochs=2, lr=0.01, window=96, stride=40, train_len=128,
                        batch_seqs=4)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


@pytest.fixture(scope="module")
def stream():
    return doc_stream(LENGTHS, seed=5)


@pytest.fixture(scope="module")
def long_stream():
    # 4,932 tokens: 3 chunks of the chunked mode (2048, 2048, 835 targets; the last one never trained on)
    return doc_stream(LENGTHS * 4, seed=5)


def expected_targets(stream, per_doc=True):
    exp = torch.ones(stream.numel(), dtype=torch.bool)
    exp[0] = False
    if per_doc:
        exp[stream == 1] = False
    return exp


def run_ttt(model, stream, lut, scorer=ttt_batch, cfg=CFG, strict=False, hook=None):
    """Run a TTT scorer over every batch; return the state (ledger with per-position NLL)."""
    starts, ns = split_docs(stream)
    st = make_state(stream, lut, strict=strict, keep_nll=True)
    ad = DocLoRA(model, cfg, cfg.batch_size, stream.device, "bmm")
    opt = BatchedAdam(ad.params, cfg.lr, (cfg.beta1, cfg.beta2), cfg.eps)
    for i, docs in enumerate(plan_doc_batches(ns, cfg.batch_size)):
        kw = {"train_hook": hook} if hook is not None else {}
        scorer(model, stream, starts, ns, docs, cfg, ad, opt, st, i, **kw)
    return st


def run_chunked(model, stream, lut, strict=False, hook=None, cfg=CHUNKED):
    """The chunked mode through the driver; returns the state (ledger with per-position NLL)."""
    _, st = evaluate(model, stream, lut, mode="chunked", chunked=cfg, strict=strict, keep_nll=True,
                     return_state=True, backend="bmm", train_hook=hook)
    return st


# ------------------------------------------------------------------ illegal test doubles
def ttt_train_then_score(model, stream, starts, ns, docs, cfg, adapter, opt, st, batch_index=0, train_hook=None):
    """ILLEGAL: for each chunk, first take the Adam step on the chunk's loss, then score it."""
    s, n = starts[docs], ns[docs]
    adapter.reset(s)
    opt.reset()
    n_chunks = -(-n // cfg.chunk)
    for c in range(int(n_chunks.max())):
        live = np.flatnonzero(n_chunks > c)
        a = np.full(live.size, c * cfg.chunk)
        b = np.minimum(a + cfg.chunk, n[live])
        rb = build_rows(stream, np.stack([s[live], a, b], 1), cfg.window)
        adapter.set_rows(torch.from_numpy(live))
        nll = rows_nll(model, rb, adapter)
        st.ledger.require_scored(rb.pos, rb.mask)  # the driver's guard; the double ignores its verdict
        loss = (nll * rb.mask).sum() / rb.mask.sum()
        loss.backward()
        opt.step()
        with torch.no_grad():
            nll = rows_nll(model, rb, adapter)
        take_score(st, rb, nll)
    adapter.set_rows(None)


def ttt_two_epochs_overwrite(model, stream, starts, ns, docs, cfg, adapter, opt, st, batch_index=0, train_hook=None):
    """ILLEGAL: a legal pass, then a second epoch that re-scores every chunk (keeping the last score)."""
    ttt_batch(model, stream, starts, ns, docs, cfg, adapter, opt, st, batch_index)
    s, n = starts[docs], ns[docs]
    n_chunks = -(-n // cfg.chunk)
    for c in range(int(n_chunks.max())):  # epoch 2 with the adapters of epoch 1
        live = np.flatnonzero(n_chunks > c)
        a = np.full(live.size, c * cfg.chunk)
        b = np.minimum(a + cfg.chunk, n[live])
        rb = build_rows(stream, np.stack([s[live], a, b], 1), cfg.window)
        adapter.set_rows(torch.from_numpy(live))
        with torch.no_grad():
            nll = rows_nll(model, rb, adapter)
        take_score(st, rb, nll)
    adapter.set_rows(None)


def _chunk_rows(stream, s, n, c, cfg):
    live = np.flatnonzero(-(-n // cfg.chunk) > c)
    a = np.full(live.size, c * cfg.chunk)
    b = np.minimum(a + cfg.chunk, n[live])
    return live, build_rows(stream, np.stack([s[live], a, b], 1), cfg.window)


def _multi_epoch_ttt(model, stream, starts, ns, docs, cfg, adapter, opt, st, epochs, score_in_epoch):
    """Per-document TTT for ``epochs`` epochs over each document's chunks, an Adam step on every chunk in every
    epoch; chunk scores are stored (the ledger keeps the latest NLL per position) in the epochs
    ``score_in_epoch`` selects."""
    s, n = starts[docs], ns[docs]
    adapter.reset(s)
    opt.reset()
    for ep in range(epochs):
        for c in range(int((-(-n // cfg.chunk)).max())):
            live, rb = _chunk_rows(stream, s, n, c, cfg)
            adapter.set_rows(torch.from_numpy(live))
            nll = rows_nll(model, rb, adapter)
            if score_in_epoch(ep):
                take_score(st, rb, nll.detach())
            st.ledger.require_scored(rb.pos, rb.mask)  # the driver's guard; the doubles ignore its verdict
            ((nll * rb.mask).sum() / rb.mask.sum()).backward()
            opt.step()
    adapter.set_rows(None)


def pr713_score_final_epoch(model, stream, starts, ns, docs, cfg, adapter, opt, st, batch_index=0, train_hook=None,
                            epochs=3):
    """ILLEGAL (PR #713's pattern): per-document TTT for ``epochs`` epochs over each document's chunks,
    an Adam step on every chunk in every epoch; the scores are taken in the final epoch only. Each target
    is scored exactly once, but after the adapter was trained on the whole document, itself included."""
    _multi_epoch_ttt(model, stream, starts, ns, docs, cfg, adapter, opt, st, epochs, lambda ep: ep == epochs - 1)


def pr605_score_every_epoch_overwrite(model, stream, starts, ns, docs, cfg, adapter, opt, st, batch_index=0,
                                      train_hook=None, epochs=3):
    """ILLEGAL (PR #605's pattern): per-document multi-epoch TTT that scores every chunk in every epoch
    (score, then step: each epoch on its own is score-first) and overwrites the stored score, so the
    reported score of a target is the last epoch's, taken after training on it and on later tokens."""
    _multi_epoch_ttt(model, stream, starts, ns, docs, cfg, adapter, opt, st, epochs, lambda ep: True)


ILLEGAL = [ttt_train_then_score, ttt_two_epochs_overwrite, pr713_score_final_epoch, pr605_score_every_epoch_overwrite]


# ------------------------------------------------------------------ the checks (reusable on any scorer)
def check_coverage(st, exp):
    c = st.ledger.count[:-1]
    assert int(c[exp].min()) == 1 and int(c[exp].max()) == 1, "a target was scored 0 or >1 times"
    assert int(c[~exp].sum()) == 0, "a non-target (BOS or position 0) was scored"
    assert st.acc.n_targets == int(exp.sum())
    st.ledger.check(exp)


def check_causality(model, stream, lut, scorer, t_cut, runner=None):
    """Scores of targets at stream positions <= t_cut must not change when tokens after t_cut change.
    ``runner(model, stream, lut) -> state`` (default: ``run_ttt`` with ``scorer``)."""
    runner = runner or (lambda m, s, l: run_ttt(m, s, l, scorer))
    st0 = runner(model, stream, lut)
    pert = stream.clone()
    g = torch.Generator().manual_seed(11)
    tail = pert[t_cut + 1:]
    repl = torch.randint(4, 1024, tail.shape, generator=g)
    pert[t_cut + 1:] = torch.where(tail == 1, tail, repl)  # keep BOS (document boundaries) in place
    st1 = runner(model, pert, lut)
    a = st0.ledger.nll[: t_cut + 1]
    b = st1.ledger.nll[: t_cut + 1]
    scored = ~torch.isnan(a)
    assert bool(scored.any())
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    diff = (a[scored] - b[scored]).abs().max().item()
    assert diff == 0.0, f"scores of targets <= {t_cut} changed by {diff} when later tokens changed"
    # and the perturbation did change later scores (the test can fail)
    later = ~torch.isnan(st0.ledger.nll[t_cut + 1:-1])
    assert (st0.ledger.nll[t_cut + 1:-1][later] != st1.ledger.nll[t_cut + 1:-1][later]).any()


# ------------------------------------------------------------------ (1) coverage
@pytest.mark.parametrize("mode", ["ttt", "base", "flat", "sliding", "chunked"])
def test_coverage_every_mode(model, stream, long_stream, lut, mode):
    if mode == "chunked":
        stream = long_stream
    rep, st = evaluate(model, stream, lut, mode=mode, cfg=CFG, stride=23, strict=True, keep_nll=True,
                       return_state=True, backend="bmm", chunked=CHUNKED)
    if mode == "chunked":
        assert rep["chunks"] == 3 and rep["chunks_trained"] == 2 and rep["train_steps"] > 0
    exp = expected_targets(stream, per_doc=mode in ("ttt", "base"))
    check_coverage(st, exp)
    assert rep["targets"] == int(exp.sum())
    want_bytes = int(lut.target_bytes(stream[:-1], stream[1:])[exp[1:]].sum())
    assert rep["bytes"] == want_bytes
    assert math.isclose(rep["val_bpb"], st.acc.loss_sum / math.log(2) / want_bytes, rel_tol=1e-12)
    assert rep["legality"]["missing"] == 0 and rep["legality"]["double_scored"] == 0


def test_coverage_two_simulated_ranks(model, stream, lut):
    """Two disjoint shares cover every target exactly once; summed they give the one-rank BPB."""
    full, st_full = evaluate(model, stream, lut, mode="ttt", cfg=CFG, keep_nll=True, return_state=True, backend="bmm")
    parts = [evaluate(model, stream, lut, mode="ttt", cfg=CFG, share=(k, 2), keep_nll=True, return_state=True,
                      backend="bmm")
             for k in range(2)]
    count = parts[0][1].ledger.count + parts[1][1].ledger.count
    exp = expected_targets(stream)
    assert torch.equal(count[:-1], exp.to(torch.int32))
    sums = parts[0][1].acc.sums + parts[1][1].acc.sums
    assert int(sums[2]) == full["targets"] and int(sums[1]) == full["bytes"]
    bpb2 = float(sums[0] / math.log(2) / sums[1])
    assert abs(bpb2 - full["val_bpb"]) <= 1e-9 * full["val_bpb"]
    # each document's scores are the same whichever share ran it
    nll2 = torch.where(parts[0][1].ledger.count > 0, parts[0][1].ledger.nll, parts[1][1].ledger.nll)
    m = exp
    torch.testing.assert_close(nll2[:-1][m], st_full.ledger.nll[:-1][m], rtol=1e-6, atol=1e-6)


def test_ledger_unit():
    led = ScoreLedger(10, strict=True)
    pos = torch.tensor([[1, 2, 3]])
    led.record(pos, torch.tensor([[True, True, False]]))
    with pytest.raises(LegalityError, match="more than once"):
        led.record(torch.tensor([[2]]), torch.tensor([[True]]))
    with pytest.raises(LegalityError, match="not scored"):
        led.require_scored(torch.tensor([[3]]), torch.tensor([[True]]))
    led.require_scored(pos[:, :2], torch.tensor([[True, True]]))
    lazy = ScoreLedger(10)
    lazy.record(torch.tensor([[4, 4]]), torch.tensor([[True, True]]))  # duplicate inside one call
    with pytest.raises(LegalityError, match="double_scored"):
        lazy.check()
    lazy2 = ScoreLedger(5)
    lazy2.record(torch.tensor([[1, 2]]), torch.tensor([[True, True]]))
    with pytest.raises(LegalityError, match="missing"):
        lazy2.check(torch.tensor([False, True, True, True, False]))


# ------------------------------------------------------------------ (2) causality
def mid_chunk_cut(stream, doc_rank, chunk_idx):
    """A stream position in the middle of chunk ``chunk_idx`` of the ``doc_rank``-th longest document
    (a cut on a chunk boundary would not exercise 'trained on, then scored' within a chunk)."""
    starts, ns = split_docs(stream)
    k = int(np.argsort(-ns, kind="stable")[doc_rank])
    t = min(int(ns[k]) - 2, chunk_idx * CFG.chunk + CFG.chunk // 2)
    return int(starts[k]) + 1 + t


@pytest.mark.parametrize("doc_rank,chunk_idx", [(0, 0), (0, 4), (2, 1), (4, 2)])
def test_causality_ttt(model, stream, lut, doc_rank, chunk_idx):
    check_causality(model, stream, lut, ttt_batch, mid_chunk_cut(stream, doc_rank, chunk_idx))


def test_causality_other_documents(model, stream, lut):
    """A document's scores do not depend on any other document (batch mates included)."""
    starts, ns = split_docs(stream)
    k = int(np.argmax(ns))  # the longest doc: its batch mates are other long docs
    s, e = int(starts[k]), int(starts[k] + ns[k] + 1)
    st0 = run_ttt(model, stream, lut)
    pert = stream.clone()
    g = torch.Generator().manual_seed(2)
    other = torch.ones_like(pert, dtype=torch.bool)
    other[s:e] = False
    other &= pert != 1
    pert[other] = torch.randint(4, 1024, (int(other.sum()),), generator=g)
    st1 = run_ttt(model, pert, lut)
    assert torch.equal(st0.ledger.nll[s + 1:e], st1.ledger.nll[s + 1:e])
    out = torch.ones(stream.numel(), dtype=torch.bool)
    out[s:e] = False
    a, b = st0.ledger.nll[:-1][out], st1.ledger.nll[:-1][out]
    assert not torch.equal(a[~a.isnan()], b[~b.isnan()])  # the other documents' scores did change


@pytest.mark.parametrize("t_cut", [1000, 2049, 3100, 4097, 4600])
def test_causality_chunked(model, long_stream, lut, t_cut):
    """Cuts inside chunk 0, on the first target of chunk 1, inside chunk 1 (after the adapter was trained
    on chunk 0), right at chunk 2's start and inside the last chunk: earlier scores never move."""
    check_causality(model, long_stream, lut, None, t_cut, runner=run_chunked)


@pytest.mark.parametrize("illegal", [ttt_train_then_score, pr713_score_final_epoch, pr605_score_every_epoch_overwrite],
                         ids=lambda f: f.__name__)
def test_causality_catches_illegal_doubles(model, stream, lut, illegal):
    with pytest.raises(AssertionError, match="changed"):
        check_causality(model, stream, lut, illegal, mid_chunk_cut(stream, 2, 1))


# ------------------------------------------------------------------ (3) score before update
def test_score_before_update_instrumented(model, stream, lut):
    """Every training loss uses only targets already in the ledger, and each optimizer step's targets
    were scored by an earlier (or the same) forward; the last chunk of a document is never trained on."""
    starts, ns = split_docs(stream)
    steps = []

    def hook(rb, tmask, loss):
        st = hook.st
        c = st.ledger.count[rb.pos[tmask]]
        steps.append((int(tmask.sum()), int(c.min()) if c.numel() else 1))
        # last chunk of each document excluded
        last = torch.from_numpy(starts + ns)  # stream position of each document's last target
        assert not torch.isin(rb.pos[tmask], last).any()

    st = make_state(stream, lut, strict=True, keep_nll=True)
    hook.st = st
    ad = DocLoRA(model, CFG, CFG.batch_size, "cpu", "bmm")
    opt = BatchedAdam(ad.params, CFG.lr, (CFG.beta1, CFG.beta2))
    for i, docs in enumerate(plan_doc_batches(ns, CFG.batch_size)):
        ttt_batch(model, stream, starts, ns, docs, CFG, ad, opt, st, i, train_hook=hook)
    assert steps and all(mn == 1 for _, mn in steps)
    assert sum(n for n, _ in steps) > 0
    assert st.ledger.n_train_checks == len(steps)


def test_score_before_update_chunked(model, long_stream, lut):
    """Chunked mode: every training step's targets were scored (exactly once) before the step, they all
    lie in the chunk scored last (no later chunk scored yet), every target of a trained chunk is trained
    on exactly ``epochs`` times, and the last chunk never."""
    from train.chunked import chunked_ttt

    N = long_stream.numel()
    C = CHUNKED.chunk_tokens
    st = make_state(long_stream, lut, strict=True)
    used = torch.zeros(N, dtype=torch.int64)
    steps = []

    def hook(rb, mask, loss):
        cnt = st.ledger.count
        p = rb.pos[mask]
        assert int(cnt[p].min()) == 1 and int(cnt[p].max()) == 1
        # chunk c holds the targets at stream positions c*C+1 .. (c+1)*C
        c = (int(p.max()) - 1) // C
        assert int(p.min()) > c * C, "a training step mixes chunks"
        assert int(cnt[(c + 1) * C + 1:N].sum()) == 0, "a later chunk was scored before this training step"
        used.index_add_(0, p, torch.ones_like(p))
        steps.append(c)

    chunked_ttt(model, long_stream, CHUNKED, st, backend="bmm", train_hook=hook)
    st.ledger.check()
    n_chunks = -(-(N - 1) // C)
    assert sorted(set(steps)) == list(range(n_chunks - 1))  # every chunk but the last is trained on
    trained = torch.zeros(N, dtype=torch.bool)
    trained[1:(n_chunks - 1) * C + 1] = True
    assert bool((used[trained] == CHUNKED.epochs).all())  # each trained target in exactly `epochs` steps
    assert int(used[~trained].sum()) == 0  # the last chunk (and position 0) never
    assert st.ledger.n_train_checks == len(steps)


def test_score_before_update_catches_train_then_score(model, stream, lut):
    with pytest.raises(LegalityError, match="not scored"):
        run_ttt(model, stream, lut, ttt_train_then_score, strict=True)
    st = run_ttt(model, stream, lut, ttt_train_then_score, strict=False)
    assert int(st.ledger.trained_unscored) > 0
    with pytest.raises(LegalityError, match="trained_unscored"):
        st.ledger.check(expected_targets(stream))


# ------------------------------------------------------------------ (4) full softmax
@pytest.mark.parametrize("kind", ["per_document", "chunked_shared"])
def test_full_softmax_and_scorer_matches_model_forward(model, stream, lut, kind):
    """The scorer's NLL is -log of a distribution normalized over the full vocabulary, and equals
    GPT.forward's own cross-entropy (with the same adapter) at the scored positions. ``chunked_shared``:
    the chunked mode's adapter (one Q/V LoRA for every row)."""
    starts, ns = split_docs(stream)
    if kind == "per_document":
        ad = DocLoRA(model, CFG, CFG.batch_size, "cpu", "bmm")
    else:
        ad = DocLoRA(model, TTTConfig(rank=CHUNKED.rank, targets=("q", "v"), chunk=1, window=CFG.window, batch_size=1),
                     1, "cpu", "bmm")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ad.params:  # non-zero adapters: the LoRA path is exercised
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    docs = plan_doc_batches(ns, CFG.batch_size)[0]
    rows = np.stack([starts[docs], np.full(len(docs), 32), np.minimum(64, ns[docs])], 1)
    rows = rows[rows[:, 1] < rows[:, 2]]
    rb = build_rows(stream, rows, CFG.window)
    ad.set_rows(None)
    with torch.no_grad():
        nll = rows_nll(model, rb, ad)
        logits = model(rb.x, None, ad)  # (R, L, V) soft-capped logits from the model's own head
    logp = torch.log_softmax(logits.double(), -1)
    tot = logp.exp().sum(-1)
    assert torch.allclose(tot, torch.ones_like(tot), atol=1e-12)
    ref = -torch.gather(logp, 1, rb.sel[..., None].expand(-1, -1, logp.size(-1))).gather(2, rb.y[..., None]).squeeze(-1)
    m = rb.mask
    torch.testing.assert_close(nll[m].double(), ref[m], rtol=1e-5, atol=1e-5)
    # and equals GPT.forward's NLL with targets
    tgt = torch.zeros_like(rb.x)
    tgt.scatter_(1, rb.sel, rb.y)
    with torch.no_grad():
        fwd = model(rb.x, tgt, ad)
    torch.testing.assert_close(nll[m], fwd.gather(1, rb.sel)[m], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ (5) single pass
def test_single_pass_catches_second_epoch(model, stream, lut):
    with pytest.raises(LegalityError, match="more than once"):
        run_ttt(model, stream, lut, ttt_two_epochs_overwrite, strict=True)
    st = run_ttt(model, stream, lut, ttt_two_epochs_overwrite, strict=False)
    with pytest.raises(AssertionError, match="0 or >1"):
        check_coverage(st, expected_targets(stream))
    with pytest.raises(LegalityError, match="double_scored"):
        st.ledger.check(expected_targets(stream))


def test_pr713_double_is_flagged(model, stream, lut):
    """PR #713's pattern scores each target exactly once, so the coverage counts alone pass; the
    train-before-score check flags it (strict: at the first step of epoch 1; lenient: at the end), and
    test_causality_catches_illegal_doubles shows its scores depend on later tokens."""
    with pytest.raises(LegalityError, match="not scored"):
        run_ttt(model, stream, lut, pr713_score_final_epoch, strict=True)
    st = run_ttt(model, stream, lut, pr713_score_final_epoch, strict=False)
    exp = expected_targets(stream)
    c = st.ledger.count[:-1]
    assert bool((c[exp] == 1).all()) and int(c[~exp].sum()) == 0  # counts look perfect...
    assert int(st.ledger.trained_unscored) > 0                   # ...but training came before scoring
    with pytest.raises(LegalityError, match="trained_unscored"):
        st.ledger.check(exp)


def test_pr605_double_is_flagged(model, stream, lut):
    """PR #605's pattern: every epoch re-scores and overwrites. The ledger's double-score check, the
    coverage counts and the final BPB's target count all show it; the stored score is the last epoch's."""
    with pytest.raises(LegalityError, match="more than once"):
        run_ttt(model, stream, lut, pr605_score_every_epoch_overwrite, strict=True)
    st = run_ttt(model, stream, lut, pr605_score_every_epoch_overwrite, strict=False)
    exp = expected_targets(stream)
    with pytest.raises(AssertionError, match="0 or >1"):
        check_coverage(st, exp)
    assert int(st.ledger.count[:-1][exp].min()) == 3  # 3 epochs: every target scored 3 times
    assert st.acc.n_targets == 3 * int(exp.sum())
    with pytest.raises(LegalityError, match="double_scored"):
        st.ledger.check(exp)
    legal = run_ttt(model, stream, lut, ttt_batch, strict=True)
    # the overwrite kept later-epoch scores (lower: the adapter had trained on these very tokens)
    assert st.ledger.nll[:-1][exp].mean() < legal.ledger.nll[:-1][exp].mean()


def test_scores_enter_only_through_the_ledger():
    """Structural guarantee (every eval module of ``train``): the BPB sums are added to only inside
    ``take_score``, which records in the ledger first; ``take_score`` is called only by ``score_rows``
    and ``_step_body`` (the device work of the TTT step of both schedules, run by ``_ttt_step`` eagerly
    or replayed from a CUDA graph that ``train.graphs`` captured of it); the chunked mode scores only via ``score_rows``
    and that call precedes its training loop; no scorer assigns/overwrites the BPB sums. A new scoring
    path (or a new eval module) must update these lists."""
    import ast
    import importlib
    import inspect
    import pkgutil

    import train

    eval_mods = ("adapters", "chunked", "doc_queue", "eval", "forward", "graphs", "ledger", "phased", "rows",
                 "schedules", "scoring", "ttt_config", "ttt_optim", "warmup")
    mods = {n: importlib.import_module(f"train.{n}") for n in eval_mods}
    # every train module that imports a scorer is in the list (a new scoring module cannot slip past)
    for info in pkgutil.iter_modules(train.__path__):
        src = inspect.getsource(importlib.import_module(f"train.{info.name}"))
        if any(k in src for k in ("take_score", "score_rows", "ScoreLedger")):
            assert info.name in eval_mods, f"train.{info.name} scores but is not pinned here"
    callers = {"take_score": set(), "add": set(), "record": set(), "score_rows": set()}
    for mod in mods.values():
        tree = ast.parse(inspect.getsource(mod))
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Call):
                    name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                    if name == "add" and "acc" not in ast.unparse(node.func):
                        continue  # set.add, store.add, ...
                    if name in callers:
                        callers[name].add(fn.name)
                if isinstance(node, (ast.Assign, ast.AugAssign)):
                    tgts = node.targets if isinstance(node, ast.Assign) else [node.target]
                    for t in tgts:
                        assert "acc.sums" not in ast.unparse(t) or fn.name == "__init__", f"{fn.name} writes BPB sums"
    assert callers["add"] == {"take_score"} and callers["record"] == {"take_score"}
    assert callers["take_score"] == {"score_rows", "_step_body"}  # _step_body: the one TTT step (batch and rolling)
    # next_batch: DocQueue's per-batch step (base scoring past the deadline); warmup, _warm_shapes: synthetic tokens
    assert callers["score_rows"] == {"chunked_ttt", "evaluate", "next_batch", "warmup", "_warm_shapes"}
    src = inspect.getsource(mods["chunked"].chunked_ttt)
    assert src.index("score_rows(") < src.index(".backward(")
    assert src.count("score_rows(") == 1
    src = inspect.getsource(mods["schedules"]._step_body)
    assert src.index("take_score(") < src.index(".backward(")
    src = inspect.getsource(mods["schedules"]._ttt_step)  # the body eagerly, or the captured body's replay
    assert "_step_body(" in src and "graphs.replay(" in src and "take_score(" not in src and ".backward(" not in src
    # the graphs run the same body (warm-up on a scratch ledger, capture, or the eager bucketed form)
    src = inspect.getsource(mods["graphs"])
    assert "_step_body(" in src and "take_score(" not in src and ".backward(" not in src
    for sched in (mods["schedules"].ttt_batch, mods["schedules"].ttt_rolling):  # both step only through _ttt_step
        src = inspect.getsource(sched)
        assert "_ttt_step(" in src and "take_score(" not in src and ".backward(" not in src


def test_legal_scorer_passes_every_check(model, stream, lut):
    st = run_ttt(model, stream, lut, ttt_batch, strict=True)
    check_coverage(st, expected_targets(stream))
    assert int(st.ledger.trained_unscored) == 0


@pytest.mark.parametrize("illegal", ILLEGAL, ids=lambda f: f.__name__)
def test_every_illegal_double_is_caught_by_ledger_check(model, stream, lut, illegal):
    st = run_ttt(model, stream, lut, illegal, strict=False)
    with pytest.raises(LegalityError):
        st.ledger.check(expected_targets(stream))


def test_document_scores_do_not_depend_on_batching(model, stream, lut):
    """Per-document independence (the loss is a sum of per-document means, Adam is elementwise,
    adapters are per document): batch size 1, 3 and 4 give the same per-target scores. This is what
    makes the BPB independent of the number of ranks and of which rank claimed which batch."""
    import dataclasses

    nll = {}
    for bs in (1, 3, 4):
        cfg = dataclasses.replace(CFG, batch_size=bs)
        _, st = evaluate(model, stream, lut, mode="ttt", cfg=cfg, keep_nll=True, return_state=True, backend="bmm")
        nll[bs] = st.ledger.nll[:-1]
    m = expected_targets(stream)
    for bs in (3, 4):
        torch.testing.assert_close(nll[bs][m], nll[1][m], rtol=1e-5, atol=1e-5)


def test_single_forward_scoring_equals_separate_no_grad_pass(model, stream, lut):
    """The default scores a chunk from the (detached) NLL of the forward that also trains; the literal
    recipe runs a no-grad forward to score, then a second forward for the update. Same scores."""
    import dataclasses

    st1 = run_ttt(model, stream, lut, cfg=CFG, strict=True)
    st2 = run_ttt(model, stream, lut, cfg=dataclasses.replace(CFG, separate_score_pass=True), strict=True)
    m = expected_targets(stream)
    torch.testing.assert_close(st1.ledger.nll[:-1][m], st2.ledger.nll[:-1][m], rtol=1e-6, atol=1e-6)
    assert st1.acc.n_targets == st2.acc.n_targets


# ------------------------------------------------------------------ rolling schedule
@pytest.mark.parametrize("bs", [2, 3], ids=lambda b: f"rows{b}")
def test_rolling_schedule_same_scores_as_batches(model, stream, lut, bs):
    """--schedule rolling (rows refilled as documents finish; per-row Adam step counts): every target
    scored once, the strict ledger passes, and each document's scores equal the batch schedule's --
    the per-document computation is the same, only the company in each forward changes."""
    import dataclasses

    nll = {}
    for sched in ("batch", "rolling"):
        cfg = dataclasses.replace(CFG, batch_size=bs, schedule=sched)
        rep, st = evaluate(model, stream, lut, mode="ttt", cfg=cfg, keep_nll=True, return_state=True, backend="bmm",
                           strict=True)
        check_coverage(st, expected_targets(stream))
        assert int(st.ledger.trained_unscored) == 0 and rep["docs_ttt"] == len(LENGTHS)
        assert rep["schedule"] == sched
        nll[sched] = st.ledger.nll[:-1]
    m = expected_targets(stream)
    torch.testing.assert_close(nll["rolling"][m], nll["batch"][m], rtol=1e-5, atol=1e-5)


def test_rolling_schedule_is_causal(model, stream, lut):
    import dataclasses

    cfg = dataclasses.replace(CFG, batch_size=2, schedule="rolling")

    def runner(m, s, l):
        _, st = evaluate(m, s, l, mode="ttt", cfg=cfg, keep_nll=True, return_state=True, backend="bmm")
        return st

    starts, _ = split_docs(stream)
    check_causality(model, stream, lut, None, int(starts[2]) + 40, runner=runner)


def test_rolling_needs_per_row_adam(model, stream, lut):
    from train.schedules import ttt_rolling

    starts, ns = split_docs(stream)
    ad = DocLoRA(model, CFG, 2, stream.device, "bmm")
    with pytest.raises(ValueError, match="per_row"):
        ttt_rolling(model, stream, starts, ns, lambda: None, CFG, ad, BatchedAdam(ad.params, 0.01),
                    make_state(stream, lut))
    with pytest.raises(ValueError, match="schedule"):
        TTTConfig(schedule="greedy")
    with pytest.raises(ValueError, match="same dim 0"):
        BatchedAdam([torch.zeros(2, 3), torch.zeros(3, 3)], 0.01, per_row=True)
    with pytest.raises(ValueError, match="same length"):
        ad.reset_rows([0, 1], [5])
    with pytest.raises(ValueError, match="distinct adapter rows"):
        ad.reset_rows([0, 2], [5, 6])
    with pytest.raises(ValueError, match="per_row=True"):
        BatchedAdam(ad.params, 0.01).reset_rows([0])
    from train.forward import compile_rows_nll

    with pytest.raises(TypeError, match="train.model.GPT"):
        compile_rows_nll(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------ the records' recipe options
# tiny shapes of the records' preset (rank 96 -> 4, chunk 48 -> 32, window 2048 -> 96, 2000 phase docs -> 7):
# q/k/v/o/mlp/head adapters with alpha, AdamW beta1 = 0 with weight decay, warm-start A, 3 phases with
# global SGD passes (chunks of 128 targets, so every pass takes steps)
RECIPE = recipe("records", rank=4, alpha=6.0, chunk=32, window=96, batch_size=3, phase_docs=7, global_seq_len=64,
                global_chunk_tokens=128, global_batch_seqs=4)
RECIPE_VARIANTS = {
    "records": RECIPE,
    "targets-all-alpha": TTTConfig(rank=4, targets=("q", "k", "v", "o", "mlp", "up", "down", "head"), alpha=8.0,
                                   chunk=32, window=96, batch_size=4),
    "adamw-beta1-0": TTTConfig(rank=4, chunk=32, window=96, batch_size=4, optimizer="adamw", beta1=0.0, beta2=0.999,
                               eps=1e-10, weight_decay=1.0, lr=1e-3),
    "warm-start-a": TTTConfig(rank=4, chunk=32, window=96, batch_size=4, warm_start_a=True),
    "phases-per-phase": dataclasses.replace(RECIPE, phase_cumulative=False, warm_start_a=False),
    "records-rolling": dataclasses.replace(RECIPE, schedule="rolling"),
    # the scored forward through the fused q/k norm + rotary and the fused MLP ops (their torch paths here: the
    # interpreter took 42 s for this run; the kernels' math is tested in their own files)
    "records-fused-qk-mlp": dataclasses.replace(RECIPE, fused_qk=True, fused_mlp=True),
}


def run_recipe(model, stream, lut, cfg=RECIPE, strict=True, hook=None):
    """A recipe run through the driver on a copy of the model (phased TTT moves the base weights)."""
    rep, st = evaluate(copy.deepcopy(model), stream, lut, mode="ttt", cfg=cfg, strict=strict, keep_nll=True,
                       return_state=True, backend="bmm", train_hook=hook)
    return rep, st


@pytest.mark.parametrize("name", list(RECIPE_VARIANTS))
def test_coverage_recipe_options(model, stream, lut, name, monkeypatch):
    """Every new option: every target scored exactly once, nothing trained (per document or globally)
    before its score, the BPB sums match the ledger."""
    cfg = RECIPE_VARIANTS[name]
    if cfg.fused_qk or cfg.fused_mlp:
        from pgolf_kernels import head_norm_rope, linear_act

        for m in (head_norm_rope, linear_act):
            monkeypatch.setattr(m, "use_triton", lambda t: False)
    rep, st = run_recipe(model, stream, lut, cfg)
    exp = expected_targets(stream)
    check_coverage(st, exp)
    assert rep["targets"] == int(exp.sum()) and rep["docs_ttt"] == len(LENGTHS) and rep["docs"] == len(LENGTHS)
    assert rep["legality"]["trained_unscored"] == 0 and rep["legality"]["global_unscored"] == 0
    if cfg.phases:
        assert len(rep["phases"]) == cfg.phases and all(p["steps"] > 0 for p in rep["phases"])
        assert st.ledger.n_global_checks > 0


@pytest.mark.parametrize("cumulative", [True, False], ids=["cumulative", "per-phase"])
def test_global_pass_uses_only_scored_phases(model, stream, lut, cumulative):
    """At every global step: the documents scored so far are exactly phases 0..p (no later phase and none
    of the rest has a single score yet), every target of the step was scored exactly once, and the step's
    documents are those of phases 0..p (cumulative) or of phase p alone."""
    from train.phased import phase_plan

    cfg = dataclasses.replace(RECIPE, phase_cumulative=cumulative)
    starts, ns = split_docs(stream)
    groups = phase_plan(ns, cfg.phase_docs, cfg.phases)
    span = {}
    for d in range(len(ns)):
        span[d] = (int(starts[d]) + 1, int(starts[d]) + 1 + int(ns[d]))
    seen_phases = []
    box = {}

    def hook(rb, mask, loss):
        cnt = box["st"].ledger.count
        scored = {d for d, (a, b) in span.items() if int(cnt[a:b].sum()) > 0}
        p = next(i for i in range(cfg.phases) if scored == set(np.concatenate(groups[:i + 1]).tolist()))
        pos = rb.pos[mask]
        assert int(cnt[pos].min()) == 1 and int(cnt[pos].max()) == 1
        step_docs = {d for d, (a, b) in span.items() if bool(((pos >= a) & (pos < b)).any())}
        allowed = set(np.concatenate(groups[:p + 1] if cumulative else [groups[p]]).tolist())
        assert step_docs <= allowed
        seen_phases.append(p)

    import train.eval as ev_mod

    real = ev_mod.make_state

    def grab(*a, **k):
        box["st"] = real(*a, **k)
        return box["st"]

    ev_mod.make_state = grab
    try:
        run_recipe(model, stream, lut, cfg, hook=hook)
    finally:
        ev_mod.make_state = real
    assert sorted(set(seen_phases)) == list(range(cfg.phases))


def test_planted_global_pass_on_unscored_phase_is_caught(model, stream, lut, monkeypatch):
    """ILLEGAL double: after phase p the global pass trains on phase p+1's documents (not scored yet).
    The ledger's global check raises at once (strict) or fails the final check; the legal run passes."""
    import train.eval as ev_mod
    from train.phased import phase_plan

    starts, ns = split_docs(stream)
    groups = phase_plan(ns, RECIPE.phase_docs, RECIPE.phases)
    real = ev_mod.global_rows

    def next_phase_rows(starts_, ns_, docs, seq_len):
        p = next(i for i in range(RECIPE.phases) if set(groups[i].tolist()) <= set(docs.tolist())
                 and not (set(groups[i + 1].tolist()) & set(docs.tolist())))
        return real(starts_, ns_, groups[p + 1], seq_len)  # the phase that has not been scored yet

    monkeypatch.setattr(ev_mod, "global_rows", next_phase_rows)
    with pytest.raises(LegalityError, match="global step .* not scored"):
        run_recipe(model, stream, lut, RECIPE, strict=True)
    with pytest.raises(LegalityError, match="global_unscored"):
        run_recipe(model, stream, lut, RECIPE, strict=False)
    monkeypatch.setattr(ev_mod, "global_rows", real)
    run_recipe(model, stream, lut, RECIPE, strict=True)


def test_phased_causality_in_scoring_order(model, stream, lut):
    """Phased TTT: perturbing the tail of a phase-1 document leaves every phase-0 score and that
    document's own scores up to the cut unchanged; it does move later phases' scores (the global pass
    after phase 1 trained on it), so the check can fail."""
    from train.phased import phase_plan

    starts, ns = split_docs(stream)
    groups = phase_plan(ns, RECIPE.phase_docs, RECIPE.phases)
    d = int(groups[1][0])
    cut = int(starts[d]) + 1 + int(ns[d]) // 2
    _, st0 = run_recipe(model, stream, lut)
    pert = stream.clone()
    g = torch.Generator().manual_seed(3)
    e = int(starts[d]) + 1 + int(ns[d])
    pert[cut + 1:e] = torch.randint(4, 1024, (e - cut - 1,), generator=g)
    _, st1 = run_recipe(model, pert, lut)

    def pos_of(docs):
        return torch.cat([torch.arange(int(starts[k]) + 1, int(starts[k]) + 1 + int(ns[k])) for k in docs])

    keep = torch.cat([pos_of(groups[0]), torch.arange(int(starts[d]) + 1, cut + 1)])
    assert torch.equal(st0.ledger.nll[keep], st1.ledger.nll[keep])
    later = pos_of(np.concatenate([groups[2], groups[3]]))
    assert not torch.equal(st0.ledger.nll[later], st1.ledger.nll[later])


def test_phased_pins():
    """Structural: the global pass checks every micro-batch with the ledger before its backward and never
    scores; the driver runs a phase's global pass only after that phase's queue has run."""
    import inspect

    import train.eval as ev_mod
    import train.phased as ph

    src = inspect.getsource(ph.global_pass)
    assert src.index("share_counts(") < src.index("require_scored_global(") < src.index(".backward(")
    assert "take_score(" not in src and "score_rows(" not in src and ".record(" not in src
    src = inspect.getsource(ev_mod._score_documents)
    assert src.index("q.run()") < src.index("global_pass(")
