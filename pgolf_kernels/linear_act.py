"""Linear layer with its activation in the GEMM's epilogue: ``y = act(x · Wᵀ)``, one persistent TMA kernel.

Math (batch row b; W shared (N, K) or one weight per row (B, N, K), e.g. the merged-LoRA weights E[b])::

    h[b] = x.dtype( x[b] · W[b]ᵀ )                       (T, N)   fp32 accumulate, one rounding
    y[b] = x.dtype( act(h[b]) )                           (T, N)   act(h) = leaky_relu(h, slope)²  or  h

Backward (``leaky_relu_sq``; h is saved by the forward when ``save_pre`` / under autograd)::

    dh   = dy · act'(h),   act'(h) = 2h (h > 0),  2·slope²·h (h <= 0)
    dx[b] = dh[b] · W[b]                                  (T, K)
    dW   = Σ_b dh[b]ᵀ · x[b]  (shared W)   or   dW[b] = dh[b]ᵀ · x[b]  (per-row W)

Why: in the records' TTT step the MLP's up-projection writes h (64 × 2048 × 1536 bf16, 403 MB) and a separate pass
reads it and writes act(h) (measured on one H200, kernel path, measurement 6 of ``bench/results/profile-ttt-h200.md``:
1.88 ms per step forward over 10 layers, the backward pass 2.78 ms). Here the activation is computed on the fp32
accumulator tile before it leaves the SM. The question this kernel answers on a GPU (``python3 -m bench.bench_linear_act``)
is whether a Triton GEMM with a fused epilogue reaches cuBLAS speed at K = 512: the records' step needs GEMMs at
>= 0.73-1.0x cuBLAS with the element-wise passes absorbed to reach 1.5x its reference (``docs/STATUS.md``).
Not dispatched inside the TTT engine until that is measured.

Kernel: persistent (one program per SM, tiles strided over programs), operands loaded by TMA through host tensor
descriptors over 3-D views (B, T, K) / (B_w, N, K) / (B, T, N), so a tile never straddles two batch rows and
out-of-range rows and columns are zero-filled on load and clipped on store. TMA needs 16-byte-aligned row strides:
K and N multiples of 8 (2-byte dtypes); the op refuses other shapes by name.

Dispatch: CUDA -> the kernel (Hopper or newer: TMA); CPU -> the torch reference, or the kernel under
TRITON_INTERPRET=1 (the CPU test lane), as every op of the package.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _utils
from ._utils import check, check_tensor, use_triton

ACTS = ("none", "leaky_relu_sq")
_OP = "linear_act"


def act_ref(h: Tensor, act: str, slope: float) -> Tensor:
    """act(h) in fp32 from h's values, rounded to h.dtype (what the compiled torch composition computes)."""
    if act == "none":
        return h
    hf = h.float()
    return torch.where(hf > 0, hf, slope * hf).square().to(h.dtype)


def act_grad_ref(dy: Tensor, h: Tensor, act: str, slope: float) -> Tensor:
    """dh = dy · act'(h) in fp32, rounded to dy.dtype."""
    if act == "none":
        return dy
    hf = h.float()
    return (dy.float() * 2.0 * torch.where(hf > 0, hf, (slope * slope) * hf)).to(dy.dtype)


def linear_act_ref(x: Tensor, w: Tensor, act: str = "leaky_relu_sq", slope: float = 0.5) -> Tuple[Tensor, Tensor]:
    """Torch reference: (y, h) with h = x · Wᵀ (cuBLAS / torch matmul, x.dtype) and y = act(h)."""
    h = torch.matmul(x, w.transpose(-1, -2)) if w.dim() == 3 else torch.nn.functional.linear(x, w)
    return act_ref(h, act, slope), h


