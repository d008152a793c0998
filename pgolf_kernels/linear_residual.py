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
kernel may run them below cuBLAS's speed and still pay. Measured in that step (H100, measurement 3): 100.48 -> 97.62
ms per step with both sites through this op, the MLP site's kernel at 489 TFLOP/s (0.448 ms, against 0.31 ms for
cuBLAS's bare down-projection GEMM that it replaces together with the residual pass and the LoRA expand).

Kernel: on sm_90 with one shared 16-bit weight, ``linear_act_ws.linear_residual_ws`` (the warp-specialized Gluon GEMM,
``RES_WS``, on by default); else ``linear_act._linear_act_kernel`` (persistent, TMA) with its residual epilogue and
the second product;
tile ``linear_act.GRAD_CONFIG`` (128 × 256 × 64, 8 warps, 3 stages, the epilogue on the tile's two column halves:
the residual tile of the whole 128 × 256 tile does not fit beside 3 stages in shared memory). TMA needs 16-byte
row strides: K, N and R multiples of 8 at 2-byte dtypes.
Dispatch as every op of the package: CUDA -> the kernel (Hopper or newer), CPU -> the torch reference, CPU with
TRITON_INTERPRET=1 -> the kernel interpreted.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._utils import check, check_tensor, env_choice, use_triton
from .linear_act import _grad_op, _grad_signs_op, _launch, act_ref, linear_act_ref, linear_act_signs, weight_grad
from .linear_act import check_args as _check_act

__all__ = ["linear_residual", "linear_residual_ref", "mlp_residual", "mlp_residual_ref", "ResidualLinear"]

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


def _z(a: Tensor, w: Tensor, u: Optional[Tensor], w2: Optional[Tensor]) -> Tensor:
    """z = a · Wᵀ + u · w2ᵀ for ∂s, each product in the inputs' dtype (fp32 accumulate, rounded once, as the torch
    composition's own products are), summed in fp32. Why not fp32 operands: an fp32 GEMM runs on the CUDA cores
    without TF32 (67 against 989 dense bf16 TFLOP/s on an H100 SXM, by NVIDIA's data sheet), and ∂s is needed wherever
    the gains train: both sites of every block in each step of the phased recipe's global passes."""
    z = _project(a, w).float()
    if u is not None:
        z = z + torch.bmm(u, w2.transpose(1, 2)).float()
    return z


def _res_ws_from_env() -> bool:
    """PGOLF_RES_WS: unset or "1" = the residual sites' GEMM (``linear_residual`` and ``mlp_residual``'s
    down-projection) on the warp-specialized Gluon kernel where it runs (``linear_act_ws.residual_fits``); "0" =
    ``_linear_act_kernel``."""
    return env_choice("PGOLF_RES_WS", {"1": "the warp-specialized Gluon kernel, "
                                       "pgolf_kernels.linear_act_ws.linear_residual_ws",
                                       "0": "linear_act's kernel"}) == "1"


# On by default: in the records' step on an H100 (bench/results/profile-ttt-h100.md, measurement 13, one process,
# each variant twice) the attention-output residual's 11 launches 2.33 -> 1.81 ms and the MLP down-projection's
# 4.23 -> 3.67 ms, the step outside attention 53.30 / 53.31 -> 52.22 / 52.27 GPU-ms; its GPU tests against fp64 and
# the eval with it (eager and under CUDA graphs) passed on that H100
RES_WS: bool = _res_ws_from_env()


def _residual(res: Tensor, a: Tensor, w: Tensor, scale: Tensor, u: Optional[Tensor], w2: Optional[Tensor]) -> Tensor:
    """The residual GEMM on the GPU: ``linear_residual_ws`` when ``RES_WS`` and it fits (imported only then: it needs
    Triton's Gluon), else ``_linear_act_kernel``."""
    if RES_WS and a.is_cuda:
        from .linear_act_ws import linear_residual_ws, residual_fits

        if residual_fits(a, w, u):   # the site's checks ran in linear_residual / mlp_residual
            return linear_residual_ws(res, a, w, scale, u, w2, validate=False)
    return _launch(a, w, "residual", 0.0, False, aux=res, x2=u, w2=w2, scale=scale)[0]


