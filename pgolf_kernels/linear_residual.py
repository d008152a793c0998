"""Residual projection: ``out = res + s ⊙ (a · Wᵀ + u · w2ᵀ)``, one TMA GEMM with the residual add in its epilogue.

The transformer block's two residual sites, ``x + attn_scale ⊙ (proj(y) + lora_o(h))`` and ``x + mlp_scale ⊙
(down(act) + lora_mlp(m))``, as one kernel: the projection's GEMM, a LoRA's expand accumulated into the same tile
(u = α · h · Aᵀ is the adapter's (T, r) shrink, w2 its B), and the scaled residual add on the fp32 accumulator.

Math (batch row b; W shared (N, K) or one per row (B, N, K); the second product optional)::

    z[b]   = a[b] · W[b]ᵀ + u[b] · w2[b]ᵀ                  (T, N)   fp32 accumulate
    out[b] = dtype( res[b] + s ⊙ z[b] )                    (T, N)   one rounding; s (N,) scales the columns

Backward (g = ∂L/∂out; s ⊙ W means s[n] · W[n, k], so the scaled gradient s ⊙ g is never written)::

    ∂res   = g
    ∂a[b]  = g[b] · (s ⊙ W[b])                             (T, K)
    ∂u[b]  = g[b] · (s ⊙ w2[b])                            (T, R)
    ∂w2[b] = s ⊙ (g[b]ᵀ · u[b])                            (N, R)
    ∂W     = Σ_b (s ⊙ g[b])ᵀ · a[b]   (per-row W: per b)   only when W needs a gradient (the TTT base is frozen)
    ∂s     = Σ_{b, t} g ⊙ z            (z recomputed)       only when s needs a gradient

Why: in the records' TTT step (64 × 2048 rows, d 512) the torch composition writes the projection's output and the
LoRA delta, then an element-wise pass reads both with the residual and writes the sum: at each of the block's two
sites 2 + 4 passes over a (T, 512) bf16 tensor of 134 MB, against 2 here (read the residual, write the sum); the
pass group they fall in took 9.7 (norms and residuals) + 8.3 (other) GPU-ms of the 103.3 ms step
(``bench/results/profile-ttt-h100.md``, measurement 2). The GEMMs themselves are small (K = 512 or 1536): the
kernel may run them below cuBLAS's speed and still pay. Not measured on a GPU yet.

Kernel: ``linear_act._linear_act_kernel`` (persistent, TMA) with its residual epilogue and the second product;
tile ``linear_act.GRAD_CONFIG`` (128 × 128 × 64, 4 warps, 4 stages: the residual tile does not fit beside 128 ×
256 × 3 stages in shared memory). TMA needs 16-byte row strides: K, N and R multiples of 8 at 2-byte dtypes.
Dispatch as every op of the package: CUDA -> the kernel (Hopper or newer), CPU -> the torch reference, CPU with
TRITON_INTERPRET=1 -> the kernel interpreted.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._utils import check, check_tensor, use_triton

__all__ = ["linear_residual", "linear_residual_ref", "ResidualLinear"]

_OP = "linear_residual"
_FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def _project(a: Tensor, w: Tensor) -> Tensor:
    return torch.matmul(a, w.transpose(-1, -2))


def linear_residual_ref(res: Tensor, a: Tensor, w: Tensor, scale: Tensor, u: Optional[Tensor] = None,
                        w2: Optional[Tensor] = None) -> Tensor:
    """The torch composition a user writes, in the inputs' dtype: ``res + scale * (a · Wᵀ + u · w2ᵀ)`` (each
    product rounded to the dtype, then the element-wise sum)."""
    z = _project(a, w)
    if u is not None:
        z = z + torch.bmm(u, w2.transpose(1, 2))
    return res + scale * z


def _z32(a: Tensor, w: Tensor, u: Optional[Tensor], w2: Optional[Tensor]) -> Tensor:
    """z in fp32 (the kernel's accumulator, for ∂s)."""
    z = _project(a.float(), w.float())
    if u is not None:
        z = z + torch.bmm(u.float(), w2.float().transpose(1, 2))
    return z


@torch.library.custom_op("pgolf::linear_residual", mutates_args=())
def _op(res: Tensor, a: Tensor, w: Tensor, scale: Tensor, u: Optional[Tensor], w2: Optional[Tensor]) -> Tensor:
    if use_triton(a):
        from .linear_act import _launch

        return _launch(a, w, "residual", 0.0, False, aux=res, x2=u, w2=w2, scale=scale)[0]
    return linear_residual_ref(res, a, w, scale, u, w2)


@_op.register_fake
def _op_fake(res, a, w, scale, u, w2):
    return torch.empty_like(res)


def _setup(ctx, inputs, output):
    res, a, w, scale, u, w2 = inputs
    ctx.has_u = u is not None
    ctx.save_for_backward(a, w, scale, u, w2)


def _backward(ctx, g: Tensor):
    a, w, scale, u, w2 = ctx.saved_tensors
    need = ctx.needs_input_grad
    g = g.contiguous()
    col = scale[:, None] if w.dim() == 2 else scale[None, :, None]
    da = du = dw2 = dw = ds = None
    if need[1]:
        da = torch.matmul(g, w * col)
    if ctx.has_u and need[4]:
        du = torch.bmm(g, w2 * scale[None, :, None])
    if ctx.has_u and need[5]:
        dw2 = torch.bmm(g.transpose(1, 2), u) * scale[None, :, None]
    if need[2]:
        gs = g * scale
        dw = (torch.matmul(gs.transpose(-1, -2), a) if w.dim() == 3
              else gs.reshape(-1, gs.shape[-1]).t() @ a.reshape(-1, a.shape[-1]))
    if need[3]:
        ds = (g.float() * _z32(a, w, u, w2)).reshape(-1, g.shape[-1]).sum(0).to(scale.dtype)
    return g, da, dw, ds, du, dw2


_op.register_autograd(_backward, setup_context=_setup)


def check_args(res: Tensor, a: Tensor, w: Tensor, scale: Tensor, u: Optional[Tensor], w2: Optional[Tensor]) -> None:
    """Refuse bad input of ``linear_residual`` by name before any work."""
    check_tensor(a, "a", dtype=_FLOATS, ndim=3, op=_OP)
    B, T, K = a.shape
    check_tensor(w, "w", dtype=a.dtype, ndim=(2, 3), device=a.device, op=_OP)
    N = w.shape[-2]
    check(w.shape[-1] == K and (w.dim() == 2 or w.shape[0] == B),
          lambda: f"{_OP}: w must be (N, K = {K}) or (B = {B}, N, K = {K}), got {tuple(w.shape)}")
    check_tensor(res, "res", dtype=a.dtype, ndim=3, device=a.device, op=_OP)
    check(tuple(res.shape) == (B, T, N),
          lambda: f"{_OP}: res must have shape (B, T, N) = {(B, T, N)} (a's rows, w's N), got {tuple(res.shape)}")
    check_tensor(scale, "scale", dtype=a.dtype, ndim=1, device=a.device, op=_OP)
    check(scale.shape[0] == N, lambda: f"{_OP}: scale must have N = {N} elements, got {scale.shape[0]}")
    check((u is None) == (w2 is None), lambda: f"{_OP}: u and w2 come together (the second product u · w2ᵀ), got "
                                               f"u {'None' if u is None else 'a tensor'} and w2 "
                                               f"{'None' if w2 is None else 'a tensor'}")
    R = 0
    if u is not None:
        check_tensor(u, "u", dtype=a.dtype, ndim=3, device=a.device, op=_OP)
        check_tensor(w2, "w2", dtype=a.dtype, ndim=3, device=a.device, op=_OP)
        R = u.shape[2]
        check(tuple(u.shape[:2]) == (B, T) and tuple(w2.shape) == (B, N, R) and R > 0,
              lambda: f"{_OP}: u must be (B, T, R) = ({B}, {T}, R) and w2 (B, N, R) = ({B}, {N}, R) with R > 0, got "
                      f"u {tuple(u.shape)}, w2 {tuple(w2.shape)}")
    if use_triton(a):
        item = a.element_size()
        check(all(n * item % 16 == 0 for n in (K, N, R)),
              lambda: f"{_OP}: the TMA kernel needs K, N and R multiples of {16 // item} for {str(a.dtype)[6:]} "
                      f"(16-byte row strides), got K = {K}, N = {N}, R = {R}")
        check(all(t.is_contiguous() for t in (res, a, w, scale) + ((u, w2) if u is not None else ())),
              lambda: f"{_OP}: res, a, w, scale{', u, w2' if u is not None else ''} must all be contiguous for the "
                      f"TMA kernel; call .contiguous() first")
        if a.is_cuda:
            check(torch.cuda.get_device_capability(a.device)[0] >= 9,
                  lambda: f"{_OP}: the TMA kernel needs compute capability >= 9.0 (Hopper), got "
                          f"{torch.cuda.get_device_capability(a.device)} on {a.device}", RuntimeError)


def linear_residual(res: Tensor, a: Tensor, w: Tensor, scale: Tensor, u: Optional[Tensor] = None,
                    w2: Optional[Tensor] = None, *, validate: bool = True) -> Tensor:
    """``res + scale ⊙ (a · Wᵀ + u · w2ᵀ)`` in one kernel (module docstring). res (B, T, N); a (B, T, K); w (N, K)
    or (B, N, K); scale (N,); u (B, T, R) and w2 (B, N, R) together or neither; one float dtype (bf16, fp16, fp32)
    and device. Differentiable in every input (a custom op: torch.compile and CUDA graphs take it whole).
    ``validate=False`` skips the checks, for a caller whose shapes are fixed by construction."""
    if validate:
        check_args(res, a, w, scale, u, w2)
    return _op(res, a, w, scale, u, w2)


class ResidualLinear(torch.nn.Module):
    """Drop-in for ``res + scale * proj(a)`` with ``proj`` a bias-free ``nn.Linear`` and ``scale`` a per-channel
    vector (a block's ``attn_scale`` / ``mlp_scale``): holds both as the same Parameters."""

    def __init__(self, proj: torch.nn.Linear, scale: torch.Tensor):
        super().__init__()
        check(proj.bias is None, f"{_OP}: ResidualLinear needs a bias-free nn.Linear")
        check(tuple(scale.shape) == (proj.out_features,),
              lambda: f"{_OP}: scale must have proj.out_features = {proj.out_features} elements, got "
                      f"{tuple(scale.shape)}")
        self.proj, self.scale = proj, scale

    def forward(self, res: Tensor, a: Tensor) -> Tensor:
        return linear_residual(res, a, self.proj.weight.to(a.dtype), self.scale.to(a.dtype))

