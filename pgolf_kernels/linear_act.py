"""Linear layer with its activation in the GEMM's epilogue: ``y = act(x · Wᵀ)``, one persistent TMA kernel.

Math (batch row b; W shared (N, K) or one weight per row (B, N, K), e.g. the merged-LoRA weights E[b])::

    h[b] = x.dtype( x[b] · W[b]ᵀ )                       (T, N)   fp32 accumulate, one rounding
    y[b] = x.dtype( act(h[b]) )                           (T, N)   act(h) = leaky_relu(h, slope)²  or  h

Backward (``leaky_relu_sq``; h is saved by the forward when ``save_pre`` / under autograd)::

    dh   = dy · act'(h),   act'(h) = 2h (h > 0),  2·slope²·h (h <= 0)
    dx[b] = dh[b] · W[b]                                  (T, K)
    dW   = Σ_b dh[b]ᵀ · x[b]  (shared W)   or   dW[b] = dh[b]ᵀ · x[b]  (per-row W)

The MLP (``mlp_leaky_sq``: y = act(x · W_upᵀ) · W_downᵀ) takes its backward's first GEMM through the same kernel
with the activation's derivative in the epilogue (``linear_act_grad``), W_down (d, H) read as a (K, N) weight::

    dh   = (dy · W_down) ⊙ act'(h)                        (T, H)   one kernel, no pass over the (T, H) tensors
    dx   = dh · W_up,  dW_up = dhᵀ · x,  dW_down = dyᵀ · a (cuBLAS; a = act(h) saved by the forward)

Why: in the records' TTT step the MLP's up-projection writes h (64 × 2048 × 1536 bf16, 403 MB) and a separate pass
reads it and writes act(h) (measured on one H200, kernel path, measurement 6 of ``bench/results/profile-ttt-h200.md``:
1.88 ms per step forward over 10 layers, the backward pass 2.78 ms). Here the activation is computed on the fp32
accumulator tile before it leaves the SM. Measured on an H100 (``bench/results/linear-act-h100.md``, records'
shapes at 64 × 2048, K = 512, bf16): without an epilogue the kernel runs at 0.87-0.95× cuBLAS's speed (e), with the
activation 1.39-1.55× cuBLAS + the compiled activation, with the derivative 1.25× (0.571 vs 0.712 ms, e 0.59
against the bare GEMM), the whole MLP forward + backward 1.135× the plain MLP under torch.compile (2.787 vs
3.164 ms). The records' step needs GEMMs at >= 0.73-1.0x
cuBLAS with the element-wise passes absorbed to reach 1.5x its reference (``docs/STATUS.md``). The TTT engine runs
its MLP through ``mlp_leaky_sq`` with ``--fused-mlp`` (``TTTConfig.fused_mlp``; auto: on for the kernel path when the
MLP carries an adapter, as in the records' recipe): in the records' step (H100, ``bench/results/profile-ttt-h100.md``
measurement 5) GPU time 92.65 -> 89.01 ms per step.

A forward may keep act(h) and h's signs instead of h (``linear_act_signs``; ``pack_signs``: 1 bit per element, 8 to
a byte): for slope >= 0, act(h) = h² where h > 0 and slope²·h² elsewhere, so act'(h) = 2√act(h) or -2·slope·√act(h)
(``act_grad_from_signs_ref``), and the backward's first GEMM takes act' from them (``linear_act_grad_signs``). The
relative rounding error of act(h) halves under the square root, so act' is no coarser than from h rounded to the
dtype. ``linear_residual.mlp_residual`` uses it with ``PGOLF_MLP_SIGNS=1``.

Kernel: persistent (one program per SM, tiles strided over programs), operands loaded by TMA through host tensor
descriptors over 3-D views (B, T, K) / (B_w, N, K) / (B, T, N), so a tile never straddles two batch rows and
out-of-range rows and columns are zero-filled on load and clipped on store. TMA needs 16-byte-aligned row strides:
K and N multiples of 8 (2-byte dtypes); the op refuses other shapes by name.

Dispatch: CUDA -> the kernel (Hopper or newer: TMA); CPU -> the torch reference, or the kernel under
TRITON_INTERPRET=1 (the CPU test lane), as every op of the package.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _utils
from ._utils import check, check_tensor, use_triton

ACTS = ("none", "leaky_relu_sq")
_ACT_CODE = {"none": 0, "leaky_relu_sq": 1, "leaky_relu_sq_grad": 2, "residual": 0, "leaky_relu_sq_signs": 3,
             "leaky_relu_sq_grad_signs": 4}
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


def pack_signs(h: Tensor) -> Tensor:
    """(h > 0) packed 8 to a byte along the last dim: (..., N) -> (..., N / 8) uint8, bit j of byte c for column
    8c + j (N a multiple of 8). With act(h) = leaky_relu(h, slope)² these signs and act(h) give act'(h) (slope >= 0),
    so a backward need not keep h: 1 bit per element instead of 16."""
    check(h.dim() >= 1 and h.shape[-1] % 8 == 0,
          lambda: f"pack_signs: h's last dim must be a multiple of 8 (8 signs to a byte), got shape {tuple(h.shape)}")
    pos = (h > 0).to(torch.uint8).reshape(*h.shape[:-1], h.shape[-1] // 8, 8)
    return (pos << torch.arange(8, device=h.device, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)


def unpack_signs(signs: Tensor) -> Tensor:
    """The inverse of ``pack_signs``: (..., N / 8) uint8 -> (..., N) bool."""
    check_tensor(signs, "signs", dtype=torch.uint8, op="unpack_signs")
    bits = (signs[..., None] >> torch.arange(8, device=signs.device, dtype=torch.uint8)) & 1
    return bits.reshape(*signs.shape[:-1], signs.shape[-1] * 8).bool()


def act_grad_from_signs_ref(dy: Tensor, a: Tensor, signs: Tensor, slope: float) -> Tensor:
    """dh = dy · act'(h) with act'(h) recovered from a = act(h) and h's packed signs: 2√a where h > 0, -2·slope·√a
    elsewhere (a = slope²h² there, slope >= 0), in fp32, rounded to dy.dtype."""
    r = a.float().sqrt()
    return (dy.float() * torch.where(unpack_signs(signs), 2.0 * r, (-2.0 * slope) * r)).to(dy.dtype)


def linear_act_ref(x: Tensor, w: Tensor, act: str = "leaky_relu_sq", slope: float = 0.5) -> Tuple[Tensor, Tensor]:
    """Torch reference: (y, h) with h = x · Wᵀ (cuBLAS / torch matmul, x.dtype) and y = act(h)."""
    h = torch.matmul(x, w.transpose(-1, -2)) if w.dim() == 3 else torch.nn.functional.linear(x, w)
    return act_ref(h, act, slope), h


def linear_act_grad_ref(g: Tensor, w: Tensor, h: Tensor, slope: float = 0.5, w_kn: bool = False) -> Tensor:
    """Torch reference of dh = (g · Wᵀ) ⊙ act'(h) (W (N, K)) or (g · W) ⊙ act'(h) (``w_kn``: W stored (K, N), e.g.
    the down-projection's weight (d, H) in the MLP's backward): the GEMM rounded to g.dtype, act' in fp32."""
    wt = w if w_kn else w.transpose(-1, -2)
    return act_grad_ref(torch.matmul(g, wt), h, "leaky_relu_sq", slope)