@torch.library.custom_op("pgolf::linear_residual", mutates_args=())
def _op(res: Tensor, a: Tensor, w: Tensor, scale: Tensor, u: Optional[Tensor], w2: Optional[Tensor]) -> Tensor:
    if use_triton(a):
        return _residual(res, a, w, scale, u, w2)
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
        dw = weight_grad(g * scale, a, w.dim() == 3)
    if need[3]:
        ds = (g.float() * _z(a, w, u, w2)).reshape(-1, g.shape[-1]).sum(0).to(scale.dtype)
    return g, da, dw, ds, du, dw2


_op.register_autograd(_backward, setup_context=_setup)


def mlp_residual_ref(res: Tensor, x: Tensor, w_up: Tensor, w_down: Tensor, scale: Tensor, slope: float = 0.5,
                     u: Optional[Tensor] = None, w2: Optional[Tensor] = None) -> Tensor:
    """The torch composition of ``mlp_residual``: ``res + scale * (leaky_relu(x · W_upᵀ, slope)² · W_downᵀ + u · w2ᵀ)``
    (the activation in fp32 from the rounded pre-activation, as ``linear_act_ref``)."""
    a, _ = linear_act_ref(x, w_up, "leaky_relu_sq", slope)
    return linear_residual_ref(res, a, w_down, scale, u, w2)


def _mlp_ws_from_env() -> bool:
    """PGOLF_MLP_UP_WS: unset or "1" = ``mlp_residual``'s up-projection on the warp-specialized Gluon kernel where it
    runs (``_ws_fits``); "0" = ``_linear_act_kernel``."""
    return env_choice("PGOLF_MLP_UP_WS", {"1": "the warp-specialized Gluon kernel, pgolf_kernels.linear_act_ws",
                                          "0": "linear_act's kernel"}) == "1"


# On by default: in isolation the Gluon kernel took 0.4787 ms against 0.5254 ms for linear_act's default tile on the
# records' up-projection (H100, bench/results/linear-act-h100.md); in the records' step (H100, profile-ttt-h100.md
# measurements 9-11) mlp_residual took 8.87-8.89 against 9.25-9.32 ms in four runs, the step's GPU time -0.30 to
# -0.67 ms. The eval with it, eager and under CUDA graphs, scores as without it (GPU test
# test_gpu_eval_with_mlp_residual_switches_scores_like_without[MLP_UP_WS], H100).
MLP_UP_WS: bool = _mlp_ws_from_env()


def _ws_fits(x: Tensor, w_up: Tensor) -> bool:
    """The Gluon up-projection's domain: one shared (H, d) weight and ``linear_act_ws.runs_on`` (imported only here,
    when ``MLP_UP_WS`` is on: it needs Triton's Gluon)."""
    if not (w_up.dim() == 2 and x.is_cuda):
        return False
    from .linear_act_ws import runs_on

    return runs_on(x, x.shape[-1], w_up.shape[0])


def _up(x: Tensor, w_up: Tensor, slope: float) -> Tuple[Tensor, Tensor]:
    """(act(h), h) of the up-projection on the GPU: ``linear_act_ws`` when ``MLP_UP_WS`` and it fits, else
    ``_linear_act_kernel``."""
    if MLP_UP_WS and _ws_fits(x, w_up):
        from .linear_act_ws import linear_act_ws

        B, T, K = x.shape
        a, h = linear_act_ws(x.reshape(B * T, K), w_up, slope)
        return a.view(B, T, -1), h.view(B, T, -1)
    return _launch(x, w_up, "leaky_relu_sq", slope, True)


def _mlp_signs_from_env() -> bool:
    """PGOLF_MLP_SIGNS: "1" = ``mlp_residual`` keeps act(h) and h's signs (1 bit per element) for its backward
    instead of h; unset or "0" = it keeps h."""
    return env_choice("PGOLF_MLP_SIGNS", {"0": "keep h", "1": "keep h's signs, linear_act.pack_signs"}) == "1"


