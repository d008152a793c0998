"""Shared argument checks, dispatch rules and Triton tile helpers for every op in the package.

Dispatch rule (the same for every op):
  * CUDA tensors            -> the Triton kernel;
  * CPU tensors             -> the pure-torch reference (correct results for CPU users);
  * CPU tensors with TRITON_INTERPRET=1 -> the Triton kernel under Triton's interpreter
    (this is how the CPU test lane exercises the kernels themselves).
Nothing here touches the GPU at import time.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence

import torch
import triton
import triton.language as tl


def interpret_mode() -> bool:
    """True when Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op on tensor ``t`` should run its Triton kernel (see module docstring)."""
    return t.is_cuda or (t.device.type == "cpu" and interpret_mode())


def env_choice(var: str, choices: dict) -> str:
    """The value of environment variable ``var``, one of ``choices`` (value -> what it selects; the first is the
    default, taken when ``var`` is unset). Any other value raises one ValueError naming the variable and every
    choice. The package's switches are read at import through here."""
    default = next(iter(choices))
    raw = os.environ.get(var, default)
    if raw not in choices:
        opts = " or ".join(f"{k} ({v}{', the default' if k == default else ''})" for k, v in choices.items())
        raise ValueError(f"{var} = {raw!r}: expected {opts}")
    return raw


def check(cond: bool, msg, exc: type = ValueError) -> None:
    """Raise ``exc(msg)`` unless ``cond``. ``msg`` may be a zero-argument callable: the message is then
    built only on failure, which keeps f-strings over (symbolic) shapes out of torch.compile's trace."""
    if not cond:
        raise exc(msg() if callable(msg) else msg)


def _fmt_dtypes(dtypes) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    t,
    name: str,
    *,
    dtype: Optional[Iterable[torch.dtype] | torch.dtype] = None,
    ndim: Optional[Sequence[int] | int] = None,
    device: Optional[torch.device] = None,
    contiguous: bool = False,
    op: str = "",
) -> None:
    """Validate one tensor argument; raise TypeError/ValueError naming the argument."""
    where = f"{op}: " if op else ""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtype is not None:
        dts = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        if t.dtype not in dts:
            raise TypeError(f"{where}{name} must have dtype {_fmt_dtypes(dts)}, got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None:
        nds = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in nds:
            raise ValueError(f"{where}{name} must have {' or '.join(map(str, nds))} dimensions, got shape {tuple(t.shape)}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{where}{name} is on {t.device} but must be on {device} (same device as the other inputs)")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{where}{name} must be contiguous (got strides {t.stride()}); call .contiguous() first")


def check_linear_input(x, bias, weight: str, N: int, K: int, op: str, name: str = "x") -> None:
    """The input of a linear layer whose weight (named ``weight``) is (N, K): ``x`` (a tensor) has at least one
    dimension and last dim K; ``bias`` is None or an (N,) tensor of x's dtype on x's device."""
    if x.dim() < 1:
        raise ValueError(f"{op}: {name} must have at least 1 dimension (..., K), got a 0-dim tensor")
    if x.shape[-1] != K:
        raise ValueError(f"{op}: {name}'s last dim must equal K = {weight}.shape[1] = {K}, got {name} of shape "
                         f"{tuple(x.shape)}")
    if bias is not None:
        check_tensor(bias, "bias", dtype=x.dtype, ndim=1, device=x.device, op=op)
        if bias.shape[0] != N:
            raise ValueError(f"{op}: bias must have shape ({N},) = (N,), got {tuple(bias.shape)}")


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Every buffer an op's kernels must fully overwrite (outputs, workspaces) is allocated here, and only here:
    tests replace this function with ``pgolf_kernels.testing.nan_empty`` so that an element a kernel forgot
    to write shows up as NaN. Ops therefore call it as ``_utils.empty(...)`` (looked up at call time)."""
    return torch.empty(shape, dtype=dtype, device=device)


# Upper bounds of the row-count (M) buckets that autotuned GEMM kernels key on: one tuned config per bucket,
# so a new M within a bucket costs no new tuning run; the last bucket takes every larger M.
M_BUCKETS = (16, 64, 256, 1024, 4096, 1 << 30)


def m_bucket(M: int) -> int:
    """The smallest bound in ``M_BUCKETS`` that is >= M (the autotune key of a GEMM with M rows)."""
    for b in M_BUCKETS:
        if M <= b:
            return b
    return M_BUCKETS[-1]


def rows_2d(t: torch.Tensor, last: int) -> torch.Tensor:
    """View ``t`` (..., last) as (rows, last) for a kernel that needs unit stride along ``last``
    and non-overlapping rows; copies only when the view does not have that layout."""
    t2 = t.reshape(-1, last)
    if t2.shape[0] > 0 and (t2.stride(1) != 1 or t2.stride(0) < last):
        t2 = t2.contiguous()
    return t2


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for tl.dot: fp32 activations get true fp32 products ("ieee");
    Triton's default for an fp32 dot would be TF32 (10-bit mantissa, ~3e-4 relative error)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def tuner_bench(fn, quantiles):
    """Autotuner timing: triton's default do_bench is 25 ms warm-up + 100 ms per config; 5 + 20 ms
    keeps tuning every benchmark key (8 shapes x 6 M buckets x 2 kernels x <= 4 configs) well
    under a minute of device time."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


@triton.jit
def output_tile(pid, M, N, BM: tl.constexpr, BN: tl.constexpr):
    """Program ``pid``'s (BM, BN) tile of an (M, N) output, N fastest (consecutive programs share one row
    tile, which is read from HBM once and from L2 after). Returns (rm, rn, rm % M, rn % N): the wrapped
    indices serve the loads (edge rows and columns are computed on valid data, never stored), the plain
    ones the masked stores."""
    num_pid_n = tl.cdiv(N, BN)
    rm = (pid // num_pid_n) * BM + tl.arange(0, BM)
    rn = (pid % num_pid_n) * BN + tl.arange(0, BN)
    return rm, rn, rm % M, rn % N


@triton.jit
def load_tile(ptrs, mask, EVEN: tl.constexpr):
    """One operand tile of a reduction loop: a plain load when EVEN (every step of the launch is a full block,
    so the kernel carries no masks), else masked to ``mask`` with 0 elsewhere (0 adds nothing to a dot)."""
    if EVEN:
        t = tl.load(ptrs)
    else:
        t = tl.load(ptrs, mask=mask, other=0)
    return t