def mlp_leaky_sq_ref(x: Tensor, w_up: Tensor, w_down: Tensor, slope: float = 0.5) -> Tensor:
    """Torch reference of the record models' MLP: leaky_relu(x · W_upᵀ, slope)² · W_downᵀ."""
    a, _ = linear_act_ref(x, w_up, "leaky_relu_sq", slope)
    return torch.matmul(a, w_down.transpose(-1, -2))


# B and T (rows, window) not specialized: Triton would compile one variant per class (== 1, multiple of 16, other) of
# each, and they bound the tile loop only (the TMA descriptors carry the addresses). In the records' case (c) the
# graphs' preparation met 3 new builds of this kernel (H200, bench/results/warmup-h200.md, Triton build timeline)
@triton.jit(do_not_specialize=["B", "T"])
def _linear_act_kernel(x_desc, w_desc, y_desc, h_desc, x2_desc, w2_desc, s_ptr, sg_ptr, B, T, N, K, R, slope,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ACT: tl.constexpr,
                       SAVE_PRE: tl.constexpr, PER_ROW_W: tl.constexpr, W_KN: tl.constexpr,
                       HAS_X2: tl.constexpr, RES: tl.constexpr, SUBTILE: tl.constexpr,
                       NUM_PROGS: tl.constexpr, PRECISION: tl.constexpr):
    """Tiles (b, m, n), n fastest (the x tile of (b, m) is re-read from L2 by the next tiles; W[b] is N x K, at
    most 1.5 MB for the records' MLP, and stays in L2 across the m tiles). fp32 inputs multiply in IEEE fp32 (not
    TF32: the result must match torch's fp32 matmul); the precision argument is ignored for 16-bit inputs.
    ACT 0: y = h; 1: y = leaky_relu(h)² (h stored too with SAVE_PRE); 2: y = h ⊙ act'(aux) with aux read from
    h_desc (the backward's dh). W_KN: the weight is stored (K, N) (the down-projection's E read as its
    transpose), loaded as (BK, BN) tiles. HAS_X2: a second product accumulated into the same tile, x2[b] · w2[b]ᵀ
    (x2 (B, T, R), w2 (B, N, R): a LoRA's expand, R = its rank). RES (with ACT 0): y = res + s ⊙ acc, res read
    through h_desc, s (N,) from s_ptr, from the fp32 accumulator (one rounding). ACT 3: y = leaky_relu(h)² and the
    signs of h packed 8 to a byte (bit j of byte c: column 8c + j, h > 0) into sg_ptr (B, T, N / 8) uint8 instead of
    h; ACT 4: y = h ⊙ act'(h₀) with act' recovered from a = act(h₀) (read through h_desc) and those signs:
    act' = 2√a where h₀ > 0, -2·slope·√a elsewhere (slope >= 0). SUBTILE: the epilogue runs on the
    tile's two (BM, BN / 2) column halves in turn (y_desc / h_desc have (BM, BN / 2) blocks), so its h / residual
    load and its store stage half the shared memory (128 x 256 x 3 stages then fits with those epilogues)."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(T, BM)
    tiles_n = tl.cdiv(N, BN)
    total = B * tiles_m * tiles_n
    k_steps = tl.cdiv(K, BK)
    for t in tl.range(pid, total, NUM_PROGS, flatten=True):
        b = t // (tiles_m * tiles_n)
        rem = t % (tiles_m * tiles_n)
        om = (rem // tiles_n) * BM
        on = (rem % tiles_n) * BN
        wb = b if PER_ROW_W else 0
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for kk in range(k_steps):
            a = x_desc.load([b, om, kk * BK]).reshape(BM, BK)
            if W_KN:
                w = w_desc.load([wb, kk * BK, on]).reshape(BK, BN)
                acc = tl.dot(a, w, acc, input_precision=PRECISION)
            else:
                w = w_desc.load([wb, on, kk * BK]).reshape(BN, BK)
                acc = tl.dot(a, w.T, acc, input_precision=PRECISION)
        if HAS_X2:  # R is zero-filled by TMA past its end (R = 96 in BK = 64 steps)
            for kk in range(tl.cdiv(R, BK)):
                a2 = x2_desc.load([b, om, kk * BK]).reshape(BM, BK)
                w2 = w2_desc.load([b, on, kk * BK]).reshape(BN, BK)
                acc = tl.dot(a2, w2.T, acc, input_precision=PRECISION)
        if SUBTILE:
            halves = acc.reshape(BM, 2, BN // 2).permute(0, 2, 1)
            acc0, acc1 = halves.split()
            _epilogue(acc0, b, om, on, y_desc, h_desc, s_ptr, sg_ptr, T, N, slope, BM, BN // 2, ACT, SAVE_PRE, RES)
            _epilogue(acc1, b, om, on + BN // 2, y_desc, h_desc, s_ptr, sg_ptr, T, N, slope, BM, BN // 2, ACT, SAVE_PRE,
                      RES)
        else:
            _epilogue(acc, b, om, on, y_desc, h_desc, s_ptr, sg_ptr, T, N, slope, BM, BN, ACT, SAVE_PRE, RES)


@triton.jit
def _epilogue(acc, b, om, on, y_desc, h_desc, s_ptr, sg_ptr, T, N, slope, BM: tl.constexpr, BN: tl.constexpr,
              ACT: tl.constexpr, SAVE_PRE: tl.constexpr, RES: tl.constexpr):
    """The (BM, BN) fp32 accumulator tile at (b, om, on) -> y (and h with SAVE_PRE), per ``_linear_act_kernel``'s
    ACT / RES."""
    dt = y_desc.dtype
    h = acc.to(dt)
    if SAVE_PRE:
        h_desc.store([b, om, on], h.reshape(1, BM, BN))
    if ACT == 1 or ACT == 3:
        hf = h.to(tl.float32)
        pos = hf > 0
        hf = tl.where(pos, hf, slope * hf)
        y = (hf * hf).to(dt)
        if ACT == 3:   # h's signs, 8 to a byte, instead of h
            bits = tl.reshape(pos.to(tl.int32), (BM, BN // 8, 8))
            packed = tl.sum(bits << tl.arange(0, 8)[None, None, :], axis=2)
            sptr, smask = _sign_tile(sg_ptr, b, om, on, T, N, BM, BN)
            tl.store(sptr, packed.to(tl.uint8), mask=smask)
    elif ACT == 4:
        av = h_desc.load([b, om, on]).reshape(BM, BN).to(tl.float32)
        sptr, smask = _sign_tile(sg_ptr, b, om, on, T, N, BM, BN)
        packed = tl.load(sptr, mask=smask, other=0).to(tl.int32)
        bits = (packed[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
        pos = tl.reshape(bits, (BM, BN)) != 0
        r = tl.sqrt(av)
        y = (h.to(tl.float32) * tl.where(pos, 2.0 * r, (-2.0 * slope) * r)).to(dt)
    elif ACT == 2:
        # dh = g * act'(h), g rounded to the dtype first (as the GEMM's output is in the torch composition)
        hh = h_desc.load([b, om, on]).reshape(BM, BN).to(tl.float32)
        y = (h.to(tl.float32) * 2.0 * tl.where(hh > 0, hh, (slope * slope) * hh)).to(dt)
    elif RES:
        cols = on + tl.arange(0, BN)
        sv = tl.load(s_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        res = h_desc.load([b, om, on]).reshape(BM, BN).to(tl.float32)
        y = (res + sv[None, :] * acc).to(dt)
    else:
        y = h
    y_desc.store([b, om, on], y.reshape(1, BM, BN))


@triton.jit
def _sign_tile(sg_ptr, b, om, on, T, N, BM: tl.constexpr, BN: tl.constexpr):
    """Pointers and mask of the (BM, BN / 8) bytes of packed signs that the (BM, BN) tile at (b, om, on) owns in the
    (B, T, N / 8) uint8 buffer (N a multiple of 8)."""
    nb = N // 8
    rows = om + tl.arange(0, BM)
    cols = on // 8 + tl.arange(0, BN // 8)
    ptrs = sg_ptr + b.to(tl.int64) * T * nb + rows[:, None].to(tl.int64) * nb + cols[None, :]
    return ptrs, (rows[:, None] < T) & (cols[None, :] < nb)


# the tile configs ``bench.bench_linear_act`` times (fixed ahead: nothing is autotuned at eval). Compiled for sm_90a
# (``python3 -m pgolf_kernels.sm90_check linear_act``): all use async wgmma and TMA copies without spills; 128 x 256
# with the derivative epilogue needs 278,568 B of shared memory (> 232,448) and cannot launch
TILE_CONFIGS = [dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=3),
                dict(BM=128, BN=256, BK=64, num_warps=8, num_stages=3),
                dict(BM=128, BN=128, BK=64, num_warps=4, num_stages=4),
                dict(BM=64, BN=256, BK=64, num_warps=4, num_stages=4),
                dict(BM=128, BN=256, BK=64, num_warps=8, num_stages=3, SUBTILE=True),
                # two programs per SM (<= 113 KB of shared memory each), so one's epilogue can overlap the other's main
                # loop: the kernel is not warp-specialized (with warp_specialize on either loop Triton 3.6 made no
                # partitions for sm_90a)
                dict(BM=128, BN=128, BK=64, num_warps=4, num_stages=2, SUBTILE=True, PER_SM=2),
                dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=2, SUBTILE=True, PER_SM=2)]
# The defaults by measurement (H100, bench/results/linear-act-h100.md, records' shapes at 64 x 2048, K 512, bf16):
# with the activation in the epilogue 128 x 256 was fastest in all six cases (MLP up-projection 0.419 ms against
# 0.517 for 128 x 128 x 8 warps and 0.455-0.465 for the others); with the derivative epilogue 128 x 128 x 4 warps x
# 4 stages (0.571 ms against 0.662 and 0.619).
# The epilogues that read a (BM, BN) tile (the derivative's h, the residual): 128 x 256 with SUBTILE (SPLIT_CONFIG),
# by measurement against 128 x 128 x 4 warps x 4 stages (TILE_CONFIGS[2], the default before it): in the records'
# TTT step (H100, bench/results/profile-ttt-h100.md, measurement 5, one process) the kernel's 44 launches 18.08 ->
# 17.00 ms and the step's GPU time 90.14 -> 89.01 ms; alone (H200, bench/results/linear-act-h200.md and
# linear-residual-h200.md) the derivative 0.512 vs 0.535 ms, the attention-output residual 0.221 vs 0.262 ms, the
# MLP-down residual 0.411 vs 0.453 ms. Its numeric tests ran on the GPU (H200) at that tile size, tails
# included (-k tile_config in scripts/ttt_step_lane.sh tests). In the step on an H200 (profile-ttt-h200.md,
# measurement 7) the kernel's 22 residual launches 6.96 -> 6.16 ms, the step's GPU time within its run-to-run spread.
FWD_CONFIG = TILE_CONFIGS[1]
SPLIT_CONFIG = TILE_CONFIGS[4]
GRAD_CONFIG = SPLIT_CONFIG
# fp32 operands: the 16-bit default's stages hold twice the bytes, and with the derivative epilogue's h tile the
# kernel needs 262,168 B of shared memory (> 232,448: it failed to launch on an H100); 64 x 128 x 32 needs 98-115 KB
# in every epilogue (sm90_check). fp32 "ieee" dots run on FMAs, not wgmma: this dtype is for references, not speed.
FP32_CONFIG = dict(BM=64, BN=128, BK=32, num_warps=8, num_stages=3)
# 16-bit GPU tiles by epilogue ("leaky_relu_sq", "none", "leaky_relu_sq_grad", "residual") that replace the defaults
# below: how the benches time a candidate inside a whole step (``bench.profile_ttt``'s -t128 variants); empty at eval
TILE_OVERRIDE: dict = {}


def default_config(T: int, N: int, K: int, is_cuda: bool, dtype: torch.dtype = torch.bfloat16,
                   act: str = "leaky_relu_sq") -> dict:
    """Tile sizes, fixed ahead of time (no autotuning at eval). Interpreter: small tiles (its cost grows with
    the tile). GPU, 16-bit: ``FWD_CONFIG`` (128 x 256 x 64), or ``GRAD_CONFIG`` (128 x 256 x 64, 8 warps, 3
    stages, the epilogue on two column halves) for the derivative and residual epilogues; fp32: ``FP32_CONFIG`` (64 x 128 x 32)."""
    check(act in _ACT_CODE, lambda: f"default_config: act must be one of {tuple(_ACT_CODE)}, got {act!r}")
    check(dtype in (torch.bfloat16, torch.float16, torch.float32),
          lambda: f"default_config: dtype must be bfloat16, float16 or float32, got {dtype}", TypeError)
    if not is_cuda:
        return dict(BM=16, BN=16, BK=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(FP32_CONFIG)
    if act in TILE_OVERRIDE:
        return dict(TILE_OVERRIDE[act])
    # an epilogue that reads a (BM, BN) tile (h for the derivative, the residual) does not fit 128 x 256 x 3
    # stages in shared memory as one tile (278,568 B > 232,448 with the derivative, sm90_check); split in two
    # column halves it does (181 / 213 KB)
    # the signs' epilogues repack a tile through shared memory: on the halves of the split tile
    return dict(GRAD_CONFIG if act in ("leaky_relu_sq_grad", "residual", "leaky_relu_sq_grad_signs",
                                       "leaky_relu_sq_signs") else FWD_CONFIG)


def _num_programs(dev: torch.device, tiles: int, per_sm: int = 1) -> Tuple[int, int]:
    """Persistent programs -> (stride, grid). The stride (``NUM_PROGS``, a compile-time constant) is fixed per
    device: ``per_sm`` per SM (2 for a tile whose shared memory lets two programs share an SM, so one's epilogue
    overlaps the other's main loop); 4 off CUDA (the interpreter). The grid is min(tiles, stride): program p takes
    tiles p, p + stride, ..., so a shape with fewer tiles than the stride runs one tile per program, with no
    idle program. Why the stride does not follow the shape: as min(tiles, SMs) it made a new compile of each
    epilogue variant for every small shape; over the records' eval buckets (10 row x 22 window, 128 x 256 tiles,
    132 SMs) that is 11 strides at N = 1536 and 25 at N = 512, and the kernel path's 45 graphs' warm steps took
    33.2 s against the reference's 6.8 s (H100, bench/results/warmup-h100.md; the compiles' share not measured)."""
    stride = 4 if dev.type != "cuda" else per_sm * torch.cuda.get_device_properties(dev).multi_processor_count
    return stride, max(1, min(tiles, stride))


def check_args(x: Tensor, w: Tensor, act: str, slope: float) -> None:
    """Refuse bad input of ``linear_act`` by name before any work."""
    check(act in ACTS, lambda: f"{_OP}: act must be one of {ACTS}, got {act!r}")
    _check_operands(x, w, slope, op=_OP, xname="x", w_kn=False)


def check_grad_args(g: Tensor, w: Tensor, h: Tensor, slope: float, w_kn: bool) -> None:
    """Refuse bad input of ``linear_act_grad`` by name before any work."""
    _check_operands(g, w, slope, op="linear_act_grad", xname="g", w_kn=w_kn, h=h)


def _check_operands(x: Tensor, w: Tensor, slope: float, *, op: str, xname: str, w_kn: bool,
                    h: Optional[Tensor] = None) -> None:
    """x (M, K) / (B, T, K); w (N, K) or, with ``w_kn``, (K, N), optionally with a leading B; h (the epilogue's
    input, optional) the output's shape; 16-byte row strides, contiguity and Hopper where the TMA kernel runs."""
    check(isinstance(slope, (int, float)) and not isinstance(slope, bool) and math.isfinite(slope),
          lambda: f"{op}: slope must be a finite float, got {slope!r}")
    check_tensor(x, xname, dtype=(torch.bfloat16, torch.float16, torch.float32), ndim=(2, 3), op=op)
    check_tensor(w, "w", dtype=x.dtype, ndim=(2, 3), device=x.device, op=op)
    K = x.shape[-1]
    kw, N = (w.shape[-2], w.shape[-1]) if w_kn else (w.shape[-1], w.shape[-2])
    check(kw == K, lambda: f"{op}: w must have shape {'(K, N)' if w_kn else '(N, K)'} or with a leading B, with "
                           f"K = {xname}.shape[-1] = {K}, got {tuple(w.shape)}")
    if w.dim() == 3:
        check(x.dim() == 3 and w.shape[0] == x.shape[0],
              lambda: f"{op}: a per-row w needs {xname} of shape (B, T, K) with the same B, got {xname} "
                      f"{tuple(x.shape)} and w {tuple(w.shape)}")
    if h is not None:
        check_tensor(h, "h", dtype=x.dtype, device=x.device, op=op)
        check(tuple(h.shape) == tuple(x.shape[:-1]) + (N,),
              lambda: f"{op}: h must have shape {tuple(x.shape[:-1]) + (N,)} ({xname}'s rows x N), got "
                      f"{tuple(h.shape)}")
    if use_triton(x):
        item = x.element_size()
        check(K * item % 16 == 0 and N * item % 16 == 0,
              lambda: f"{op}: the TMA kernel needs K and N multiples of {16 // item} for {str(x.dtype)[6:]} "
                      f"(16-byte row strides), got K = {K}, N = {N}")
        check(all(t.is_contiguous() for t in (x, w) + ((h,) if h is not None else ())),
              lambda: f"{op}: {xname}, w{', h' if h is not None else ''} must all be contiguous for the TMA "
                      f"kernel; call .contiguous() first")
        if x.is_cuda:
            check(torch.cuda.get_device_capability(x.device)[0] >= 9,
                  lambda: f"{op}: the TMA kernel needs compute capability >= 9.0 (Hopper), got "
                          f"{torch.cuda.get_device_capability(x.device)} on {x.device}", RuntimeError)


