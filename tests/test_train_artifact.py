"""train/artifact.py: save -> load reproduces the quantized weights exactly; byte accounting; errors."""
import os

import pytest
import torch

from pgolf_kernels.quant import dequantize
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
    # the code counts as its packed file (train.code_pack: ~2 KB of self-extracting header + the packed files)
    packed = len(art.code_pack_bytes([str(code)]))
    assert info["bytes_code"] == packed and info["bytes_code_files"] == 1234
    assert info["bytes_total"] == info["bytes_model"] + packed
    assert "TOO LARGE" not in capsys.readouterr().out
    sub = art.submission_bytes(str(tmp_path / "m.ptz"), code_paths=[str(code)])
    assert sub["bytes_total"] == info["bytes_total"] and sub["ok"]
    sub = art.submission_bytes(str(tmp_path / "m.ptz"))
    assert sub["bytes_code"] == len(art.code_pack_bytes()) and sub["bytes_code_files"] > sub["bytes_code"]
    monkeypatch.setattr(art, "SIZE_LIMIT", 1000)
    art.save_artifact(m, str(tmp_path / "m2.ptz"), code_paths=[str(code)])
    assert "ARTIFACT TOO LARGE" in capsys.readouterr().out
    paths = art.default_code_paths()
    assert all(os.path.isfile(p) for p in paths)
    rel = {os.path.relpath(p, art._ROOT) for p in paths}
    # what a TTT submission ships: both drivers, the eval's TTT code and LoRA kernels, the codec's C++ sources
    for f in ("train/train_gpt.py", "train/eval.py", "train/adapters.py", "train/phased.py", "pgolf_kernels/lora.py",
              "pgolf_kernels/lora_triton.py", "pgolf_kernels/muon.py", "pgolf_kernels/quant.py", "csrc/codec.cpp"):
        assert f in rel, f
    assert not any(r.startswith(("tests/", "bench/")) for r in rel), rel  # never imported by the drivers
    assert "pgolf_kernels/lora.py" not in {os.path.relpath(p, art._ROOT) for p in art.code_paths_for_entry("train")}


def _write(root, rel, text):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_code_bytes_follow_the_entry_import_graph(tmp_path):
    """The count is the entry's import closure inside the repo: a module joins the count when (and only when)
    an imported file imports it, however it is spelled (relative, absolute, function-local, package attribute)."""
    _write(tmp_path, "app/__init__.py", "")
    _write(tmp_path, "app/__main__.py", "from .run import main\nimport os\n")
    _write(tmp_path, "app/run.py", "import torch\n\ndef main():\n    from lib import helper  # lazy\n")
    _write(tmp_path, "lib/__init__.py", "X = 1\n")
    _write(tmp_path, "lib/helper.py", "from . import _private\n")
    _write(tmp_path, "lib/_private.py", "Y = 2\n")
    extra = _write(tmp_path, "lib/extra.py", "Z = 3 # not imported yet\n")
    _write(tmp_path, "lib/_C.py", "")  # stands in for nothing: only EXTENSION_SOURCES names count for "_C"
    rel = lambda ps: sorted(os.path.relpath(p, tmp_path) for p in ps)  # noqa: E731
    before = art.code_paths_for_entry("app", root=str(tmp_path))
    assert rel(before) == ["app/__init__.py", "app/__main__.py", "app/run.py", "lib/__init__.py", "lib/_private.py",
                           "lib/helper.py"]
    n0 = art.code_bytes_for_entry("app", root=str(tmp_path))
    assert n0 == sum(os.path.getsize(p) for p in before)
    _write(tmp_path, "app/run.py", "import torch\nimport lib.extra\n\ndef main():\n    from lib import helper  # lazy\n")
    n1 = art.code_bytes_for_entry("app", root=str(tmp_path))
    assert n1 == n0 + len("import lib.extra\n") + extra.stat().st_size
    with pytest.raises(ValueError, match="not a module or package"):
        art.code_paths_for_entry("nope", root=str(tmp_path))


def test_eval_entry_counts_what_it_imports(tmp_path, monkeypatch):
    """Adding a module to the eval driver's imports changes the eval entry's count by that module's bytes."""
    import shutil

    root = tmp_path / "repo"
    for d in ("train", "pgolf_kernels", "csrc"):
        shutil.copytree(os.path.join(art._ROOT, d), root / d, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    before = set(art.code_paths_for_entry("train.eval", root=str(root)))
    n0 = art.code_bytes_for_entry("train.eval", root=str(root))
    assert n0 == art.code_bytes_for_entry("train.eval")  # the copy counts like the repo
    line = "\nimport pgolf_kernels.muon  # added\n"
    with open(root / "train" / "eval.py", "a") as f:
        f.write(line)
    added = set(art.code_paths_for_entry("train.eval", root=str(root))) - before
    # muon.py and what it imports that the eval did not import already (newton_schulz.py, _optim.py)
    assert {os.path.relpath(p, root) for p in added} == {"pgolf_kernels/muon.py", "pgolf_kernels/newton_schulz.py",
                                                          "pgolf_kernels/_optim.py"}
    n1 = art.code_bytes_for_entry("train.eval", root=str(root))
    assert n1 == n0 + len(line) + sum(os.path.getsize(p) for p in added)


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
    e0 = (dequantize(art.quantize_model(m)["blocks.0.mlp.fc.weight"], torch.float32) - w).square().mean()
    e1 = (dequantize(entries["blocks.0.mlp.fc.weight"], torch.float32) - w).square().mean()
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


def test_load_artifact_reuses_a_decode_only_for_the_same_file(tmp_path):
    """The second decode of an unchanged file is the first's; a file rewritten in place (other weights) is
    decoded again, never served from the previous decode."""
    path = str(tmp_path / "m.ptz")
    art.save_artifact(_trained_like_model(1), path, code_paths=[])
    first = art.load_artifact(path)
    assert art.load_artifact(path) is first
    art.save_artifact(_trained_like_model(2), path, code_paths=[])
    second = art.load_artifact(path)
    assert second is not first
    name = next(n for n, v in second[1].items() if art._is_q(v))
    assert not torch.equal(second[1][name].q, first[1][name].q)


def test_code_paths_prefetch_matches_the_foreground_walk():
    t = art.prefetch_code_paths()
    t.join(60)
    assert not t.is_alive() and art.default_code_paths() == list(art._walk_driver_code_paths())
    assert any(p.endswith(os.path.join("train", "eval.py")) for p in art.default_code_paths())


@pytest.mark.gpu
@pytest.mark.parametrize("int6", [False, True])
def test_model_from_artifact_on_the_gpu_equals_the_cpu_build(tmp_path, int6):
    """Built and dequantized on the GPU: the same bf16 weights (and int6 codes) as the CPU build moved there."""
    path = str(tmp_path / "m.ptz")
    art.save_artifact(_trained_like_model(1), path, code_paths=[])
    gpu = art.model_from_artifact(path, int6=int6, device="cuda")
    cpu = art.model_from_artifact(path, int6=int6, device="cpu", dtype=torch.bfloat16)
    sg, sc = gpu.state_dict(), cpu.state_dict()
    assert set(sg) == set(sc)
    for name, v in sc.items():
        assert sg[name].device.type == "cuda" and sg[name].dtype == v.dtype, name
        assert torch.equal(sg[name].cpu(), v), name
