"""``TTTConfig.fused_qk``: the attention's q / k RMSNorm, q_gain and rotary through ``pgolf_kernels.head_norm_rope``
give the scores and adapter gradients of the op-by-op composition (fp32, CPU; the kernels under the interpreter in
the CPU lane), through ``rows_nll`` and ``evaluate``."""
import pytest
import torch

from tests.test_fused_mlp import (ALL, EVAL_LENGTHS, KERNEL_MODEL, _nll_and_grads, assert_eval_unchanged,
                                  assert_step_unchanged, batch, step_model)
from train.adapters import DocLoRA
from train.eval_fixtures import tiny_model
from train.forward import rows_nll
from train.ttt_config import TTTConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("targets,backend,tail,n_docs,int6,mlp", [
    (ALL, "bmm", False, 4, False, False), (ALL, "kernel", True, 4, True, False),
    (("q", "v", "head"), "bmm", False, 4, False, True), (("k", "o"), "bmm", True, 1, False, False)])
def test_fused_qk_equals_the_composition(targets, backend, tail, n_docs, int6, mlp):
    """Same NLL at every scored position and same gradient of every adapter tensor (q / k adapters get theirs through
    the fused backward), on both backends, the int6 model, the tail block, a shared adapter, with the fused MLP."""
    model = step_model()
    if int6:
        from pgolf_kernels.int6_linear import convert_linears_to_int6

        convert_linears_to_int6(model)
    cfg = TTTConfig(rank=4, chunk=16, window=64, batch_size=4, alpha=8.0, targets=targets, tail_block=tail,
                    fused_mlp=mlp)
    g_fused = assert_step_unchanged(model, batch(vocab=model.config.vocab_size), cfg, n_docs, backend, fused_qk=True)
    assert any(g.abs().sum() > 0 for g in g_fused)


@pytest.mark.parametrize("layout", ["k-bhtd", "bhtd"])
def test_fused_qk_layouts_equal_the_composition(monkeypatch, layout):
    """``model.QK_LAYOUT``: q and / or k written in (B, H, T, D) order by the fused pass (the attention output copied
    back to (B, T, H·D) where q is) give the composition's NLL and adapter gradients, and the layout reaches the op."""
    import pgolf_kernels.head_norm_rope as hnr
    import train.model as model_mod

    monkeypatch.setattr(model_mod, "QK_LAYOUT", layout)
    seen = []
    orig = hnr.head_norm_rope
    monkeypatch.setattr(hnr, "head_norm_rope", lambda *a, **k: seen.append(k["layout"]) or orig(*a, **k))
    model = tiny_model(seed=3, num_layers=2)
    cfg = TTTConfig(rank=4, chunk=16, window=64, batch_size=4, alpha=8.0, targets=ALL, tail_block=True)
    assert_step_unchanged(model, batch(), cfg, 4, "bmm", fused_qk=True)
    want = ["bhtd" if layout == "bhtd" else "bthd", "bhtd"]   # q, k
    assert seen[:2] == want and set(seen) == set(want)


def test_fused_qk_is_what_the_model_runs(monkeypatch):
    """The option reaches the attention: head_norm_rope runs twice per block (q and k); without it, never."""
    import pgolf_kernels.head_norm_rope as hnr

    calls = []
    orig = hnr.head_norm_rope
    monkeypatch.setattr(hnr, "head_norm_rope", lambda *a, **k: calls.append(a[3]) or orig(*a, **k))
    model = tiny_model(seed=3, num_layers=2)
    rb = batch()
    for on in (False, True):
        cfg = TTTConfig(rank=4, chunk=16, window=64, batch_size=4, targets=("q", "v"), fused_qk=on)
        rows_nll(model, rb, DocLoRA(model, cfg, 4, torch.device("cpu"), "bmm"))
    assert calls == [4, 2, 4, 2]  # num_heads, num_kv_heads per block, only with the option


def test_compiled_step_with_fused_qk_and_mlp_has_no_graph_break():
    """The eval's regional compile (``compile_rows_nll``, Inductor) traces blocks that call head_norm_rope,
    mlp_leaky_sq and merged_weight (custom ops: fake implementations, registered autograd) without a graph break, and the compiled step
    gives the eager unfused step's NLL and adapter gradients (bmm backend: the kernel path's own ops are traced by
    tests/test_eval_driver.py; tail block)."""
    import torch._dynamo as dynamo

    from train.forward import compile_rows_nll

    rb = batch()
    # up / down adapted: the fused MLP merges them per row through lora_merged.merged_weight (a custom op too)
    cfg = TTTConfig(rank=4, chunk=16, window=64, batch_size=4, alpha=8.0, targets=("q", "k", "v", "o", "up", "down",
                                                                                     "head"), tail_block=True)
    model = tiny_model(seed=3, num_layers=2)
    plain = _nll_and_grads(model, rb, cfg, 4, "bmm")
    compile_rows_nll(model, True)
    dynamo.utils.counters.clear()
    try:
        assert_step_unchanged(model, rb, cfg, 4, "bmm", plain=plain, fused_qk=True, fused_mlp=True)
    finally:
        compile_rows_nll(model, False)
    assert dict(dynamo.utils.counters["graph_break"]) == {}


def test_eval_with_fused_qk_scores_like_without():
    # the wiring (the kernels' math: tests/test_head_norm_rope.py) on test_fused_mlp's EVAL_LENGTHS at KERNEL_MODEL
    assert_eval_unchanged([dict(fused_qk=True)], lengths=EVAL_LENGTHS, model_kw=KERNEL_MODEL)


def test_fused_qk_refusals_and_option():
    from train.eval import _parse

    with pytest.raises(ValueError, match=r"fused_qk: 'yes'; expected None \(auto\), True or False"):
        TTTConfig(fused_qk="yes")
    model = tiny_model(seed=3, num_layers=2, model_dim=96)  # head dim 24: not twice a power of two
    with pytest.raises(ValueError, match=r"fused_qk: needs the head dim \(24\) twice a power of two"):
        DocLoRA(model, TTTConfig(fused_qk=True), 2, torch.device("cpu"), "bmm")
    # auto: the kernel path where the head dim allows, never the reference; an explicit choice wins
    assert not DocLoRA(model, TTTConfig(), 2, torch.device("cpu"), "kernel").fused_qk
    model16 = tiny_model(seed=3, num_layers=2)  # head dim 16
    assert [DocLoRA(model16, TTTConfig(fused_qk=q), 2, torch.device("cpu"), b).fused_qk
            for q in (None, True, False) for b in ("kernel", "bmm")] == [True, False, True, True, False, False]
    base = ["--artifact", "a", "--val", "v", "--tokenizer", "t"]
    assert [_parse(base + f).ttt_cfg.fused_qk for f in ([], ["--fused-qk", "on"], ["--fused-qk", "off"])] == \
        [None, True, False]


@pytest.mark.gpu
def test_gpu_eval_with_fused_qk_scores_like_without():
    """On the GPU (the fp32 tiny model, the Triton kernels): evaluate() with fused_qk (and with fused_mlp too), eager
    and with CUDA graphs, against the unfused eval: same targets and ledger, BPB within 1e-4."""
    assert_eval_unchanged([dict(fused_qk=True, fused_mlp=m, cuda_graphs=g, graph_min_steps=1)
                           for g, m in ((False, False), (True, False), (True, True))],
                          device="cuda", backend="kernel", rel=1e-4)