@triton.jit
def _linear_act_kernel(x_desc, w_desc, y_desc, h_desc, B, T, N, K, slope,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ACT: tl.constexpr,
                       SAVE_PRE: tl.constexpr, PER_ROW_W: tl.constexpr, NUM_PROGS: tl.constexpr,
                       PRECISION: tl.constexpr):
    """Tiles (b, m, n), n fastest (the x tile of (b, m) is re-read from L2 by the next tiles; W[b] is N x K, at
    most 1.5 MB for the records' MLP, and stays in L2 across the m tiles). fp32 inputs multiply in IEEE fp32 (not
    TF32: the result must match torch's fp32 matmul); the precision argument is ignored for 16-bit inputs."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(T, BM)
    tiles_n = tl.cdiv(N, BN)
    total = B * tiles_m * tiles_n
    k_steps = tl.cdiv(K, BK)
    dt = y_desc.dtype
    for t in tl.range(pid, total, NUM_PROGS, flatten=True):
        b = t // (tiles_m * tiles_n)
        rem = t % (tiles_m * tiles_n)
        om = (rem // tiles_n) * BM
        on = (rem % tiles_n) * BN
        wb = b if PER_ROW_W else 0
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for kk in range(k_steps):
            a = x_desc.load([b, om, kk * BK]).reshape(BM, BK)
            w = w_desc.load([wb, on, kk * BK]).reshape(BN, BK)
            acc = tl.dot(a, w.T, acc, input_precision=PRECISION)
        h = acc.to(dt)
        if SAVE_PRE:
            h_desc.store([b, om, on], h.reshape(1, BM, BN))
        if ACT == 1:
            hf = h.to(tl.float32)
            hf = tl.where(hf > 0, hf, slope * hf)
            y = (hf * hf).to(dt)
        else:
            y = h
        y_desc.store([b, om, on], y.reshape(1, BM, BN))


def default_config(T: int, N: int, K: int, is_cuda: bool) -> dict:
    """Tile sizes, fixed ahead of time (no autotuning at eval). Interpreter: small tiles (its cost grows with
    the tile). GPU: 128 x 128 x 64, 3 stages, 8 warps; ``bench.bench_linear_act`` sweeps alternatives."""
    if not is_cuda:
        return dict(BM=16, BN=16, BK=16, num_warps=4, num_stages=1)
    return dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=3)


def _num_programs(dev: torch.device, tiles: int) -> int:
    if dev.type != "cuda":
        return max(1, min(tiles, 4))
    return max(1, min(tiles, torch.cuda.get_device_properties(dev).multi_processor_count))


def check_args(x: Tensor, w: Tensor, act: str, slope: float) -> None:
    """Refuse bad input by name before any work."""
    check(act in ACTS, lambda: f"{_OP}: act must be one of {ACTS}, got {act!r}")
    check(isinstance(slope, (int, float)) and not isinstance(slope, bool) and slope == slope,
          lambda: f"{_OP}: slope must be a finite float, got {slope!r}")
    check_tensor(x, "x", dtype=(torch.bfloat16, torch.float16, torch.float32), ndim=(2, 3), op=_OP)
    check_tensor(w, "w", dtype=x.dtype, ndim=(2, 3), device=x.device, op=_OP)
    K = x.shape[-1]
    check(w.shape[-1] == K, lambda: f"{_OP}: w must have shape (N, K) or (B, N, K) with K = x.shape[-1] = {K}, "
                                    f"got {tuple(w.shape)}")
    if w.dim() == 3:
        check(x.dim() == 3 and w.shape[0] == x.shape[0],
              lambda: f"{_OP}: a per-row w (B, N, K) needs x of shape (B, T, K) with the same B, got x "
                      f"{tuple(x.shape)} and w {tuple(w.shape)}")
    if use_triton(x):
        item = x.element_size()
        check(K * item % 16 == 0 and w.shape[-2] * item % 16 == 0,
              lambda: f"{_OP}: the TMA kernel needs K and N multiples of {16 // item} for {str(x.dtype)[6:]} "
                      f"(16-byte row strides), got K = {K}, N = {w.shape[-2]}")
        check(x.is_contiguous() and w.is_contiguous(),
              lambda: f"{_OP}: x and w must be contiguous for the TMA kernel; call .contiguous() first")
        if x.is_cuda:
            check(torch.cuda.get_device_capability(x.device)[0] >= 9,
                  lambda: f"{_OP}: the TMA kernel needs compute capability >= 9.0 (Hopper), got "
                          f"{torch.cuda.get_device_capability(x.device)} on {x.device}", RuntimeError)


def _launch(x: Tensor, w: Tensor, act: str, slope: float, save_pre: bool, config: Optional[dict] = None):
    from triton.tools.tensor_descriptor import TensorDescriptor

    x3 = x if x.dim() == 3 else x.unsqueeze(0)
    B, T, K = x3.shape
    w3 = w if w.dim() == 3 else w.unsqueeze(0)
    N = w3.shape[1]
    cfg = dict(default_config(T, N, K, x.is_cuda), **(config or {}))
    BM, BN, BK = cfg["BM"], cfg["BN"], cfg["BK"]
    y = _utils.empty((B, T, N), x.dtype, x.device)
    h = _utils.empty((B, T, N), x.dtype, x.device) if save_pre else y
    xd = TensorDescriptor(x3, [B, T, K], [T * K, K, 1], [1, BM, BK])
    wd = TensorDescriptor(w3, list(w3.shape), [N * K, K, 1], [1, BN, BK])
    yd = TensorDescriptor(y, [B, T, N], [T * N, N, 1], [1, BM, BN])
    hd = TensorDescriptor(h, [B, T, N], [T * N, N, 1], [1, BM, BN])
    tiles = B * triton.cdiv(T, BM) * triton.cdiv(N, BN)
    progs = _num_programs(x.device, tiles)
    _linear_act_kernel[(progs,)](xd, wd, yd, hd, B, T, N, K, float(slope), BM=BM, BN=BN, BK=BK,
                                 ACT=ACTS.index(act), SAVE_PRE=save_pre, PER_ROW_W=w.dim() == 3,
                                 NUM_PROGS=progs, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                                 num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    shape = x.shape[:-1] + (N,)
    return y.view(shape), (h.view(shape) if save_pre else x.new_empty(0))


@torch.library.custom_op("pgolf::linear_act", mutates_args=())
def _op(x: Tensor, w: Tensor, act: str, slope: float, save_pre: bool) -> Tuple[Tensor, Tensor]:
    if use_triton(x):
        return _launch(x, w, act, slope, save_pre)
    y, h = linear_act_ref(x, w, act, slope)
    return y, (h if save_pre else x.new_empty(0))


@_op.register_fake
def _op_fake(x, w, act, slope, save_pre):
    shape = x.shape[:-1] + (w.shape[-2],)
    return x.new_empty(shape), (x.new_empty(shape) if save_pre else x.new_empty(0))


def _setup(ctx, inputs, output):
    x, w, act, slope, save_pre = inputs
    ctx.act, ctx.slope = act, slope
    ctx.save_for_backward(x, w, output[1])


def _backward(ctx, dy, _dh_unused):
    x, w, h = ctx.saved_tensors
    if ctx.act != "none" and h.numel() == 0:
        raise RuntimeError(f"{_OP}: the backward of act={ctx.act!r} needs h; call linear_act with save_pre=True "
                           "(it does so under autograd)")
    dh = act_grad_ref(dy, h, ctx.act, ctx.slope)
    dx = dw = None
    if ctx.needs_input_grad[0]:
        dx = torch.matmul(dh, w)
    if ctx.needs_input_grad[1]:
        if w.dim() == 3:
            dw = torch.matmul(dh.transpose(-1, -2), x)
        else:
            dw = dh.reshape(-1, dh.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
    return dx, dw, None, None, None


_op.register_autograd(_backward, setup_context=_setup)


def linear_act(x: Tensor, w: Tensor, act: str = "leaky_relu_sq", slope: float = 0.5, *,
               save_pre: Optional[bool] = None, validate: bool = True) -> Tensor:
    """``act(x · Wᵀ)``: x (M, K) or (B, T, K); w (N, K), or (B, N, K) with one weight per batch row; bf16, fp16 or
    fp32 (the same for both). ``act``: ``"leaky_relu_sq"`` (leaky_relu(h, slope)², the record models' MLP) or
    ``"none"``. ``save_pre`` (default: when autograd needs it) also keeps h for the backward."""
    if validate:
        check_args(x, w, act, slope)
    if save_pre is None:
        save_pre = act != "none" and torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
    y, _ = _op(x, w, act, float(slope), bool(save_pre))
    return y


class LinearLeakyReLUSquared(torch.nn.Module):
    """Drop-in for ``F.leaky_relu(fc(x), slope).square()`` with ``fc`` a bias-free ``nn.Linear``: holds its weight."""

    def __init__(self, in_features: int, out_features: int, slope: float = 0.5, device=None, dtype=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        torch.nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        self.slope = slope

    @classmethod
    def from_linear(cls, fc: torch.nn.Linear, slope: float = 0.5) -> "LinearLeakyReLUSquared":
        check(fc.bias is None, f"{_OP}: LinearLeakyReLUSquared.from_linear needs a bias-free nn.Linear")
        m = cls(fc.in_features, fc.out_features, slope, device=fc.weight.device, dtype=fc.weight.dtype)
        m.weight = fc.weight
        return m

    def forward(self, x: Tensor) -> Tensor:
        return linear_act(x, self.weight.to(x.dtype), "leaky_relu_sq", self.slope)