# Off by default, by measurement. Why it was tried: the up-projection writes h (64 x 2048 x 1536 bf16, 403 MB per
# layer in the records' step) only for the backward's act'(h); act(h) is kept anyway and with h's signs gives act'(h)
# (linear_act.act_grad_from_signs_ref), for 25 MB. In the records' step (H100, profile-ttt-h100.md measurement 11,
# one process) the forward's 11 mlp_residual calls took 8.94 against 9.32 ms, but the derivative GEMM with act'
# rebuilt from act(h) and the unpacked signs 6.21 against 5.18 ms (its epilogue reshapes the (BM, BN / 8, 8) bits
# back to the tile), so the step lost ~0.65 ms; the Gluon up-projection (MLP_UP_WS, 8.87 ms) is faster still. With
# both switches on, this one decides (the signs forward runs on linear_act's kernel).
MLP_SIGNS: bool = _mlp_signs_from_env()


def _mlp_down_act_from_env() -> bool:
    """PGOLF_MLP_DOWN_ACT: "1" = ``mlp_residual``'s forward as h = x · W_upᵀ on cuBLAS and the down-projection on the
    Gluon residual kernel with act(h) formed in registers from h (``linear_residual_ws(pre_act=slope)``), where it
    runs; unset or "0" = act(h) written by the up-projection's epilogue and read by the down-projection."""
    return env_choice("PGOLF_MLP_DOWN_ACT", {"0": "act(h) written by the up-projection",
                                             "1": "act(h) in the down-projection's A operand"}) == "1"


# Off by default, by measurement. Why it was tried: the up-projection's epilogue writes act(h) (403 MB per layer in
# the records' step) only for the down-projection to read it. In the step on an H100 (profile-ttt-h100.md,
# measurement 13) h on cuBLAS took 3.04 ms for 11 layers against 4.70 for the Gluon up-projection writing h and
# act(h), but the down-projection with the activation in its A operand 6.21 against 3.67 ms on smem operands: the
# consumer's smem -> register load and activation per k-step do not overlap the wgmma (the two consumers' main loops
# take turns), so the step lost ~0.8 ms against RES_WS alone. Correct on the GPU (tests against fp64, the eval).
MLP_DOWN_ACT: bool = _mlp_down_act_from_env()


def _down_act_fits(x: Tensor, w_up: Tensor, w_down: Tensor, u: Optional[Tensor]) -> bool:
    """``MLP_DOWN_ACT``'s domain: a CUDA x, one shared W_up, and the Gluon residual kernel's (``residual_fits``)."""
    if not (x.is_cuda and w_up.dim() == 2):
        return False
    from .linear_act_ws import residual_fits

    return residual_fits(x, w_down, u)


