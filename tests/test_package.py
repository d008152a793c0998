"""Package-level checks: import is GPU-free and lazy, the extension loads, helpers work."""
import os
import subprocess
import sys

import pytest
import torch

from pgolf_kernels import testing
from pgolf_kernels._utils import check_tensor


def test_import_does_not_touch_gpu_or_extension():
    # A fresh interpreter: importing the package must not initialize CUDA nor load _C.
    code = (
        "import sys, torch, pgolf_kernels;"
        "assert not torch.cuda.is_initialized(), 'CUDA initialized at import';"
        "assert 'pgolf_kernels._C' not in sys.modules, '_C loaded at import';"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_extension_loads_and_matches_torch():
    from pgolf_kernels._ext import load_C

    C = load_C()
    assert C.built_with_torch() == torch.__version__.split("+")[0]


def test_unknown_attribute():
    import pgolf_kernels

    with pytest.raises(AttributeError):
        pgolf_kernels.does_not_exist


def test_check_tensor_messages():
    x = torch.zeros(2, 3)
    with pytest.raises(TypeError, match="q must have dtype int8"):
        check_tensor(x, "q", dtype=torch.int8)
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        check_tensor(x, "x", ndim=3)
    with pytest.raises(ValueError, match="must be contiguous"):
        check_tensor(x.t(), "w", contiguous=True)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        check_tensor([1, 2], "x")


def test_rel_err_and_bound():
    a = torch.randn(64, 64, dtype=torch.float64)
    assert testing.rel_err(a, a) == 0.0
    noisy = a + 1e-3 * torch.randn_like(a)
    base = a + 1e-3 * torch.randn_like(a)
    testing.assert_close_rel(noisy, a, base, factor=2.0)
    with pytest.raises(AssertionError, match="exceeds bound"):
        testing.assert_close_rel(a + 1e-1 * torch.randn_like(a), a, base)
    bad = a.clone()
    bad[0, 0] = float("nan")
    assert testing.rel_err(bad, a) == float("inf")
    assert torch.isnan(testing.nan_empty((3, 3))).all()


def test_stale_extension_gives_clear_message(monkeypatch):
    # Simulate a .so that fails to import (as an undefined-symbol error from another torch would)
    # while the build info records a different torch: the error must name both versions and the fix.
    from pgolf_kernels import _build_info, _ext

    import pgolf_kernels

    monkeypatch.setitem(sys.modules, "pgolf_kernels._C", None)  # makes `from . import _C` raise ImportError
    monkeypatch.delattr(pgolf_kernels, "_C", raising=False)     # ... also once an earlier test loaded it
    monkeypatch.setattr(_build_info, "TORCH_VERSION", "0.0.1")
    _ext.load_C.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"built against torch 0\.0\.1 but torch .* is imported; rebuild"):
            _ext.load_C()
    finally:
        _ext.load_C.cache_clear()


