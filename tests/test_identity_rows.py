"""``DocLoRA(identity_rows=True)``: under the batch schedule every row map is the prefix 0..R-1, so the adapters are
sliced instead of gathered and their gradients written instead of index-added. Same scores and gradients as the
row-map path, bit for bit (fp32, CPU; both backends), through one step and through ``evaluate``; a map that is not a
prefix is refused on the host before any work."""
import dataclasses

import numpy as np
import pytest
import torch

from tests.test_fused_mlp import ALL, batch, step_model
from train.adapters import DocLoRA, identity_rows_for
from train.eval_fixtures import doc_stream, tiny_model
from train.forward import rows_nll
from train.ttt_config import TTTConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _step(model, rb, cfg, n_docs, backend, identity):
    ad = DocLoRA(model, cfg, n_docs, torch.device("cpu"), backend, identity_rows=identity)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ad.params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    ad.set_rows(torch.arange(rb.x.shape[0]))
    nll = rows_nll(model, rb, ad)
    (nll * rb.mask).sum().backward()
    return nll.detach(), [p.grad.clone() for p in ad.params], ad


@pytest.mark.parametrize("backend,targets,res", [("bmm", ALL, False), ("kernel", ("q", "k", "v", "o", "mlp", "head"),
                                                                        True)])
def test_identity_rows_equal_the_row_map_bitwise(backend, targets, res):
    """4 forward rows on 6 adapter rows (the last 2 get no row, so their gradients must be zero): same NLL and every
    adapter gradient bit for bit; the adapters of rows 4 and 5 get exactly zero."""
    model = step_model()
    cfg = TTTConfig(rank=8, chunk=16, window=64, batch_size=6, alpha=12.0, targets=targets, fused_residual=res)
    rb = batch(vocab=model.config.vocab_size)
    a_nll, a_g, ad = _step(model, rb, cfg, 6, backend, True)
    b_nll, b_g, _ = _step(model, rb, cfg, 6, backend, False)
    assert ad.identity_rows and ad._index(rb.x) is None
    assert torch.equal(a_nll, b_nll)
    for x, y in zip(a_g, b_g):
        assert torch.equal(x, y)
        assert float(x[4:].abs().sum()) == 0.0


def test_eval_batch_schedule_with_identity_rows_scores_as_the_row_map(monkeypatch):
    """evaluate() (batch schedule: identity rows) against the same eval with the row map read as a map: same targets,
    ledger and BPB."""
    from tests.test_graphs import RECORDS_LIKE, _lut
    import train.eval as ev

    stream = doc_stream([300, 1, 77, 140, 33], seed=5)
    lut = _lut(tiny_model(seed=3).config.vocab_size)
    cfg = dataclasses.replace(RECORDS_LIKE, fused_qk=False)
    assert identity_rows_for(cfg) and not identity_rows_for(dataclasses.replace(cfg, schedule="rolling"))
    on = ev.evaluate(tiny_model(seed=3), stream, lut, mode="ttt", cfg=cfg, backend="bmm")
    monkeypatch.setattr(ev, "identity_rows_for", lambda c: False)
    off = ev.evaluate(tiny_model(seed=3), stream, lut, mode="ttt", cfg=cfg, backend="bmm")
    assert on["targets"] == off["targets"] and on["legality"] == off["legality"]
    assert on["val_bpb"] == off["val_bpb"]


def test_a_map_that_is_not_a_prefix_is_refused():
    """With identity rows, a host row map other than 0..R-1 is refused by the adapter (the eager step) and by the
    graphs' staging; without, it is accepted."""
    from tests.test_graphs import CFG, LENGTHS, _lut
    from train.graphs import StepGraphs
    from train.rows import split_docs
    from train.scoring import make_state
    from train.ttt_optim import optimizer_for

    model = tiny_model(seed=3)
    ad = DocLoRA(model, CFG, CFG.batch_size, "cpu", "bmm", identity_rows=True)
    ad.check_row_map(np.arange(3))
    with pytest.raises(RuntimeError, match=r"row map \[3, 0, 5\] is not the prefix 0..2"):
        ad.check_row_map(np.array([3, 0, 5]))
    DocLoRA(model, CFG, CFG.batch_size, "cpu", "bmm").check_row_map(np.array([3, 0, 5]))
    stream = doc_stream(LENGTHS, seed=5)
    g = StepGraphs(model, ad, optimizer_for(ad.params, CFG, per_row=True), CFG,
                   make_state(stream, _lut(model.config.vocab_size)), capture=False)
    starts, _ = split_docs(stream)
    rows = np.array([[starts[0], 0, 32], [starts[2], 32, 64], [starts[4], 0, 17]])
    with pytest.raises(RuntimeError, match="is not the prefix"):
        g.stage(stream, rows, np.array([3, 0, 5]), np.array([True, False, True]))
    g.stage(stream, rows, np.arange(3), np.array([True, False, True]))