@torch.library.custom_op("pgolf::mlp_residual", mutates_args=())
def _mlp_op(res: Tensor, x: Tensor, w_up: Tensor, w_down: Tensor, scale: Tensor, slope: float,
            u: Optional[Tensor], w2: Optional[Tensor], signs: bool = False,
            down_act: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """(out, a, h), or with ``signs`` (out, a, pack_signs(h)): h = x · W_upᵀ and a = act(h) from one kernel (the
    activation in its epilogue), then out from the residual kernel (a · W_downᵀ + u · w2ᵀ, the residual add in its
    epilogue). ``down_act``: (out, an empty a, h), h from cuBLAS and act(h) formed inside the residual kernel."""
    if down_act:
        from .linear_act_ws import linear_residual_ws

        h = torch.matmul(x, w_up.t())
        return linear_residual_ws(res, h, w_down, scale, u, w2, pre_act=slope), x.new_empty(0), h
    if signs:
        a, keep = linear_act_signs(x, w_up, slope, validate=False)   # mlp_residual checked x and W_up
    elif use_triton(x):
        a, keep = _up(x, w_up, slope)
    else:
        a, keep = linear_act_ref(x, w_up, "leaky_relu_sq", slope)
    if use_triton(x):
        return _residual(res, a, w_down, scale, u, w2), a, keep
    return linear_residual_ref(res, a, w_down, scale, u, w2), a, keep


@_mlp_op.register_fake
def _mlp_op_fake(res, x, w_up, w_down, scale, slope, u, w2, signs=False, down_act=False):
    hid = x.shape[:-1] + (w_up.shape[-2],)
    keep = x.new_empty(x.shape[:-1] + (w_up.shape[-2] // 8,), dtype=torch.uint8) if signs else x.new_empty(hid)
    return torch.empty_like(res), x.new_empty(0) if down_act else x.new_empty(hid), keep


def _mlp_setup(ctx, inputs, output):
    res, x, w_up, w_down, scale, slope, u, w2, signs, down_act = inputs
    ctx.slope, ctx.has_u, ctx.signs = slope, u is not None, signs
    ctx.save_for_backward(x, w_up, w_down, scale, u, w2, output[1], output[2])


def _mlp_backward(ctx, g: Tensor, _da, _dh):
    """∂res = g; dh = (g · (s ⊙ W_down)) ⊙ act'(h) in one kernel (the derivative in the epilogue of the GEMM, W_down
    (d, H) read as its (K, N) layout); ∂x = dh · W_up; u, w2 as ``linear_residual``; ∂W_up = dhᵀ · x, ∂W_down =
    (s ⊙ g)ᵀ · a (per row for per-row weights, e.g. merged adapters), ∂s = Σ g ⊙ z (only where needed)."""
    x, w_up, w_down, scale, u, w2, a, keep = ctx.saved_tensors
    need = ctx.needs_input_grad
    if a.numel() == 0 and (need[3] or need[4]):   # down_act kept h only: act(h) again for ∂W_down, ∂s
        a = act_ref(keep, "leaky_relu_sq", ctx.slope)
    g = g.contiguous()
    w_dn_s = (w_down * (scale[:, None] if w_down.dim() == 2 else scale[None, :, None])).contiguous()
    # linear_act_grad (from h) or linear_act_grad_signs (from act(h) and h's signs): the kernel, or its torch
    # reference on a CPU
    dh = (_grad_signs_op(g, w_dn_s, a, keep, ctx.slope, True) if ctx.signs
          else _grad_op(g, w_dn_s, keep, ctx.slope, True))

    dx = torch.matmul(dh, w_up) if need[1] else None
    dw_up = weight_grad(dh, x, w_up.dim() == 3) if need[2] else None
    dw_down = weight_grad(g * scale, a, w_down.dim() == 3) if need[3] else None
    ds = ((g.float() * _z(a, w_down, u, w2)).reshape(-1, g.shape[-1]).sum(0).to(scale.dtype)
          if need[4] else None)
    du = torch.bmm(g, w2 * scale[None, :, None]) if ctx.has_u and need[6] else None
    dw2 = torch.bmm(g.transpose(1, 2), u) * scale[None, :, None] if ctx.has_u and need[7] else None
    return g, dx, dw_up, dw_down, ds, None, du, dw2, None, None


_mlp_op.register_autograd(_mlp_backward, setup_context=_mlp_setup)


def mlp_residual(res: Tensor, x: Tensor, w_up: Tensor, w_down: Tensor, scale: Tensor, slope: float = 0.5,
                 u: Optional[Tensor] = None, w2: Optional[Tensor] = None, *, validate: bool = True) -> Tensor:
    """The record models' MLP at its residual site, ``res + scale ⊙ (leaky_relu(x · W_upᵀ, slope)² · W_downᵀ +
    u · w2ᵀ)``, in two kernels: the up-projection with the activation in its epilogue, the down-projection with
    the second product and the residual add in its epilogue; backward: the activation's derivative in the epilogue
    of its first GEMM (``linear_act_grad``, s folded into W_down), so no element-wise pass touches the (T, H)
    tensors either way. x (B, T, d); W_up (H, d) and W_down (N, H), shared or with a leading B (per-row weights,
    e.g. merged up / down adapters); res (B, T, N); scale (N,); u (B, T, R) and w2 (B, N, R) together or neither
    (a LoRA of x read beside the MLP, the records' mlp adapter). Saves x, h and act(h) for the backward; with
    ``MLP_SIGNS`` (``PGOLF_MLP_SIGNS=1``) x, act(h) and h's packed signs instead of h."""
    if validate:
        op = "mlp_residual"
        check_tensor(x, "x", dtype=_FLOATS, ndim=3, op=op)
        _check_act(x, w_up, "leaky_relu_sq", slope)
        check(w_down.dim() == w_up.dim(), lambda: f"{op}: w_down must have w_up's number of dimensions "
                                                  f"({w_up.dim()}), got {tuple(w_down.shape)}")
        _check_site(op, res, x, tuple(x.shape[:2]) + (w_up.shape[-2],), w_down, scale, u, w2, layout=(w_up,))
    # where h <= 0, √act(h) = |slope·h|, so act'(h) = 2·slope²·h = -2·slope·√act(h) only for slope >= 0
    signs = MLP_SIGNS and slope >= 0 and w_up.shape[-2] % 8 == 0
    down_act = MLP_DOWN_ACT and not signs and use_triton(x) and _down_act_fits(x, w_up, w_down, u)
    return _mlp_op(res, x, w_up, w_down, scale, float(slope), u, w2, signs, down_act)[0]


def check_args(res: Tensor, a: Tensor, w: Tensor, scale: Tensor, u: Optional[Tensor], w2: Optional[Tensor]) -> None:
    """Refuse bad input of ``linear_residual`` by name before any work."""
    check_tensor(a, "a", dtype=_FLOATS, ndim=3, op=_OP)
    _check_site(_OP, res, a, a.shape, w, scale, u, w2)


def _check_site(op: str, res: Tensor, x: Tensor, a_shape, w: Tensor, scale: Tensor, u: Optional[Tensor],
                w2: Optional[Tensor], layout=()) -> None:
    """The residual site's arguments against the (B, T, K) input of its GEMM (``a_shape``; x gives dtype and
    device): w (N, K) or (B, N, K), res (B, T, N), scale (N,), u / w2; then, where the TMA kernel runs, 16-byte
    row strides and contiguity of these and of ``layout`` (more tensors the kernels read)."""
    B, T, K = a_shape
    check_tensor(w, "w" if op == _OP else "w_down", dtype=x.dtype, ndim=(2, 3), device=x.device, op=op)
    N = w.shape[-2]
    check(w.shape[-1] == K and (w.dim() == 2 or w.shape[0] == B),
          lambda: f"{op}: {'w' if op == _OP else 'w_down'} must be (N, K = {K}) or (B = {B}, N, K = {K}), got "
                  f"{tuple(w.shape)}")
    check_tensor(res, "res", dtype=x.dtype, ndim=3, device=x.device, op=op)
    check(tuple(res.shape) == (B, T, N),
          lambda: f"{op}: res must have shape (B, T, N) = {(B, T, N)}, got {tuple(res.shape)}")
    check_tensor(scale, "scale", dtype=x.dtype, ndim=1, device=x.device, op=op)
    check(scale.shape[0] == N, lambda: f"{op}: scale must have N = {N} elements, got {scale.shape[0]}")
    check((u is None) == (w2 is None), lambda: f"{op}: u and w2 come together (the second product u · w2ᵀ), got "
                                               f"u {'None' if u is None else 'a tensor'} and w2 "
                                               f"{'None' if w2 is None else 'a tensor'}")
    R = 0
    if u is not None:
        check_tensor(u, "u", dtype=x.dtype, ndim=3, device=x.device, op=op)
        check_tensor(w2, "w2", dtype=x.dtype, ndim=3, device=x.device, op=op)
        R = u.shape[2]
        check(tuple(u.shape[:2]) == (B, T) and tuple(w2.shape) == (B, N, R) and R > 0,
              lambda: f"{op}: u must be (B, T, R) = ({B}, {T}, R) and w2 (B, N, R) = ({B}, {N}, R) with R > 0, got "
                      f"u {tuple(u.shape)}, w2 {tuple(w2.shape)}")
    if use_triton(x):
        item = x.element_size()
        check(all(n * item % 16 == 0 for n in (K, N, R)),
              lambda: f"{op}: the TMA kernel needs K, N and R multiples of {16 // item} for {str(x.dtype)[6:]} "
                      f"(16-byte row strides), got K = {K}, N = {N}, R = {R}")
        ts = (res, x, w, scale) + tuple(layout) + ((u, w2) if u is not None else ())
        check(all(t.is_contiguous() for t in ts),
              lambda: f"{op}: every tensor argument must be contiguous for the TMA kernel; call .contiguous() first")
        if x.is_cuda:
            check(torch.cuda.get_device_capability(x.device)[0] >= 9,
                  lambda: f"{op}: the TMA kernel needs compute capability >= 9.0 (Hopper), got "
                          f"{torch.cuda.get_device_capability(x.device)} on {x.device}", RuntimeError)


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