def test_build_info_reports_the_build():
    out = subprocess.run([sys.executable, "-m", "pgolf_kernels.build_info"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "pgolf_kernels._C built against torch" in out.stdout
    assert "GPU kernels are Triton" in out.stdout


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_one_version_source_and_one_installed_package():
    """setup.py takes the version from pgolf_kernels/__init__.py and installs pgolf_kernels only (the drivers
    and benches run from a checkout; `train` and `bench` are not site-packages names)."""
    import pgolf_kernels

    info = os.path.join(ROOT, "pgolf_kernels", "_build_info.py")
    before = open(info).read() if os.path.exists(info) else None
    out = subprocess.run([sys.executable, "setup.py", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == pgolf_kernels.__version__
    # a metadata call builds nothing, so it must leave the installed build's record as it is
    assert (open(info).read() if os.path.exists(info) else None) == before
    src = open(os.path.join(ROOT, "setup.py")).read()
    assert 'packages=["pgolf_kernels"]' in src
    assert pgolf_kernels.__version__ not in src  # no second copy of the version


def test_env_choice_default_choice_and_refusal(monkeypatch):
    """``_utils.env_choice``: unset gives the first choice; a listed value is returned; anything else is refused in
    one line naming the variable, the value and every choice with its meaning, the default marked."""
    from pgolf_kernels._utils import env_choice

    choices = {"a": "first thing", "b": "second thing"}
    monkeypatch.delenv("PGOLF_TEST_SWITCH", raising=False)
    assert env_choice("PGOLF_TEST_SWITCH", choices) == "a"
    monkeypatch.setenv("PGOLF_TEST_SWITCH", "b")
    assert env_choice("PGOLF_TEST_SWITCH", choices) == "b"
    monkeypatch.setenv("PGOLF_TEST_SWITCH", "c")
    with pytest.raises(ValueError) as e:
        env_choice("PGOLF_TEST_SWITCH", choices)
    assert str(e.value) == ("PGOLF_TEST_SWITCH = 'c': expected a (first thing, the default) or b (second thing)")


@pytest.mark.parametrize("leaf", [True, False])
def test_block0_leaf_decides_whether_block0_forms_its_input_gradient(monkeypatch, leaf):
    """Under ``compile_rows_nll`` (compile stubbed out: the functions run as given) a TTT step's block 0 gets an
    input that requires grad with ``BLOCK0_LEAF`` on (so it shares blocks 1-10's graph), and one that does not with
    it off; the other blocks' inputs require grad either way."""
    from tests.test_fused_mlp import batch
    from train import forward
    from train.adapters import DocLoRA
    from train.eval_fixtures import tiny_model
    from train.ttt_config import TTTConfig

    seen = []
    real = forward._block_adapted
    monkeypatch.setattr(forward, "_block_adapted", lambda b, x, *a: (seen.append(x.requires_grad), real(b, x, *a))[1])
    monkeypatch.setattr(torch, "compile", lambda f, **k: f)
    monkeypatch.setattr(forward, "BLOCK0_LEAF", leaf)
    model = tiny_model(seed=3, num_layers=2)
    forward.compile_rows_nll(model)
    try:
        cfg = TTTConfig(rank=4, chunk=16, window=64, batch_size=4, targets=("q", "v"))
        forward.rows_nll(model, batch(), DocLoRA(model, cfg, 4, torch.device("cpu"), "bmm")).sum().backward()
    finally:
        forward.compile_rows_nll(model, enable=False)
    assert seen == [leaf, True]


@pytest.mark.parametrize("module,reader,var,default,other,want_other", [
    ("pgolf_kernels.lora_merged", "_dx_kernel_from_env", "PGOLF_MERGED_DX", True, "cublas", False),
    ("pgolf_kernels.lora_merged", "_override_from_env", "PGOLF_LORA_MERGED", None, "1", True),
    ("pgolf_kernels.linear_residual", "_mlp_ws_from_env", "PGOLF_MLP_UP_WS", True, "0", False),
    ("pgolf_kernels.linear_residual", "_mlp_signs_from_env", "PGOLF_MLP_SIGNS", False, "1", True),
    ("pgolf_kernels.linear_act", "_grad_ws_from_env", "PGOLF_ACT_GRAD_WS", True, "0", False),
    ("pgolf_kernels.linear_residual", "_res_ws_from_env", "PGOLF_RES_WS", True, "0", False),
    ("pgolf_kernels.linear_residual", "_mlp_down_act_from_env", "PGOLF_MLP_DOWN_ACT", False, "1", True),
    ("pgolf_kernels.lora_merged", "_sum_ws_from_env", "PGOLF_SUM_WS", True, "0", False),
    ("pgolf_kernels.lora_merged", "_qkv_ws_from_env", "PGOLF_QKV_WS", False, "1", True),
    ("pgolf_kernels.linear_act_ws", "_tile_from_env", "PGOLF_WS_TILE", (64, 5), "0", (64, 4)),
    ("train.adapters", "_global_fused_from_env", "PGOLF_GLOBAL_FUSED", False, "1", True),
    ("train.forward", "_block0_leaf_from_env", "PGOLF_BLOCK0_LEAF", True, "0", False),
    ("train.model", "_skip_kernel_from_env", "PGOLF_SKIP_ADD", True, "torch", False),
    ("train.model", "_skip_fork_from_env", "PGOLF_SKIP_FORK", True, "0", False),
    ("train.model", "_join_fold_from_env", "PGOLF_JOIN_FOLD", True, "0", False),
    ("train.model", "_norm_kernel_from_env", "PGOLF_NORM_KERNEL", False, "kernel", True),
    ("train.adapters", "_o_fold_from_env", "PGOLF_O_FOLD", True, "0", False),
    ("train.model", "_qk_layout_from_env", "PGOLF_QK_LAYOUT", "bthd", "k-bhtd", "k-bhtd")])
def test_every_switch_reader(monkeypatch, module, reader, var, default, other, want_other):
    """Each switch of the README's table through its reader: unset gives the documented default, the other value
    its setting, a bad value a ValueError naming the variable (PGOLF_NS_FAST_PACK: tests/test_newton_schulz.py)."""
    import importlib

    fn = getattr(importlib.import_module(module), reader)
    monkeypatch.delenv(var, raising=False)
    assert fn() == default and type(fn()) is type(default)
    monkeypatch.setenv(var, other)
    assert fn() == want_other and type(fn()) is type(want_other)
    monkeypatch.setenv(var, "bogus")
    with pytest.raises(ValueError, match=f"{var} = 'bogus': expected "):
        fn()
