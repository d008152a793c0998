"""train/artifact.py: save -> load reproduces the quantized weights exactly; byte accounting; errors."""
import os

import pytest
import torch

from train import artifact as art
from train.model import GPT, GPTConfig

TINY = dict(vocab_size=128, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=3, seq_len=32)


def _trained_like_model(seed=0):
    torch.manual_seed(seed)
    m = GPT(GPTConfig(**TINY))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # no zero / constant tensors, like a trained model
    return m


def _codes(v):
    return v.q, v.scale, v.bits


def test_save_load_reproduces_quantized_weights_exactly(tmp_path):
    m = _trained_like_model()
    path = str(tmp_path / "m.ptz")
    info = art.save_artifact(m, path, code_paths=[])
    expect = art.quantize_model(m)
    cfg, entries, meta = art.load_artifact(path)
    assert cfg == m.config and meta["format"] == art.ARTIFACT_FORMAT
    assert set(entries) == set(expect) == set(m.state_dict())
    mats = {n for n, _ in m.matrix_params()}
    embs = {n for n, _ in m.embedding_params()}
    for name, v in entries.items():
        if name in mats or name in embs:
            q, s, bits = _codes(v)
            q0, s0, bits0 = _codes(expect[name])
            assert bits == bits0 == (art.MATRIX_BITS if name in mats else art.EMBED_BITS)
            assert q.dtype == torch.int8 and s.dtype == torch.float16
            assert torch.equal(q, q0) and torch.equal(s, s0), name
            lim = 2 ** (bits - 1) - 1
            assert int(q.abs().max()) <= lim
        else:
            assert v.dtype == torch.float16 and torch.equal(v, expect[name]), name
    assert info["bytes_model"] == os.path.getsize(path) and info["bytes_total"] == info["bytes_model"]


def test_model_from_artifact_weights_and_paths_agree(tmp_path):
    m = _trained_like_model(1)
    path = str(tmp_path / "m.ptz")
    art.save_artifact(m, path, code_paths=[])
    _, entries, _ = art.load_artifact(path)
    ref = art.model_from_artifact(path, int6=False, device="cpu")
    # reference path (fp32 on CPU): plain nn.Linear holding exactly q * scale (exact in fp32)
    for name, p in ref.state_dict().items():
        v = entries[name]
        exp = v.q.float() * v.scale.float()[:, None] if art._is_q(v) else v.float()
        assert torch.equal(p, exp), name
    assert isinstance(ref.blocks[0].attn.c_q, torch.nn.Linear)
    x = torch.randint(0, 128, (2, 32))
    out_ref = ref(x, x)
    try:
        from pgolf_kernels.int6_linear import Int6Linear
    except ImportError:
        pytest.skip("pgolf_kernels.int6_linear not importable yet")
    k = art.model_from_artifact(path, int6=True, device="cpu")
    lin = k.blocks[1].mlp.fc
    assert isinstance(lin, Int6Linear)
    qt = entries["blocks.1.mlp.fc.weight"]
    assert torch.equal(lin.q, qt.q) and torch.equal(lin.scale, qt.scale)
    out_k = k(x, x)
    # same weights, same math in fp32; only summation order differs (~1e-6 relative)
    err = (out_k - out_ref).norm() / out_ref.norm()
    assert err < 1e-4, float(err)


def test_quantization_is_close_to_float_model(tmp_path):
    m = _trained_like_model(2)
    path = str(tmp_path / "m.ptz")
    art.save_artifact(m, path, code_paths=[])
    q = art.model_from_artifact(path, int6=False, device="cpu")
    x = torch.randint(0, 128, (2, 32))
    a, b = m(x, x).mean(), q(x, x).mean()
    # int6 per-row codes keep ~5 significant bits; the mean NLL moves by far less than 1 %
    assert abs(float(a) - float(b)) < 0.01 * float(a)


def test_code_bytes_and_loud_warning(tmp_path, capsys, monkeypatch):
    m = _trained_like_model()
    code = tmp_path / "driver.py"
    code.write_bytes(b"x" * 1234)
    info = art.save_artifact(m, str(tmp_path / "m.ptz"), code_paths=[str(code)])
    assert info["bytes_code"] == 1234 and info["bytes_total"] == info["bytes_model"] + 1234
    assert "TOO LARGE" not in capsys.readouterr().out
    monkeypatch.setattr(art, "SIZE_LIMIT", 1000)
    art.save_artifact(m, str(tmp_path / "m2.ptz"), code_paths=[str(code)])
    assert "ARTIFACT TOO LARGE" in capsys.readouterr().out
    paths = art.default_code_paths()
    assert any(p.endswith(os.path.join("train", "train_gpt.py")) for p in paths)
    assert all(os.path.isfile(p) for p in paths)


def test_fit_to_budget_coarsens_int6_grid(tmp_path):
    m = _trained_like_model(3)
    base = art.save_artifact(m, str(tmp_path / "a.ptz"), code_paths=[], level=3)
    assert base["step_mult"] == 1.0
    limit = int(base["bytes_total"] * 0.93)
    info = art.save_artifact(m, str(tmp_path / "b.ptz"), code_paths=[], level=3, limit=limit)
    assert info["bytes_total"] <= limit and info["step_mult"] > 1.0
    _, entries, meta = art.load_artifact(str(tmp_path / "b.ptz"))
    assert meta["step_mult"] == pytest.approx(info["step_mult"], abs=1e-3)
    expect = art.quantize_model(m, step_mult=meta["step_mult"])
    for name, _ in m.matrix_params():
        assert torch.equal(entries[name].q, expect[name].q) and torch.equal(entries[name].scale, expect[name].scale)
        assert int(entries[name].q.abs().max()) <= 31
    # coarser grid -> larger but bounded reconstruction error on every matrix
    w = m.blocks[0].mlp.fc.weight.detach()
    e0 = (art._dequant(art.quantize_model(m)["blocks.0.mlp.fc.weight"], torch.float32) - w).square().mean()
    e1 = (art._dequant(entries["blocks.0.mlp.fc.weight"], torch.float32) - w).square().mean()
    assert e0 < e1 < 0.05 * w.square().mean()


def test_default_model_artifact_under_limit(tmp_path):
    """The default 11L d512 model with Gaussian matrices (~5.4 bits/param at the MSE-optimal int6 step:
    ~18 MB) is fitted under 16,000,000 bytes including the code."""
    torch.manual_seed(0)
    m = GPT(GPTConfig())
    with torch.no_grad():
        for _, p in m.matrix_params():
            p.normal_(0, 0.02)
    info = art.save_artifact(m, str(tmp_path / "big.ptz"), level=3)
    assert info["bytes_total"] <= art.SIZE_LIMIT, info
    assert info["step_mult"] > 1.0 and info["bytes_code"] > 50_000


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        art.load_artifact(str(tmp_path / "nope.ptz"))
    bad = tmp_path / "bad.ptz"
    bad.write_bytes(b"definitely not an artifact" * 10)
    with pytest.raises(ValueError):
        art.load_artifact(str(bad))