def _launch(x: Tensor, w: Tensor, act: str, slope: float, save_pre: bool, config: Optional[dict] = None,
            aux: Optional[Tensor] = None, w_kn: bool = False, x2: Optional[Tensor] = None,
            w2: Optional[Tensor] = None, scale: Optional[Tensor] = None, signs: Optional[Tensor] = None):
    """The kernel on (B, T, K) x and (N, K) / (B, N, K) w, or (K, N) / (B, K, N) with ``w_kn``; ``aux`` (the
    shape of y): h for the gradient epilogue (act ``"leaky_relu_sq_grad"``), or the residual with ``scale`` (N,)
    (act ``"residual"``: y = aux + scale ⊙ (x · wᵀ + x2 · w2ᵀ)); ``x2`` (B, T, R) and ``w2`` (B, N, R): a second
    product into the same accumulator. ``signs`` (B, T, N / 8) uint8: written by act ``"leaky_relu_sq_signs"``, read
    by ``"leaky_relu_sq_grad_signs"`` (aux = act(h) then)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    x3 = x if x.dim() == 3 else x.unsqueeze(0)
    B, T, K = x3.shape
    w3 = w if w.dim() == 3 else w.unsqueeze(0)
    N = w3.shape[2] if w_kn else w3.shape[1]
    cfg = dict(default_config(T, N, K, x.is_cuda, x.dtype, act), **(config or {}))
    BM, BN, BK = cfg["BM"], cfg["BN"], cfg["BK"]
    sub = bool(cfg.get("SUBTILE", False))
    BNE = BN // 2 if sub else BN   # the epilogue's block width
    y = _utils.empty((B, T, N), x.dtype, x.device)
    if aux is not None:
        h = aux.reshape(B, T, N)
    else:
        h = _utils.empty((B, T, N), x.dtype, x.device) if save_pre else y
    xd = TensorDescriptor(x3, [B, T, K], [T * K, K, 1], [1, BM, BK])
    wd = (TensorDescriptor(w3, list(w3.shape), [K * N, N, 1], [1, BK, BN]) if w_kn
          else TensorDescriptor(w3, list(w3.shape), [N * K, K, 1], [1, BN, BK]))
    yd = TensorDescriptor(y, [B, T, N], [T * N, N, 1], [1, BM, BNE])
    hd = TensorDescriptor(h, [B, T, N], [T * N, N, 1], [1, BM, BNE])
    R = 0
    x2d, w2d = xd, wd
    if x2 is not None:
        R = x2.shape[-1]
        x2d = TensorDescriptor(x2, [B, T, R], [T * R, R, 1], [1, BM, BK])
        w2d = TensorDescriptor(w2, [B, N, R], [N * R, R, 1], [1, BN, BK])
    tiles = B * triton.cdiv(T, BM) * triton.cdiv(N, BN)
    stride, grid = _num_programs(x.device, tiles, int(cfg.get("PER_SM", 1)))
    res = act == "residual"
    _linear_act_kernel[(grid,)](xd, wd, yd, hd, x2d, w2d, scale if res else y, y if signs is None else signs,
                                 B, T, N, K, R, float(slope),
                                 BM=BM, BN=BN, BK=BK, ACT=0 if res else _ACT_CODE[act], SAVE_PRE=save_pre,
                                 PER_ROW_W=w.dim() == 3, W_KN=w_kn, HAS_X2=x2 is not None, RES=res,
                                 SUBTILE=sub, NUM_PROGS=stride, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
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
        dw = weight_grad(dh, x, w.dim() == 3)
    return dx, dw, None, None, None


def weight_grad(grad_out: Tensor, inp: Tensor, per_row: bool) -> Tensor:
    """∂L/∂W of y = inp · Wᵀ: grad_outᵀ · inp per batch row (per-row W, (B, N, K)), or summed over every row (a
    shared W, (N, K))."""
    if per_row:
        return torch.matmul(grad_out.transpose(-1, -2), inp)
    return grad_out.reshape(-1, grad_out.shape[-1]).t() @ inp.reshape(-1, inp.shape[-1])


_op.register_autograd(_backward, setup_context=_setup)


def linear_act(x: Tensor, w: Tensor, act: str = "leaky_relu_sq", slope: float = 0.5, *,
               save_pre: Optional[bool] = None, validate: bool = True) -> Tensor:
    """``act(x · Wᵀ)``: x (M, K) or (B, T, K); w (N, K), or (B, N, K) with one weight per batch row; bf16, fp16 or
    fp32 (the same for both). ``act``: ``"leaky_relu_sq"`` (leaky_relu(h, slope)², the record models' MLP) or
    ``"none"``. ``save_pre`` (default: when autograd needs it) also keeps h for the backward."""
    if validate:
        check_args(x, w, act, slope)
    if save_pre is None:
        save_pre = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
    # act "none": h is y itself and the backward does not read it (two outputs of a custom op may not alias)
    y, _ = _op(x, w, act, float(slope), bool(save_pre) and act != "none")
    return y


def _grad_ws_from_env() -> bool:
    """PGOLF_ACT_GRAD_WS: unset or "1" = ``linear_act_grad`` on the warp-specialized Gluon kernel where it runs
    (``_grad_ws_fits``); "0" = ``_linear_act_kernel``."""
    return _utils.env_choice("PGOLF_ACT_GRAD_WS", {"1": "the warp-specialized Gluon kernel, "
                                                   "pgolf_kernels.linear_act_ws.linear_act_grad_ws",
                                                   "0": "linear_act's kernel"}) == "1"


# On by default: in the records' step on an H200 (bench/results/profile-ttt-h200.md, measurement 10) the 11 derivative
# GEMMs took 3.95 ms against 5.03 ms on _linear_act_kernel, the step's GEMM group 29.74 -> 28.78 ms, and the eval with
# it scored as without it, eager and under CUDA graphs (GPU test, H200).
GRAD_WS: bool = _grad_ws_from_env()


def _grad_ws_fits(g: Tensor, w: Tensor, h: Tensor, w_kn: bool) -> bool:
    """The Gluon derivative's domain: one shared weight stored (K, N), h contiguous, and ``linear_act_ws.runs_on``
    (imported only here, when ``GRAD_WS`` is on: it needs Triton's Gluon)."""
    if not (w_kn and w.dim() == 2 and g.is_cuda and h.is_contiguous()):
        return False
    from .linear_act_ws import runs_on

    return runs_on(g, g.shape[-1], w.shape[1])


@torch.library.custom_op("pgolf::linear_act_grad", mutates_args=())
def _grad_op(g: Tensor, w: Tensor, h: Tensor, slope: float, w_kn: bool) -> Tensor:
    if GRAD_WS and _grad_ws_fits(g, w, h, w_kn):
        from .linear_act_ws import linear_act_grad_ws

        N = h.shape[-1]
        return linear_act_grad_ws(g.reshape(-1, g.shape[-1]), w, h.view(-1, N), slope).view(h.shape)
    if use_triton(g):
        return _launch(g, w, "leaky_relu_sq_grad", slope, False, aux=h, w_kn=w_kn)[0]
    return linear_act_grad_ref(g, w, h, slope, w_kn)


@_grad_op.register_fake
def _grad_op_fake(g, w, h, slope, w_kn):
    return torch.empty_like(h)


def linear_act_grad(g: Tensor, w: Tensor, h: Tensor, slope: float = 0.5, *, w_kn: bool = False,
                    validate: bool = True) -> Tensor:
    """dh = (g · Wᵀ) ⊙ act'(h), act = leaky_relu(·, slope)², one kernel: the backward of ``linear_act`` through the
    layer that consumed its output. g (M, K) or (B, T, K); w (N, K) or, with ``w_kn``, (K, N) (a leading B for
    per-row weights); h (..., N) the saved pre-activation. Not differentiable itself (a backward building block)."""
    if validate:
        check_grad_args(g, w, h, slope, w_kn)
    return _grad_op(g, w, h, float(slope), bool(w_kn))


def linear_act_signs(x: Tensor, w: Tensor, slope: float, *, validate: bool = True) -> Tuple[Tensor, Tensor]:
    """(a, signs) = (leaky_relu(x · Wᵀ, slope)², ``pack_signs(x · Wᵀ)``) from one kernel on the GPU (the activation
    and the packing in the epilogue; h is never stored), the torch composition elsewhere. x (B, T, K); W (N, K) or
    (B, N, K); N a multiple of 8. A building block of ``linear_residual.mlp_residual`` (not differentiable itself).
    ``validate=False`` skips the checks of x and w (a caller that has made them)."""
    if validate:
        check_args(x, w, "leaky_relu_sq", slope)
    check(w.shape[-2] % 8 == 0, lambda: f"linear_act_signs: w's N ({w.shape[-2]}) must be a multiple of 8 (8 signs "
                                        f"to a byte)")
    check(slope >= 0, lambda: f"linear_act_signs: slope must be >= 0 (act' is recovered from act(h) and h's signs "
                              f"only then), got {slope}")
    if use_triton(x):
        signs = _utils.empty(x.shape[:-1] + (w.shape[-2] // 8,), torch.uint8, x.device)
        return _launch(x, w, "leaky_relu_sq_signs", slope, False, signs=signs)[0], signs
    a, h = linear_act_ref(x, w, "leaky_relu_sq", slope)
    return a, pack_signs(h)


def linear_act_grad_signs_ref(g: Tensor, w: Tensor, a: Tensor, signs: Tensor, slope: float = 0.5,
                              w_kn: bool = False) -> Tensor:
    """Torch reference of ``linear_act_grad_signs``: the GEMM rounded to g.dtype, act' from a and the signs in fp32."""
    wt = w if w_kn else w.transpose(-1, -2)
    return act_grad_from_signs_ref(torch.matmul(g, wt), a, signs, slope)


@torch.library.custom_op("pgolf::linear_act_grad_signs", mutates_args=())
def _grad_signs_op(g: Tensor, w: Tensor, a: Tensor, signs: Tensor, slope: float, w_kn: bool) -> Tensor:
    """dh = (g · Wᵀ) ⊙ act'(h) with act' from a = act(h) and h's packed signs, one kernel (``linear_act_grad``'s
    twin for a forward that kept act(h) and the signs instead of h)."""
    if use_triton(g):
        return _launch(g, w, "leaky_relu_sq_grad_signs", slope, False, aux=a, w_kn=w_kn, signs=signs)[0]
    return linear_act_grad_signs_ref(g, w, a, signs, slope, w_kn)


@_grad_signs_op.register_fake
def _grad_signs_op_fake(g, w, a, signs, slope, w_kn):
    return torch.empty_like(a)


@torch.library.custom_op("pgolf::mlp_leaky_sq", mutates_args=())
def _mlp_op(x: Tensor, w_up: Tensor, w_down: Tensor, slope: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(y, a, h): h = x · W_upᵀ, a = act(h) (one kernel), y = a · W_downᵀ (cuBLAS)."""
    if use_triton(x):
        a, h = _launch(x, w_up, "leaky_relu_sq", slope, True)
    else:
        a, h = linear_act_ref(x, w_up, "leaky_relu_sq", slope)
    return torch.matmul(a, w_down.transpose(-1, -2)), a, h


@_mlp_op.register_fake
def _mlp_op_fake(x, w_up, w_down, slope):
    hid = x.shape[:-1] + (w_up.shape[-2],)
    return x.new_empty(x.shape[:-1] + (w_down.shape[-2],)), x.new_empty(hid), x.new_empty(hid)


def _mlp_setup(ctx, inputs, output):
    x, w_up, w_down, slope = inputs
    ctx.slope = slope
    ctx.save_for_backward(x, w_up, w_down, output[1], output[2])


def _mlp_backward(ctx, dy, _da, _dh):
    """dh = (dy · W_down) ⊙ act'(h) in one kernel (W_down (d, H) is the (K, N) layout), then cuBLAS: dx = dh · W_up,
    dW_up = dhᵀ · x, dW_down = dyᵀ · a (summed over rows for shared weights)."""
    x, w_up, w_down, a, h = ctx.saved_tensors
    dy = dy.contiguous()
    dh = _grad_op(dy, w_down, h, ctx.slope, True)
    need = ctx.needs_input_grad

    dx = torch.matmul(dh, w_up) if need[0] else None
    dw_up = weight_grad(dh, x, w_up.dim() == 3) if need[1] else None
    dw_down = weight_grad(dy, a, w_down.dim() == 3) if need[2] else None
    return dx, dw_up, dw_down, None


_mlp_op.register_autograd(_mlp_backward, setup_context=_mlp_setup)


def mlp_leaky_sq(x: Tensor, w_up: Tensor, w_down: Tensor, slope: float = 0.5, *, validate: bool = True) -> Tensor:
    """The record models' MLP, ``leaky_relu(x · W_upᵀ, slope)² · W_downᵀ``, with the activation in the up-projection's
    epilogue and its derivative in the epilogue of the backward's first GEMM: no element-wise pass over the hidden
    (T, H) tensor either way. x (M, d) or (B, T, d); W_up (H, d), W_down (d_out, H), each optionally with a leading
    B (per-row weights, e.g. merged LoRA). Saves x, h and act(h) for the backward."""
    if validate:
        check_args(x, w_up, "leaky_relu_sq", slope)
        check_tensor(w_down, "w_down", dtype=x.dtype, ndim=(2, 3), device=x.device, op="mlp_leaky_sq")
        check(w_down.dim() == w_up.dim() and w_down.shape[-1] == w_up.shape[-2] and w_down.shape[:-2] == w_up.shape[:-2],
              lambda: f"mlp_leaky_sq: w_down must have shape (d_out, H) with H = w_up.shape[-2] = {w_up.shape[-2]} and "
                      f"the same leading dims as w_up {tuple(w_up.shape[:-2])}, got {tuple(w_down.shape)}")
        if use_triton(x):
            check(w_down.shape[-2] * x.element_size() % 16 == 0 and w_down.is_contiguous(),
                  lambda: f"mlp_leaky_sq: w_down must be contiguous with d_out a multiple of {16 // x.element_size()} "
                          f"for the TMA kernel of its backward, got {tuple(w_down.shape)}")
    return _mlp_op(x, w_up, w_down, float(slope))[0]


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


class LeakyReLUSquaredMLP(torch.nn.Module):
    """Drop-in for ``proj(F.leaky_relu(fc(x), slope).square())`` with bias-free ``fc`` and ``proj``: ``mlp_leaky_sq``
    on their weights (kept as the same Parameters)."""

    def __init__(self, fc: torch.nn.Linear, proj: torch.nn.Linear, slope: float = 0.5):
        super().__init__()
        check(fc.bias is None and proj.bias is None, "mlp_leaky_sq: LeakyReLUSquaredMLP needs bias-free fc and proj")
        check(proj.in_features == fc.out_features,
              f"mlp_leaky_sq: proj.in_features ({proj.in_features}) must equal fc.out_features ({fc.out_features})")
        self.fc, self.proj, self.slope = fc, proj, slope

    def forward(self, x: Tensor) -> Tensor:
        return mlp_leaky_sq(x, self.fc.weight.to(x.dtype), self.proj.weight.to(x.dtype), self.slope)
