"""``TTTConfig.tail_block``: the last block at the scored positions only (``GPT.hidden(..., keep=)``) gives the
scores and adapter gradients of the full forward (fp32, CPU), through ``rows_nll`` and through ``evaluate``."""
import dataclasses
import re

import numpy as np
import pytest
import torch

from train.adapters import DocLoRA
from train.eval_fixtures import doc_stream, tiny_model
from train.forward import rows_nll, tail_block
from train.rows import build_rows, split_docs
from train.ttt_config import TTTConfig

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = ("q", "k", "v", "o", "mlp", "up", "down", "head")


def _nll_and_grads(model, rb, cfg, seed=0, backend="bmm"):
    ad = DocLoRA(model, cfg, rb.x.shape[0], rb.x.device, backend)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ad.params:  # non-zero B: every LoRA path contributes
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    for p in ad.params:
        p.requires_grad_(True)
    nll = rows_nll(model, rb, ad)
    (nll * rb.mask).sum().backward()
    return nll.detach(), [p.grad.clone() for p in ad.params]


@pytest.mark.parametrize("num_layers,targets,backend", [(2, ALL, "bmm"), (5, ALL, "bmm"), (3, ("q", "v", "head"), "bmm"),
                                                         (2, ALL, "kernel")])
def test_tail_block_equals_the_full_forward(num_layers, targets, backend):
    """Rows whose chunks sit at different window positions (one row padded): same NLL at every scored position and
    same gradient of every adapter tensor as the full forward (both LoRA backends: the kernel one's multi-LoRA op
    then sees (rows, chunk) inputs in the last block)."""
    torch.manual_seed(0)
    # the kernel backend at d 32 and vocab 256: its interpreted kernels took 24.6 s of the CPU lane at the default
    # d 64, vocab 1024 (the head's LoRA over 1,024 outputs), 0.04 s the bmm backend
    model_kw = dict(model_dim=32, vocab_size=256) if backend == "kernel" else {}
    model = tiny_model(seed=3, num_layers=num_layers, **model_kw)
    stream = doc_stream([70, 40, 100, 9], vocab_size=model.config.vocab_size, seed=5)
    starts, ns = split_docs(stream)
    # chunk 16 of a 64-position window: rows ending their chunk at 48, 32 (padded row), 96 (full window), 9 (short)
    rows = np.array([[starts[0], 32, 48], [starts[1], 16, 32], [starts[2], 80, 96], [starts[3], 0, 9]])
    cfg = TTTConfig(rank=4, chunk=16, window=64, batch_size=4, alpha=8.0, targets=targets)
    rb = build_rows(stream, rows, cfg.window)
    assert len({int(rb.sel[r, 0]) for r in range(4)}) == 4  # the chunks start at four different positions
    full, g_full = _nll_and_grads(model, rb, cfg, backend=backend)
    tail, g_tail = _nll_and_grads(model, rb, dataclasses.replace(cfg, tail_block=True), backend=backend)
    m = rb.mask
    assert m.sum() == 16 * 3 + 9 and not m.all()
    torch.testing.assert_close(tail[m], full[m], rtol=1e-5, atol=1e-5)
    for a, b in zip(g_tail, g_full):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_tail_block_changes_what_the_last_block_sees():
    """The kept positions reach the head, not the window's last ones: a test that compared only rows whose chunk
    ends the window could not tell a correct gather from a slice of the last C positions."""
    model = tiny_model(seed=3)
    x = torch.randint(4, 1024, (2, 64))
    keep = torch.tensor([[0, 1, 2, 3], [60, 61, 62, 63]])
    with torch.no_grad():
        full = model.hidden(x)
        kept = model.hidden(x, keep=keep)
    assert kept.shape == (2, 4, full.size(-1))
    torch.testing.assert_close(kept, torch.gather(full, 1, keep[..., None].expand(-1, -1, full.size(-1))),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("schedule,backend", [("batch", "bmm"), ("rolling", "bmm")])
def test_eval_with_tail_block_scores_like_without(schedule, backend):
    """evaluate() with tail_block: the same targets, ledger and BPB as without (records-like options)."""
    from tests.test_graphs import LENGTHS, RECORDS_LIKE, _lut
    from train.eval import evaluate

    stream = doc_stream(LENGTHS, seed=5)
    lut = _lut(tiny_model(seed=3).config.vocab_size)
    cfg = dataclasses.replace(RECORDS_LIKE, schedule=schedule)
    ref = evaluate(tiny_model(seed=3), stream, lut, mode="ttt", cfg=cfg, backend=backend)
    rep = evaluate(tiny_model(seed=3), stream, lut, mode="ttt", cfg=dataclasses.replace(cfg, tail_block=True),
                   backend=backend)
    assert rep["lora_backend"] == ref["lora_backend"]
    assert rep["targets"] == ref["targets"] and rep["legality"] == ref["legality"]
    assert abs(rep["val_bpb"] - ref["val_bpb"]) < 1e-5 * ref["val_bpb"], (rep["val_bpb"], ref["val_bpb"])


@pytest.mark.parametrize("keep,what", [(torch.zeros(2, 4, dtype=torch.int32), "torch.int32"),
                                       (torch.zeros(8, dtype=torch.int64), "(8,)"),
                                       (torch.zeros(3, 4, dtype=torch.int64), "(3, 4)"), ([0, 1], "list"),
                                       (torch.zeros(2, 99, dtype=torch.int64), "(2, 99)")])
def test_hidden_refuses_a_bad_keep_by_name(keep, what):
    model = tiny_model(seed=3)
    with pytest.raises(ValueError, match=r"GPT.hidden: keep must be an int64 \(B, C\) tensor.*got .*" + re.escape(what)):
        model.hidden(torch.randint(4, 1024, (2, 16)), keep=keep)


def test_tail_block_option_and_bad_value():
    from train.eval import _parse

    base = ["--artifact", "a", "--val", "v", "--tokenizer", "t"]
    assert _parse(base + ["--tail-block"]).ttt_cfg.tail_block is True
    assert _parse(base).ttt_cfg.tail_block is False
    with pytest.raises(ValueError, match="tail_block: 'yes'"):
        TTTConfig(tail_block="yes")
    assert not tail_block(None) and tail_block(DocLoRA(tiny_model(), TTTConfig(tail_block=True), 2,
                                                       torch.device("cpu"), "bmm"))


@pytest.mark.gpu
@pytest.mark.parametrize("rank", [8, 96])
def test_gpu_tail_block_compiled_bf16_within_the_full_forwards_error(rank):
    """On the GPU, compiled (compile_rows_nll), bf16 autocast: the tail forward's NLL and adapter gradients are
    as close to the fp32 full forward as the bf16 full forward is (at most 2x its error)."""
    from train.forward import compile_rows_nll

    torch.manual_seed(0)
    model = tiny_model(seed=3, num_layers=4).cuda()
    stream = doc_stream([300, 200, 500, 90], seed=5).cuda()
    starts, _ = split_docs(stream.cpu())
    rows = np.array([[starts[0], 256, 300], [starts[1], 144, 192], [starts[2], 448, 496], [starts[3], 48, 90]])
    cfg = TTTConfig(rank=rank, chunk=48, window=256, batch_size=4, alpha=1.5 * rank, targets=ALL)
    rb = build_rows(stream, rows, cfg.window)
    ref_nll, ref_g = _nll_and_grads(model, rb, cfg)  # fp32, eager, full
    compile_rows_nll(model)
    try:
        out = {}
        for tail in (False, True):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out[tail] = _nll_and_grads(model, rb, dataclasses.replace(cfg, tail_block=tail))
    finally:
        compile_rows_nll(model, enable=False)
    m = rb.mask

    def err(nll, g):
        return ((nll[m] - ref_nll[m]).abs().max().item(),
                max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(g, ref_g)))

    e_full, e_tail = err(*out[False]), err(*out[True])
    assert e_tail[0] <= 2 * e_full[0] + 1e-6 and e_tail[1] <= 2 * e_full[1] + 1e-6, (e_tail, e_full)
