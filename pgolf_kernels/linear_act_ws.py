"""Warp-specialized Hopper GEMM with the leaky_relu² epilogue, its derivative, the residual epilogue or a sum of
per-row products (Gluon): the MLP's up-projection and backward GEMM of ``linear_act``, ``linear_residual``'s residual
sites and ``lora_merged.sum_products``.

``linear_residual`` runs both residual sites on it by default (``linear_residual.RES_WS``, ``PGOLF_RES_WS=0`` turns
it off): ``linear_residual_ws``, out = res + s ⊙ (a · Wᵀ + u · w2ᵀ) with the LoRA expand's steps after the GEMM's in
the same accumulator and tiles cut per batch row (any T; a row's last tile stores through a (1, BM, BN) box). In the
records' step on an H100 (bench/results/profile-ttt-h100.md, measurement 13) the attention-output residual's 11
launches took 1.81 against 2.33 ms on ``_linear_act_kernel`` and the MLP down-projection's 3.67 against 4.23 ms.
With ``pre_act`` the A operand is act(h) formed in registers from h tiles (``linear_residual.MLP_DOWN_ACT``, off:
6.21 ms for those 11 down-projections in the same measurement, the activation not overlapped with the wgmma).

``sum_products_ws``: y[b] = Σ_i x_i[b] · w_i[b] (up to 4 sources, w_i stored (K_i, N) per batch row), the merged
q / k / v backward's dx with the o shrink's term (``lora_merged.sum_products`` with ``SUM_WS``, on by default,
``PGOLF_SUM_WS=0`` turns it off): in the records' step on an H100 (measurement 15) 2.72 against 3.38 ms for the
Triton kernel's 12 launches. ``linear_rows_ws``: [x · E_iᵀ] for up to three per-row weights in one launch, the merged
q / k / v forward (``lora_merged.forward`` with ``QKV_WS``, ``PGOLF_QKV_WS=1``; off by measurement: in the records'
step on an H100 (measurement 16) it took 3.09 ms against the 33 cuBLAS bmm's 3.01 ms, the step 83.19 -> 83.43
GPU-ms).

``linear_residual.mlp_residual`` runs its backward's derivative GEMM on it by default (``linear_act.GRAD_WS``,
``PGOLF_ACT_GRAD_WS=0`` turns it off: the records' step's 11 derivative GEMMs 5.03 -> 3.95 ms on an H200,
bench/results/profile-ttt-h200.md measurement 10), and its up-projection (``linear_residual.MLP_UP_WS``;
``PGOLF_MLP_UP_WS=0`` turns it off): in the records' step that took ``mlp_residual`` from 9.25-9.32 to 8.87-8.89 ms
in four runs, the step's GPU time -0.30 to -0.67 ms (H100, bench/results/profile-ttt-h100.md, measurements 9-11),
and the eval with it scores as without it, eager and under CUDA graphs (GPU test, H100).
Alone (H100, bench/results/linear-act-h100.md, ``scripts/ttt_step_lane.sh OUT ws``) its GPU tests against the fp64
oracle passed and the records' up-projection (131,072 x 512 -> 1536, h and y stored) took 0.4787 ms against 0.5254
ms for ``_linear_act_kernel``'s default tile with the same epilogue (1.098x) and 0.3399 ms for cuBLAS's GEMM without
an epilogue. ``compile_stats`` reports registers, spills and shared memory without a GPU.

Math (as ``linear_act.linear_act_ref`` with act "leaky_relu_sq"; x (M, K), W (N, K), 16-bit)::

    h = x.dtype(x · Wᵀ)                       fp32 accumulate, one rounding
    y = x.dtype(leaky_relu(float(h), slope)²)

the derivative (``linear_act_grad_ws``; g (M, K), W stored (K, N), h (M, N))::

    dh = x.dtype(x.dtype(g · W) · act'(h))    act'(h) = 2h (h > 0), 2·slope²·h (h <= 0)

and the residual (``linear_residual_ws``; per batch row b of T rows; as ``linear_residual.linear_residual_ref``)::

    out[b] = x.dtype(res[b] + s ⊙ (a[b] · Wᵀ + u[b] · w2[b]ᵀ))    fp32 accumulate, one rounding

Why: ``_linear_act_kernel`` runs its fused sites at 380-500 TFLOP/s in the records' TTT step on an H200, against
748 for cuBLAS inside the same step (bench/results/profile-ttt-h200.md, measurement 8). It is a persistent TMA
kernel, but Triton 3.6 made no warp-specialized partitions for it on sm_90a, so each tile's epilogue (the
activation and two stores) does not overlap the next tile's main loop, and at K = 512 a tile has 8 k-steps.

Design (one persistent program per SM, tiles (m, n) n fastest, program p takes tiles p, p + P, ...):

* a loader partition (1 warp) issues the TMA loads of x and W tiles into a ring of ``STAGES`` shared buffers,
  each guarded by a ready and an empty mbarrier;
* two consumer partitions (one warpgroup each) take the program's tiles in turn (consumer c the tiles of local
  index n ≡ c mod 2): while one runs its epilogue (h and y through its own shared buffer and TMA stores) the other
  runs its wgmma main loop, the way cuBLAS's ping-pong kernels overlap them. The ring orders their loads, so a
  consumer frees each stage as soon as the wgmma that read it has completed.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from . import _utils
from ._utils import check, check_tensor, env_choice

def runs_on(t: torch.Tensor, *dims: int) -> bool:
    """Whether the kernel runs for a 16-bit operand ``t`` whose GEMM dims (K, N) are ``dims``: a CUDA sm_90 device
    (wgmma, warp specialization), bf16 / fp16, every dim a multiple of 8 (TMA's 16-byte rows). The callers' switches
    (``linear_residual.MLP_UP_WS``, ``linear_act.GRAD_WS``) add their own layout conditions; importing this module
    needs Triton's Gluon, so they import it only when a switch is on."""
    return (t.is_cuda and t.dtype in (torch.bfloat16, torch.float16) and all(d % 8 == 0 for d in dims)
            and torch.cuda.get_device_capability(t.device)[0] == 9)


# 128 x 128 tiles per consumer warpgroup (its fp32 accumulator: 128 registers per thread). The ring's (BK, STAGES)
# candidates, each within the 227 KB an SM has: STAGES x BK x 512 B of operand ring + 2 x 32 KB of epilogue buffers
# (64 x 4: 192 KB; 64 x 5: 224 KB, 229,720 B with the barriers; 32 x 8 and 128 x 2: 192 KB). 32 x 8 covers an
# adapter's rank 96 in exactly 3 k-steps (64: 2 steps, the second half zero-filled). bench.bench_ws_tiles times every
# kernel of this module at the records' shapes per candidate; PGOLF_WS_TILE (an index into TILES) picks one at
# import, ``use_tile`` at run time.
BM, BN = 128, 128
TILES = ((64, 4), (64, 5), (32, 8), (128, 2))


def use_tile(bk: int, stages: int) -> None:
    """Make (BK, STAGES) = (bk, stages), one of ``TILES``, the ring of every later launch (each tile is its own
    compile)."""
    check((bk, stages) in TILES, lambda: f"use_tile: (bk, stages) = {(bk, stages)}: expected one of {TILES}")
    global BK, STAGES
    BK, STAGES = int(bk), int(stages)


# BK 64 x 5 stages by measurement (H200, one process each, bench/results/ws-tiles-h200.md and profile-ttt-h200.md
# measurement 12): against 64 x 4 the up-projection 0.429 -> 0.395 ms, the derivative 0.398 -> 0.387, the residual
# sites 0.359 -> 0.347 and 0.361 -> 0.339, the dx sum 0.482 -> 0.477; in the records' TTT step the Gluon kernels
# 15.41 -> 14.32 ms and the step's GPU time 71.54 -> 70.21 ms (32 x 8: 72.07, 128 x 2: 78.05); every GPU test of
# tests/test_linear_act_ws.py passes with it there. Only linear_rows_ws (off by default) is slower with it: 0.370
# against 0.248 ms
DEFAULT_TILE = 1


def _tile_from_env() -> Tuple[int, int]:
    """PGOLF_WS_TILE: an index into ``TILES``; unset = ``DEFAULT_TILE``."""
    order = [DEFAULT_TILE] + [i for i in range(len(TILES)) if i != DEFAULT_TILE]
    raw = env_choice("PGOLF_WS_TILE", {str(i): f"BK {TILES[i][0]}, {TILES[i][1]} stages" for i in order})
    return TILES[int(raw)]


BK, STAGES = _tile_from_env()


@gluon.jit
def _loader(x_desc, w_desc, u_desc, w2_desc, xs, ws, ready, empty, B, T, N, K, R, BM: gl.constexpr,
            BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr, NUM_PROGS: gl.constexpr, W_KN: gl.constexpr,
            HAS_X2: gl.constexpr):
    """Every tile's k-steps in the consumers' order (tile-local index n, then k): stage it % STAGES. W_KN: the weight
    is stored (K, N) and loaded as (BK, BN) tiles. HAS_X2: after K's steps, R's: u (M, R) and w2 (B·N, R) tiles
    into the same stages (their boxes are x's and W's; TMA zero-fills past R), w2's rows those of the tile's batch
    row b (tiles are cut per batch row of T rows; past N a tile's columns read the next row block of w2, and are
    never stored)."""
    pid = gl.program_id(0)
    tiles_n = gl.cdiv(N, BN)
    tiles_m = gl.cdiv(T, BM)
    total = B * tiles_m * tiles_n
    k_steps = gl.cdiv(K, BK)
    nbytes: gl.constexpr = x_desc.block_type.nbytes + w_desc.block_type.nbytes
    it = 0
    for t in range(pid, total, NUM_PROGS):
        b = (t // tiles_n) // tiles_m
        ml = ((t // tiles_n) % tiles_m) * BM
        om = b * T + ml
        on = (t % tiles_n) * BN
        for kk in range(k_steps):
            s = it % STAGES
            # empty barriers start as if their phase 1 had completed: the first round does not wait
            mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(s), nbytes)
            tma.async_copy_global_to_shared(x_desc, [om, kk * BK], ready.index(s), xs.index(s))
            if W_KN:
                tma.async_copy_global_to_shared(w_desc, [kk * BK, on], ready.index(s), ws.index(s))
            else:
                tma.async_copy_global_to_shared(w_desc, [on, kk * BK], ready.index(s), ws.index(s))
            it += 1
        if HAS_X2:
            wrow = b * N + on
            for kk in range(gl.cdiv(R, BK)):
                s = it % STAGES
                mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
                mbarrier.expect(ready.index(s), nbytes)
                tma.async_copy_global_to_shared(u_desc, [om, kk * BK], ready.index(s), xs.index(s))
                tma.async_copy_global_to_shared(w2_desc, [wrow, kk * BK], ready.index(s), ws.index(s))
                it += 1


@gluon.jit
def _consumer(h_desc, y_desc, s_ptr, y1_desc, y2_desc, N0, N1, xs, ws, ready, empty, turn, epi, hbar, B, T, N, K, R,
              slope, C: gl.constexpr,
              BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr, NUM_PROGS: gl.constexpr,
              ACT: gl.constexpr, W_KN: gl.constexpr, HAS_X2: gl.constexpr, PRO_ACT: gl.constexpr):
    """Tiles of local index n = C, C + 2, ...: wgmma over the ring's stages (K's steps, then R's: 0 without a second
    product; PRO_ACT: K's A operand is act(x tile) = leaky_relu(h, slope)², formed in registers), then the epilogue
    through shared buffer ``epi[C]``: ACT 0, the accumulator out (``sum_products_ws``); ACT 4, the same into the
    output of its column range (``linear_rows_ws``: y_desc below N0, y1_desc below N0 + N1, y2_desc above); ACT 1, h
    and y = act(h) out;
    ACT 2, h₀ in through ``h_desc`` (TMA, barrier ``hbar[C]``) and y = h ⊙ act'(h₀) out; ACT 3, the residual in the
    same way and y = res + s ⊙ acc out (s (N,) at ``s_ptr``, from the fp32 accumulator: one rounding).

    The main loops take turns (``turn[c]``: consumer c's j-th main loop waits for the other's main loop before it,
    consumer 0's first waits for none). Besides being the schedule wanted (one main loop on the tensor cores, the
    other consumer in its epilogue), this keeps each wait on a ready barrier at most one phase ahead of it: a consumer
    that waited on stage uses two rounds ahead (k_steps / STAGES = 2 at K 512) would see that parity complete
    from an earlier round and read the other tile's data."""
    pid = gl.program_id(0)
    tiles_n = gl.cdiv(N, BN)
    tiles_m = gl.cdiv(T, BM)
    total = B * tiles_m * tiles_n
    k1 = gl.cdiv(K, BK)
    k_steps = k1
    if HAS_X2:
        k_steps = k1 + gl.cdiv(R, BK)
    dtype: gl.constexpr = h_desc.dtype
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BN, 256 // dtype.primitive_bitwidth])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_layout, k_width=2)
    buf = epi.index(C)
    n = C
    j = 0
    for t in range(pid + C * NUM_PROGS, total, 2 * NUM_PROGS):
        b = (t // tiles_n) // tiles_m
        ml = ((t // tiles_n) % tiles_m) * BM
        om = b * T + ml
        on = (t % tiles_n) * BN
        it0 = n * k_steps
        # consumer 1's j-th main loop follows consumer 0's j-th (turn[1] phase j); consumer 0's j-th follows
        # consumer 1's (j - 1)-th (turn[0] phase j - 1)
        if ACT >= 2:
            # h₀'s (or the residual's) tile is loaded while the main loop runs: the buffer is free once the previous
            # tile's store has left it (issued a whole main loop of the other consumer ago)
            tma.store_wait(pendings=0)
            mbarrier.expect(hbar.index(C), h_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(h_desc, [om, on], hbar.index(C), buf)
        mbarrier.wait(turn.index(C), (j - 1 + C) & 1, pred=(j + C) > 0)
        acc = gl.zeros((BM, BN), dtype=gl.float32, layout=mma_layout)
        for kk in range(k1):
            it = it0 + kk
            s = it % STAGES
            mbarrier.wait(ready.index(s), (it // STAGES) & 1)
            if PRO_ACT:
                # A = act(h) from the stage's h tile, in registers (the down-projection's input never written)
                hv = xs.index(s).load(a_layout).to(gl.float32)
                hv = gl.where(hv > 0, hv, slope * hv)
                a_op = (hv * hv).to(dtype)
                acc = warpgroup_mma(a_op, ws.index(s).permute((1, 0)), acc, is_async=True)
                # the register operand stays alive until its wgmma has completed
                acc, a_op = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a_op))
            else:
                if W_KN:
                    acc = warpgroup_mma(xs.index(s), ws.index(s), acc, is_async=True)
                else:
                    acc = warpgroup_mma(xs.index(s), ws.index(s).permute((1, 0)), acc, is_async=True)
                # one wgmma left in flight: the previous one has completed, so its stage is free
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
            mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES), count=1, pred=kk > 0)
        if HAS_X2:
            for kk in range(k_steps - k1):   # the second product's steps (u's tiles in xs, w2's in ws)
                it = it0 + k1 + kk
                s = it % STAGES
                mbarrier.wait(ready.index(s), (it // STAGES) & 1)
                acc = warpgroup_mma(xs.index(s), ws.index(s).permute((1, 0)), acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
                mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES), count=1)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(empty.index((it0 + k_steps - 1) % STAGES), count=1)
        mbarrier.arrive(turn.index(1 - C), count=1)
        if ACT == 1:
            h = acc.to(dtype)
            tma.store_wait(pendings=0)  # this buffer's last store (the previous tile's y) has left it
            buf.store(h)
            fence_async_shared()
            tma.async_copy_shared_to_global(h_desc, [om, on], buf)
            hf = h.to(gl.float32)
            hf = gl.where(hf > 0, hf, slope * hf)
            y = (hf * hf).to(dtype)
            tma.store_wait(pendings=0)
        elif ACT == 0 or ACT == 4:
            tma.store_wait(pendings=0)  # this buffer's last store (the previous tile's) has left it
            y = acc.to(dtype)
        elif ACT == 3:
            mbarrier.wait(hbar.index(C), j & 1)
            cols = on + gl.arange(0, BN, layout=gl.SliceLayout(0, mma_layout))
            sv = gl.load(s_ptr + cols, mask=cols < N, other=0.0).to(gl.float32)
            res = buf.load(mma_layout).to(gl.float32)
            y = (res + gl.expand_dims(sv, 0) * acc).to(dtype)
        else:
            # dh = g · W rounded to the dtype first (as the GEMM's output is in the torch composition), times
            # act'(h₀) = 2·h₀ where h₀ > 0, 2·slope²·h₀ elsewhere; each thread reads and then overwrites the same
            # elements of the buffer (one distributed layout for both)
            mbarrier.wait(hbar.index(C), j & 1)
            h0 = buf.load(mma_layout).to(gl.float32)
            y = (acc.to(dtype).to(gl.float32) * 2.0 * gl.where(h0 > 0, h0, (slope * slope) * h0)).to(dtype)
        buf.store(y)
        fence_async_shared()
        if ACT == 3 or ACT == 0:
            tma.async_copy_shared_to_global(y_desc, [b, ml, on], buf.reshape([1, BM, BN]))
        elif ACT == 4:   # the output whose columns hold this tile's (N0 and N1 multiples of BN: no tile straddles)
            if on < N0:
                tma.async_copy_shared_to_global(y_desc, [b, ml, on], buf.reshape([1, BM, BN]))
            elif on < N0 + N1:
                tma.async_copy_shared_to_global(y1_desc, [b, ml, on - N0], buf.reshape([1, BM, BN]))
            else:
                tma.async_copy_shared_to_global(y2_desc, [b, ml, on - N0 - N1], buf.reshape([1, BM, BN]))
        else:
            tma.async_copy_shared_to_global(y_desc, [om, on], buf)
        n += 2
        j += 1
    tma.store_wait(pendings=0)


@gluon.jit
def _buffers(x_desc, w_desc, h_desc, STAGES: gl.constexpr):
    """The ring's x and W tile buffers (STAGES each, the descriptors' boxes) and the consumers' two epilogue buffers
    (h_desc's box and layout)."""
    dtype: gl.constexpr = x_desc.dtype
    xs = gl.allocate_shared_memory(dtype, [STAGES, x_desc.block_type.shape[0], x_desc.block_type.shape[1]],
                                   x_desc.layout)
    ws = gl.allocate_shared_memory(dtype, [STAGES, w_desc.block_type.shape[0], w_desc.block_type.shape[1]],
                                   w_desc.layout)
    epi = gl.allocate_shared_memory(dtype, [2, h_desc.block_type.shape[0], h_desc.block_type.shape[1]], h_desc.layout)
    return xs, ws, epi


@gluon.jit
def _barriers(STAGES: gl.constexpr):
    """The ring's ready / empty barriers (one per stage), the consumers' turn barriers and their epilogue-load
    barriers (one per consumer), initialized."""
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    hbar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)
        mbarrier.init(hbar.index(i), count=1)
    return ready, empty, turn, hbar


# B (batch rows) is not specialized: Triton compiles one binary per divisibility class of an int argument (a
# multiple of 16, not, or 1), and the eval's CUDA-graph buckets have row counts of every class. Specialized, the
# records' 1/8 share built 4 more Gluon binaries (~1 s each) while preparing its graphs, inside the timed eval
# (H100: _sum_ws_kernel built 6 binaries, 3 of them there). B only bounds the tile loop (the addresses come from the
# TMA descriptors), so its divisibility gives the compiler nothing to use; the GPU tests at B = 2, 3, 5 ran this
# binary before (not timed in the step yet).
_NOT_SPECIALIZED = ("B",)


@gluon.jit(do_not_specialize=_NOT_SPECIALIZED)
def _linear_act_ws_kernel(x_desc, w_desc, h_desc, y_desc, u_desc, w2_desc, s_ptr, B, T, N, K, R, slope,
                          STAGES: gl.constexpr, NUM_PROGS: gl.constexpr, ACT: gl.constexpr, W_KN: gl.constexpr,
                          HAS_X2: gl.constexpr, PRO_ACT: gl.constexpr):
    BM: gl.constexpr = x_desc.block_type.shape[0]
    BK: gl.constexpr = x_desc.block_type.shape[1]
    BN: gl.constexpr = h_desc.block_type.shape[1]
    xs, ws, epi = _buffers(x_desc, w_desc, h_desc, STAGES)
    ready, empty, turn, hbar = _barriers(STAGES)
    gl.warp_specialize([
        (_consumer, (h_desc, y_desc, s_ptr, y_desc, y_desc, 0, 0, xs, ws, ready, empty, turn, epi, hbar, B, T, N, K, R,
                     slope, 0, BM, BN, BK,
                     STAGES, NUM_PROGS, ACT, W_KN, HAS_X2, PRO_ACT)),
        (_consumer, (h_desc, y_desc, s_ptr, y_desc, y_desc, 0, 0, xs, ws, ready, empty, turn, epi, hbar, B, T, N, K, R,
                     slope, 1, BM, BN, BK,
                     STAGES, NUM_PROGS, ACT, W_KN, HAS_X2, PRO_ACT)),
        (_loader, (x_desc, w_desc, u_desc, w2_desc, xs, ws, ready, empty, B, T, N, K, R, BM, BN, BK, STAGES,
                   NUM_PROGS, W_KN, HAS_X2)),
    ], [4, 1], [232, 40])


@gluon.jit
def _load_source(x_desc, w_desc, xs, ws, ready, empty, it, om, wrow, on, K, BK: gl.constexpr,
                 STAGES: gl.constexpr):
    """One source's k-steps of a tile into the ring from stage ``it`` on: x (M, K) tiles at rows om, w (B·K, N) tiles
    (stored (K, N) per batch row) at rows wrow + k; returns the next stage count."""
    nbytes: gl.constexpr = x_desc.block_type.nbytes + w_desc.block_type.nbytes
    for kk in range(gl.cdiv(K, BK)):
        s = it % STAGES
        mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
        mbarrier.expect(ready.index(s), nbytes)
        tma.async_copy_global_to_shared(x_desc, [om, kk * BK], ready.index(s), xs.index(s))
        tma.async_copy_global_to_shared(w_desc, [wrow + kk * BK, on], ready.index(s), ws.index(s))
        it += 1
    return it


@gluon.jit
def _sum_loader(x0, w0, x1, w1, x2, w2, x3, w3, xs, ws, ready, empty, B, T, N, K0, K1, K2, K3, BM: gl.constexpr,
                BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr, NUM_PROGS: gl.constexpr,
                NSRC: gl.constexpr):
    """``sum_products_ws``' loader: every tile's k-steps, source after source (the consumers' order). Source i's w
    rows are those of the tile's batch row b (b·K_i + k). Past K_i, x's columns are zero-filled (TMA) and w's rows
    are the next batch row's: their products are 0."""
    pid = gl.program_id(0)
    tiles_n = gl.cdiv(N, BN)
    tiles_m = gl.cdiv(T, BM)
    total = B * tiles_m * tiles_n
    it = 0
    for t in range(pid, total, NUM_PROGS):
        b = (t // tiles_n) // tiles_m
        om = b * T + ((t // tiles_n) % tiles_m) * BM
        on = (t % tiles_n) * BN
        it = _load_source(x0, w0, xs, ws, ready, empty, it, om, b * K0, on, K0, BK, STAGES)
        if NSRC > 1:
            it = _load_source(x1, w1, xs, ws, ready, empty, it, om, b * K1, on, K1, BK, STAGES)
        if NSRC > 2:
            it = _load_source(x2, w2, xs, ws, ready, empty, it, om, b * K2, on, K2, BK, STAGES)
        if NSRC > 3:
            it = _load_source(x3, w3, xs, ws, ready, empty, it, om, b * K3, on, K3, BK, STAGES)


@gluon.jit(do_not_specialize=_NOT_SPECIALIZED)
def _sum_ws_kernel(x0, w0, x1, w1, x2, w2, x3, w3, h_desc, y_desc, B, T, N, K0, K1, K2, K3, K_STEPS,
                   STAGES: gl.constexpr, NUM_PROGS: gl.constexpr, NSRC: gl.constexpr):
    """y[b] = Σ_i x_i[b] · w_i[b]: ``_sum_loader`` and the two consumers of ``_linear_act_ws_kernel`` (ACT 0: the
    accumulator stored, W read (K, N)); K_STEPS = Σ_i cdiv(K_i, BK), the consumers' steps per tile. ``h_desc``: y
    as 2-D, for the epilogue buffers' layout only."""
    BM: gl.constexpr = x0.block_type.shape[0]
    BK: gl.constexpr = x0.block_type.shape[1]
    BN: gl.constexpr = w0.block_type.shape[1]
    xs, ws, epi = _buffers(x0, w0, h_desc, STAGES)
    ready, empty, turn, hbar = _barriers(STAGES)
    gl.warp_specialize([
        (_consumer, (h_desc, y_desc, y_desc, y_desc, y_desc, 0, 0, xs, ws, ready, empty, turn, epi, hbar, B, T, N,
                     K_STEPS * BK, 0, 0.0,
                     0, BM, BN, BK, STAGES, NUM_PROGS, 0, True, False, False)),
        (_consumer, (h_desc, y_desc, y_desc, y_desc, y_desc, 0, 0, xs, ws, ready, empty, turn, epi, hbar, B, T, N,
                     K_STEPS * BK, 0, 0.0,
                     1, BM, BN, BK, STAGES, NUM_PROGS, 0, True, False, False)),
        (_sum_loader, (x0, w0, x1, w1, x2, w2, x3, w3, xs, ws, ready, empty, B, T, N, K0, K1, K2, K3, BM, BN, BK,
                       STAGES, NUM_PROGS, NSRC)),
    ], [4, 1], [232, 40])


@gluon.jit
def _rows_loader(x_desc, w0, w1, w2, xs, ws, ready, empty, B, T, N, K, N0, N1, BM: gl.constexpr, BN: gl.constexpr,
                 BK: gl.constexpr, STAGES: gl.constexpr, NUM_PROGS: gl.constexpr):
    """``linear_rows_ws``' loader: the columns [0, N) are the slices' outputs side by side (N0, N1, N - N0 - N1 wide);
    a tile's W rows come from its slice's per-row weight (B·N_i, K), at batch row b's block."""
    pid = gl.program_id(0)
    tiles_n = gl.cdiv(N, BN)
    tiles_m = gl.cdiv(T, BM)
    total = B * tiles_m * tiles_n
    nbytes: gl.constexpr = x_desc.block_type.nbytes + w0.block_type.nbytes
    it = 0
    for t in range(pid, total, NUM_PROGS):
        b = (t // tiles_n) // tiles_m
        om = b * T + ((t // tiles_n) % tiles_m) * BM
        on = (t % tiles_n) * BN
        for kk in range(gl.cdiv(K, BK)):
            s = it % STAGES
            mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(s), nbytes)
            tma.async_copy_global_to_shared(x_desc, [om, kk * BK], ready.index(s), xs.index(s))
            if on < N0:
                tma.async_copy_global_to_shared(w0, [b * N0 + on, kk * BK], ready.index(s), ws.index(s))
            elif on < N0 + N1:
                tma.async_copy_global_to_shared(w1, [b * N1 + on - N0, kk * BK], ready.index(s), ws.index(s))
            else:
                tma.async_copy_global_to_shared(w2, [b * (N - N0 - N1) + on - N0 - N1, kk * BK], ready.index(s),
                                                ws.index(s))
            it += 1


@gluon.jit(do_not_specialize=_NOT_SPECIALIZED)
def _rows_ws_kernel(x_desc, w0, w1, w2, h_desc, y0, y1, y2, B, T, N, K, N0, N1, STAGES: gl.constexpr,
                    NUM_PROGS: gl.constexpr):
    """y_i[b] = x[b] · W_i[b]ᵀ for up to three per-row weights in one launch: ``_rows_loader`` and the two consumers
    (ACT 4). ``h_desc``: a 2-D (BM, BN) descriptor, for the epilogue buffers' layout only."""
    BM: gl.constexpr = x_desc.block_type.shape[0]
    BK: gl.constexpr = x_desc.block_type.shape[1]
    BN: gl.constexpr = w0.block_type.shape[0]
    xs, ws, epi = _buffers(x_desc, w0, h_desc, STAGES)
    ready, empty, turn, hbar = _barriers(STAGES)
    gl.warp_specialize([
        (_consumer, (h_desc, y0, y0, y1, y2, N0, N1, xs, ws, ready, empty, turn, epi, hbar, B, T, N, K, 0, 0.0, 0, BM,
                     BN, BK, STAGES, NUM_PROGS, 4, False, False, False)),
        (_consumer, (h_desc, y0, y0, y1, y2, N0, N1, xs, ws, ready, empty, turn, epi, hbar, B, T, N, K, 0, 0.0, 1, BM,
                     BN, BK, STAGES, NUM_PROGS, 4, False, False, False)),
        (_rows_loader, (x_desc, w0, w1, w2, xs, ws, ready, empty, B, T, N, K, N0, N1, BM, BN, BK, STAGES, NUM_PROGS)),
    ], [4, 1], [232, 40])


def _descriptors(x: torch.Tensor, w: torch.Tensor, h: torch.Tensor, y: torch.Tensor, w_kn: bool = False,
                 u: Optional[torch.Tensor] = None, w2: Optional[torch.Tensor] = None):
    """TMA descriptors of x, w, h, y, u and w2 (x's and w's again without a second product: never read then); a 3-D
    y (B, T, N) gets (1, BM, BN) boxes, so a tile's store stops at its batch row's end."""
    gdt = gl.bfloat16 if x.dtype == torch.bfloat16 else gl.float16
    wb = [BK, BN] if w_kn else [BN, BK]
    lx = gl.NVMMASharedLayout.get_default_for([BM, BK], gdt)
    lw = gl.NVMMASharedLayout.get_default_for(wb, gdt)
    lo = gl.NVMMASharedLayout.get_default_for([BM, BN], gdt)
    xd, wd = TensorDescriptor.from_tensor(x, [BM, BK], lx), TensorDescriptor.from_tensor(w, wb, lw)
    ud, w2d = xd, wd
    if u is not None:
        ud, w2d = TensorDescriptor.from_tensor(u, [BM, BK], lx), TensorDescriptor.from_tensor(w2, [BN, BK], lw)
    yd = (TensorDescriptor.from_tensor(y, [1, BM, BN], gl.NVMMASharedLayout.get_default_for([1, BM, BN], gdt))
          if y.dim() == 3 else TensorDescriptor.from_tensor(y, [BM, BN], lo))
    return xd, wd, TensorDescriptor.from_tensor(h, [BM, BN], lo), yd, ud, w2d


def _check_gemm(op: str, x: torch.Tensor, xname: str, w: torch.Tensor, w_kn: bool) -> Tuple[int, int, int]:
    """(M, K, N) of a 16-bit x (M, K) and W (N, K), or (K, N) with ``w_kn``; refused by name otherwise."""
    check_tensor(x, xname, dtype=(torch.bfloat16, torch.float16), ndim=2, op=op)
    check_tensor(w, "w", dtype=x.dtype, ndim=2, device=x.device, op=op)
    M, K = x.shape
    N = w.shape[1] if w_kn else w.shape[0]
    check(w.shape[0 if w_kn else 1] == K,
          lambda: f"{op}: w must be {f'(K = {K}, N)' if w_kn else f'(N, {K})'} to match {xname} (M, {K}), got "
                  f"{tuple(w.shape)}")
    check(K > 0 and N > 0 and K % 8 == 0 and N % 8 == 0,
          lambda: f"{op}: K and N must be positive multiples of 8 (TMA rows), got K {K}, N {N}")
    return M, K, N


def _check_out(op: str, t: Optional[torch.Tensor], name: str, x: torch.Tensor, M: int, N: int) -> None:
    check_tensor(t, name, dtype=x.dtype, ndim=2, device=x.device, contiguous=True, op=op)
    check(tuple(t.shape) == (M, N), lambda: f"{op}: {name} must be ({M}, {N}), got {tuple(t.shape)}")


def _check_hopper(op: str, x: torch.Tensor) -> None:
    # last of the checks (the others need no GPU): wgmma and the warp-specialized partitions are sm_90 only
    check(x.is_cuda and torch.cuda.get_device_capability(x.device)[0] == 9,
          lambda: f"{op}: needs a Hopper GPU (sm_90) for wgmma and warp specialization, got x on {x.device}")


def _run(x, w, h, y, slope, act: int, w_kn: bool, u=None, w2=None, s=None, pro_act: bool = False) -> None:
    """Launch on 2-D x (M, K), h (M, N) and u (M, R); act 3 reads the residual through ``h`` and ``s`` (N,) and
    writes a 3-D y (B, T, N) (M = B·T; tiles per batch row, so w2 (B·N, R) is one row block per tile); acts 1 and 2
    write a 2-D y (M, N) (one batch row of M rows)."""
    from .linear_act import _num_programs

    B, T, N = y.shape if y.dim() == 3 else (1, ) + tuple(y.shape)
    R = 0 if u is None else u.shape[1]
    # linear_act's persistent rule: the stride fixed per device (one compile for every shape), the grid the tiles
    stride, grid = _num_programs(x.device, B * triton.cdiv(T, BM) * triton.cdiv(N, BN))
    _linear_act_ws_kernel[(grid, )](*_descriptors(x, w, h, y, w_kn, u, w2), y if s is None else s, B, T, N,
                                    x.shape[1], R, float(slope), STAGES=STAGES, NUM_PROGS=stride, ACT=act, W_KN=w_kn,
                                    HAS_X2=u is not None, PRO_ACT=pro_act, num_warps=4, maxnreg=168)


def linear_act_ws(x: torch.Tensor, w: torch.Tensor, slope: float = 0.5,
                  out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y, h) = (leaky_relu(x · Wᵀ, slope)², x · Wᵀ) for x (M, K) and W (N, K), bf16 or fp16 on a Hopper GPU.
    K and N multiples of 8 (TMA's 16-byte rows). ``out``: (y, h) to write, contiguous (M, N) of x's dtype (the tests
    fill them with NaN first)."""
    op = "linear_act_ws"
    M, K, N = _check_gemm(op, x, "x", w, False)
    if out is not None:
        check(isinstance(out, (tuple, list)) and len(out) == 2, lambda: f"{op}: out must be a (y, h) pair of tensors")
        _check_out(op, out[0], "out[0] (y)", x, M, N)
        _check_out(op, out[1], "out[1] (h)", x, M, N)
    _check_hopper(op, x)
    x, w = x.contiguous(), w.contiguous()
    y, h = out if out is not None else (_utils.empty((M, N), x.dtype, x.device),
                                        _utils.empty((M, N), x.dtype, x.device))
    _run(x, w, h, y, slope, 1, False)
    return y, h


def linear_act_grad_ws(g: torch.Tensor, w: torch.Tensor, h: torch.Tensor, slope: float = 0.5,
                       out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dh = (g · W) ⊙ act'(h), act = leaky_relu(·, slope)², for g (M, K), W stored (K, N) (the layer that consumed
    act(h), e.g. the MLP's down-projection (d, H) scaled by its residual gain) and h (M, N) the saved
    pre-activation; bf16 or fp16 on a Hopper GPU, K and N multiples of 8. The product is rounded to the dtype before
    act'(h) = 2·h where h > 0, 2·slope²·h elsewhere (as ``linear_act.linear_act_grad_ref``). ``out``: the (M, N)
    tensor to write."""
    op = "linear_act_grad_ws"
    M, K, N = _check_gemm(op, g, "g", w, True)
    _check_out(op, h, "h", g, M, N)
    if out is not None:
        _check_out(op, out, "out", g, M, N)
    _check_hopper(op, g)
    g, w = g.contiguous(), w.contiguous()
    y = out if out is not None else _utils.empty((M, N), g.dtype, g.device)
    _run(g, w, h, y, slope, 2, True)
    return y


def residual_fits(a: torch.Tensor, w: torch.Tensor, u: Optional[torch.Tensor] = None) -> bool:
    """Whether ``linear_residual_ws`` runs for a (B, T, K), one shared w (N, K) and u (B, T, R) or None:
    ``runs_on``, R too a multiple of 8 (K and N from w: a gives the dtype and device)."""
    N, K = w.shape[0], w.shape[-1]
    if not (w.dim() == 2 and runs_on(a, K, N)):
        return False
    return u is None or u.shape[-1] % 8 == 0


def linear_residual_ws(res: torch.Tensor, a: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
                       u: Optional[torch.Tensor] = None, w2: Optional[torch.Tensor] = None,
                       out: Optional[torch.Tensor] = None, pre_act: Optional[float] = None, *,
                       validate: bool = True) -> torch.Tensor:
    """out = res + scale ⊙ (a · Wᵀ + u · w2ᵀ) (``linear_residual.linear_residual_ref``'s math, one rounding from
    the fp32 accumulator) for res (B, T, N), a (B, T, K), one shared W (N, K), scale (N,), u (B, T, R) and w2
    (B, N, R) together or neither; bf16 or fp16 on a Hopper GPU, K, N, R multiples of 8 (``residual_fits``).
    Tiles are cut per batch row: where T is not a multiple of 128 a row's last tile reads rows of the next one and
    stores only its own (the (1, BM, BN) box of a 3-D output stops at T). ``out``: the (B, T, N) tensor to write.
    ``pre_act`` (a slope): a holds a pre-activation h and the GEMM's A operand is a.dtype(leaky_relu(h, pre_act)²),
    formed in registers from each h tile (``linear_act.linear_act_ref``'s rounding): the MLP's down-projection
    without act(h) ever written. ``validate=False`` skips the checks, for ``linear_residual``'s dispatch (its
    arguments checked there and ``residual_fits`` true)."""
    op = "linear_residual_ws"
    if validate:
        _check_residual(op, res, a, w, scale, u, w2, out)
    B, T, K = a.shape
    N, M = w.shape[0], B * T
    a2, w = a.reshape(M, K).contiguous(), w.contiguous()
    y = out if out is not None else _utils.empty((B, T, N), a.dtype, a.device)
    _run(a2, w, res.view(M, N), y, 0.0 if pre_act is None else float(pre_act), 3, False,
         None if u is None else u.view(M, -1), None if w2 is None else w2.view(B * N, -1), scale,
         pro_act=pre_act is not None)
    return y


def _check_residual(op: str, res, a, w, scale, u, w2, out) -> None:
    """``linear_residual_ws``'s arguments, each refused by name; the device last."""
    check_tensor(a, "a", dtype=(torch.bfloat16, torch.float16), ndim=3, op=op)
    B, T, K = a.shape
    M, _, N = _check_gemm(op, a.reshape(B * T, K), "a", w, False)
    check_tensor(res, "res", dtype=a.dtype, ndim=3, device=a.device, contiguous=True, op=op)
    check(tuple(res.shape) == (B, T, N), lambda: f"{op}: res must be {(B, T, N)}, got {tuple(res.shape)}")
    check_tensor(scale, "scale", dtype=a.dtype, ndim=1, device=a.device, contiguous=True, op=op)
    check(scale.shape[0] == N, lambda: f"{op}: scale must have N = {N} elements, got {scale.shape[0]}")
    check((u is None) == (w2 is None), lambda: f"{op}: u and w2 come together or not at all")
    if u is not None:
        check_tensor(u, "u", dtype=a.dtype, ndim=3, device=a.device, contiguous=True, op=op)
        check_tensor(w2, "w2", dtype=a.dtype, ndim=3, device=a.device, contiguous=True, op=op)
        R = u.shape[2]
        check(tuple(u.shape[:2]) == (B, T) and tuple(w2.shape) == (B, N, R) and R > 0 and R % 8 == 0,
              lambda: f"{op}: u must be ({B}, {T}, R) and w2 ({B}, {N}, R) with R a positive multiple of 8, got "
                      f"u {tuple(u.shape)}, w2 {tuple(w2.shape)}")
    if out is not None:
        check_tensor(out, "out", dtype=a.dtype, ndim=3, device=a.device, contiguous=True, op=op)
        check(tuple(out.shape) == (B, T, N), lambda: f"{op}: out must be {(B, T, N)}, got {tuple(out.shape)}")
    _check_hopper(op, a)


def sum_fits(xs, ws) -> bool:
    """Whether ``sum_products_ws`` runs for ``lora_merged.sum_products``' sources: 1-4 of them, 16-bit on an sm_90
    device, contiguous, B, T, N and every K_i positive, K_i and N multiples of 8 (TMA's 16-byte rows)."""
    if not 1 <= len(xs) <= 4:
        return False
    N = ws[0].shape[-1]
    # every size positive: a tile with no k-step would release a ring stage it never filled
    dims = [N, xs[0].shape[0], xs[0].shape[1]] + [x.shape[-1] for x in xs]
    return (min(dims) > 0 and runs_on(xs[0], N, *(x.shape[-1] for x in xs))
            and all(t.is_contiguous() and t.dtype == xs[0].dtype for t in list(xs) + list(ws)))


def _check_sum(op: str, xs, ws, out) -> None:
    """``sum_products_ws``' arguments, each refused by name; the device last."""
    check(isinstance(xs, (list, tuple)) and isinstance(ws, (list, tuple)) and 1 <= len(xs) == len(ws) <= 4,
          lambda: f"{op}: xs and ws must be lists of one length, 1 to 4 sources, got {len(xs)} and {len(ws)}")
    check_tensor(xs[0], "xs[0]", dtype=(torch.bfloat16, torch.float16), ndim=3, contiguous=True, op=op)
    Bsz, T = xs[0].shape[:2]
    N = ws[0].shape[-1] if ws[0].dim() == 3 else -1
    for i, (x, w) in enumerate(zip(xs, ws)):
        check_tensor(x, f"xs[{i}]", dtype=xs[0].dtype, ndim=3, device=xs[0].device, contiguous=True, op=op)
        check_tensor(w, f"ws[{i}]", dtype=xs[0].dtype, ndim=3, device=xs[0].device, contiguous=True, op=op)
        K = x.shape[2]
        check(tuple(x.shape[:2]) == (Bsz, T) and tuple(w.shape) == (Bsz, K, N) and K > 0 and K % 8 == 0,
              lambda: f"{op}: xs[{i}] must be ({Bsz}, {T}, K) and ws[{i}] ({Bsz}, K, {N}) with K a positive multiple "
                      f"of 8, got {tuple(x.shape)} and {tuple(w.shape)}")
    check(Bsz > 0 and T > 0 and N > 0 and N % 8 == 0,
          lambda: f"{op}: B, T and N must be positive, N a multiple of 8, got {Bsz}, {T}, {N}")
    if out is not None:
        check_tensor(out, "out", dtype=xs[0].dtype, ndim=3, device=xs[0].device, contiguous=True, op=op)
        check(tuple(out.shape) == (Bsz, T, N), lambda: f"{op}: out must be {(Bsz, T, N)}, got {tuple(out.shape)}")
    _check_hopper(op, xs[0])


def sum_products_ws(xs, ws, out: Optional[torch.Tensor] = None, *, validate: bool = True) -> torch.Tensor:
    """y[b] = Σ_i xs[i][b] · ws[i][b] for xs[i] (B, T, K_i) and ws[i] (B, K_i, N) (``lora_merged.sum_products``' math:
    one fp32 accumulator over every source, one rounding) on the warp-specialized kernel: tiles per batch row (any T;
    a row's last tile stores through a (1, BM, BN) box that stops at T), each source's w rows read per batch row.
    ``out``: the (B, T, N) tensor to write. ``validate=False`` skips the checks (``lora_merged.sum_products``, whose
    sources ``sum_fits`` accepted)."""
    from .linear_act import _num_programs

    if validate:
        _check_sum("sum_products_ws", xs, ws, out)

    Bsz, T = xs[0].shape[0], xs[0].shape[1]
    N = ws[0].shape[-1]
    gdt = gl.bfloat16 if xs[0].dtype == torch.bfloat16 else gl.float16
    lx = gl.NVMMASharedLayout.get_default_for([BM, BK], gdt)
    lw = gl.NVMMASharedLayout.get_default_for([BK, BN], gdt)
    y = out if out is not None else _utils.empty((Bsz, T, N), xs[0].dtype, xs[0].device)
    descs, ks = [], []
    for x, w in zip(xs, ws):
        K = x.shape[-1]
        descs += [TensorDescriptor.from_tensor(x.view(Bsz * T, K), [BM, BK], lx),
                  TensorDescriptor.from_tensor(w.view(Bsz * K, N), [BK, BN], lw)]
        ks.append(K)
    n = len(xs)
    descs += descs[:2] * (4 - n)     # unused slots (NSRC leaves them out at compile time)
    ks += [0] * (4 - n)
    steps = sum(triton.cdiv(k, BK) for k in ks)
    yd = TensorDescriptor.from_tensor(y, [1, BM, BN], gl.NVMMASharedLayout.get_default_for([1, BM, BN], gdt))
    lo = gl.NVMMASharedLayout.get_default_for([BM, BN], gdt)
    hd = TensorDescriptor.from_tensor(y.view(Bsz * T, N), [BM, BN], lo)
    stride, grid = _num_programs(y.device, Bsz * triton.cdiv(T, BM) * triton.cdiv(N, BN))
    _sum_ws_kernel[(grid, )](*descs, hd, yd, Bsz, T, N, *ks, steps, STAGES=STAGES, NUM_PROGS=stride, NSRC=n,
                             num_warps=4, maxnreg=168)
    return y


def rows_fits(x: torch.Tensor, Es) -> bool:
    """Whether ``linear_rows_ws`` runs for x (B, T, K) and 1-3 per-row weights E_i (B, N_i, K): 16-bit on an sm_90
    device, contiguous, of x's dtype, B and T positive, K a positive multiple of 8, every N_i a positive multiple of the
    128-column tile (a tile holds columns of one output only)."""
    if not (1 <= len(Es) <= 3 and x.dim() == 3 and min(x.shape) > 0):
        return False
    B, _, K = x.shape
    return (runs_on(x, K) and x.is_contiguous()
            and all(E.dim() == 3 and E.shape[0] == B and E.shape[2] == K and E.shape[1] > 0 and E.shape[1] % BN == 0
                    and E.is_contiguous() and E.dtype == x.dtype for E in Es))


def _check_rows(op: str, x, Es, outs) -> None:
    """``linear_rows_ws``' arguments, each refused by name; the device last."""
    check_tensor(x, "x", dtype=(torch.bfloat16, torch.float16), ndim=3, contiguous=True, op=op)
    Bsz, T, K = x.shape
    check(isinstance(Es, (list, tuple)) and 1 <= len(Es) <= 3,
          lambda: f"{op}: Es must be a list of 1 to 3 per-row weights, got "
                  f"{len(Es) if isinstance(Es, (list, tuple)) else type(Es).__name__}")
    for i, E in enumerate(Es):
        check_tensor(E, f"Es[{i}]", dtype=x.dtype, ndim=3, device=x.device, contiguous=True, op=op)
        check(E.shape[0] == Bsz and E.shape[2] == K and E.shape[1] > 0 and E.shape[1] % BN == 0,
              lambda: f"{op}: Es[{i}] must be ({Bsz}, N_i, {K}) with N_i a positive multiple of {BN}, got "
                      f"{tuple(E.shape)}")
    check(Bsz > 0 and T > 0 and K > 0 and K % 8 == 0,
          lambda: f"{op}: x must have positive sizes and K a multiple of 8, got {tuple(x.shape)}")
    if outs is not None:
        check(isinstance(outs, (list, tuple)) and len(outs) == len(Es),
              lambda: f"{op}: outs must be a list of {len(Es)} tensors, one per weight")
        for i, (o, E) in enumerate(zip(outs, Es)):
            check_tensor(o, f"outs[{i}]", dtype=x.dtype, ndim=3, device=x.device, contiguous=True, op=op)
            check(tuple(o.shape) == (Bsz, T, E.shape[1]),
                  lambda: f"{op}: outs[{i}] must be {(Bsz, T, E.shape[1])}, got {tuple(o.shape)}")
    _check_hopper(op, x)


def linear_rows_ws(x: torch.Tensor, Es, outs=None, *, validate: bool = True):
    """[y_i = x · E_iᵀ per batch row] for x (B, T, K) and up to three per-row weights E_i (B, N_i, K) in one launch:
    the merged q / k / v forward (``lora_merged.forward`` with ``QKV_WS``), each y_i a contiguous (B, T, N_i) tensor of
    x's dtype (fp32 accumulate, one rounding, as cuBLAS's bmm). The columns of the three outputs are one N = Σ N_i
    wide grid of 128-column tiles, cut per batch row (any T: a row's last tile stores through a (1, BM, BN) box that
    stops at T). ``outs``: the tensors to write. ``validate=False`` skips the checks (``lora_merged.forward``, whose
    shapes ``rows_fits`` accepted)."""
    from .linear_act import _num_programs

    if validate:
        _check_rows("linear_rows_ws", x, Es, outs)

    Bsz, T, K = x.shape
    ns = [E.shape[1] for E in Es]
    gdt = gl.bfloat16 if x.dtype == torch.bfloat16 else gl.float16
    lx = gl.NVMMASharedLayout.get_default_for([BM, BK], gdt)
    lw = gl.NVMMASharedLayout.get_default_for([BN, BK], gdt)
    l3 = gl.NVMMASharedLayout.get_default_for([1, BM, BN], gdt)
    ys = list(outs) if outs is not None else [_utils.empty((Bsz, T, n), x.dtype, x.device) for n in ns]
    wd = [TensorDescriptor.from_tensor(E.view(Bsz * n, K), [BN, BK], lw) for E, n in zip(Es, ns)]
    yd = [TensorDescriptor.from_tensor(y, [1, BM, BN], l3) for y in ys]
    wd += wd[:1] * (3 - len(Es))     # unused slots: no tile's columns reach them
    yd += yd[:1] * (3 - len(Es))
    hd = TensorDescriptor.from_tensor(ys[0].view(Bsz * T, ns[0]), [BM, BN],
                                      gl.NVMMASharedLayout.get_default_for([BM, BN], gdt))
    N = sum(ns)
    n0 = ns[0]
    n1 = ns[1] if len(ns) > 1 else 0
    stride, grid = _num_programs(x.device, Bsz * triton.cdiv(T, BM) * triton.cdiv(N, BN))
    _rows_ws_kernel[(grid, )](TensorDescriptor.from_tensor(x.view(Bsz * T, K), [BM, BK], lx), *wd, hd, *yd, Bsz, T,
                              N, K, n0, n1, STAGES=STAGES, NUM_PROGS=stride, num_warps=4, maxnreg=168)
    return ys


def compile_stats(dtype: str = "bf16", num_progs: int = 132, act: int = 1, x2: bool = False,
                  pro_act: bool = False, nsrc: int = 4) -> dict:
    """Compile the kernel for sm_90a on any host (no GPU) and report ptxas's registers and spills and the shared
    memory: the check before GPU time is spent. ``act``: 0 ``sum_products_ws`` (``nsrc`` sources), 4 ``linear_rows_ws``
    (three per-row weights), 1 the forward (h
    and act(h) out, W (N, K)), 2 the derivative (h read, W (K, N)), 3 the residual (res read, s ⊙ acc added); ``x2``:
    with the second product; ``pro_act``: (act 3) A = act(x) formed in registers. ``wgmma_serialized``: ptxas's
    warning C7515 (a wgmma waited for in place, e.g. for its register operand)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    from .sm90_check import ptxas_report

    tdt = torch.bfloat16 if dtype == "bf16" else torch.float16
    if act == 0:
        return _compile_sum(tdt, num_progs, nsrc, GluonASTSource, GPUTarget, mangle_type, ptxas_report)
    if act == 4:
        return _compile_rows(tdt, num_progs, GluonASTSource, GPUTarget, mangle_type, ptxas_report)
    w_kn = act == 2
    x = torch.empty((256, 512), dtype=tdt)
    w = torch.empty((512, 256) if w_kn else (256, 512), dtype=tdt)
    h = torch.empty((256, 256), dtype=tdt)
    u, w2 = (torch.empty((256, 96), dtype=tdt), torch.empty((512, 96), dtype=tdt)) if x2 else (None, None)
    descs = _descriptors(x, w, h, h.view(2, 128, 256) if act == 3 else h, w_kn, u, w2)
    fn = _linear_act_ws_kernel
    sig = dict(zip(("x_desc", "w_desc", "h_desc", "y_desc", "u_desc", "w2_desc"), (mangle_type(d) for d in descs)))
    sig.update(s_ptr="*bf16" if dtype == "bf16" else "*fp16", B="i32", T="i32", N="i32", K="i32", R="i32",
               slope="fp32", STAGES="constexpr", NUM_PROGS="constexpr", ACT="constexpr", W_KN="constexpr",
               HAS_X2="constexpr", PRO_ACT="constexpr")
    consts = {"STAGES": STAGES, "NUM_PROGS": num_progs, "ACT": act, "W_KN": w_kn, "HAS_X2": x2, "PRO_ACT": pro_act}
    src = GluonASTSource(fn=fn, signature=sig, constexprs=consts, attrs={})
    return _sm90_report(src, GPUTarget, ptxas_report)


def _compile_sum(tdt, num_progs, nsrc, GluonASTSource, GPUTarget, mangle_type, ptxas_report) -> dict:
    """``compile_stats(act=0)``: ``_sum_ws_kernel`` with ``nsrc`` sources (K 512, 256, 256, 96 as the merged q / k / v
    backward's dx and the o shrink's), compiled for sm_90a."""
    gdt = gl.bfloat16 if tdt == torch.bfloat16 else gl.float16
    lx = gl.NVMMASharedLayout.get_default_for([BM, BK], gdt)
    lw = gl.NVMMASharedLayout.get_default_for([BK, BN], gdt)
    descs = []
    for K in (512, 256, 256, 96):
        descs += [TensorDescriptor.from_tensor(torch.empty((256, K), dtype=tdt), [BM, BK], lx),
                  TensorDescriptor.from_tensor(torch.empty((2 * K, 512), dtype=tdt), [BK, BN], lw)]
    y = torch.empty((2, 128, 512), dtype=tdt)
    lo = gl.NVMMASharedLayout.get_default_for([BM, BN], gdt)
    descs += [TensorDescriptor.from_tensor(y.view(256, 512), [BM, BN], lo),
              TensorDescriptor.from_tensor(y, [1, BM, BN], gl.NVMMASharedLayout.get_default_for([1, BM, BN], gdt))]
    names = ("x0", "w0", "x1", "w1", "x2", "w2", "x3", "w3", "h_desc", "y_desc")
    sig = dict(zip(names, (mangle_type(d) for d in descs)))
    sig.update({k: "i32" for k in ("B", "T", "N", "K0", "K1", "K2", "K3", "K_STEPS")})
    sig.update(STAGES="constexpr", NUM_PROGS="constexpr", NSRC="constexpr")
    src = GluonASTSource(fn=_sum_ws_kernel, signature=sig,
                         constexprs={"STAGES": STAGES, "NUM_PROGS": num_progs, "NSRC": nsrc}, attrs={})
    return _sm90_report(src, GPUTarget, ptxas_report)


def _compile_rows(tdt, num_progs, GluonASTSource, GPUTarget, mangle_type, ptxas_report) -> dict:
    """``compile_stats(act=4)``: ``_rows_ws_kernel`` with the merged q / k / v forward's three per-row weights (N 512,
    256, 256 at K 512), compiled for sm_90a."""
    gdt = gl.bfloat16 if tdt == torch.bfloat16 else gl.float16
    l3 = gl.NVMMASharedLayout.get_default_for([1, BM, BN], gdt)
    lw = gl.NVMMASharedLayout.get_default_for([BN, BK], gdt)
    descs = [TensorDescriptor.from_tensor(torch.empty((256, 512), dtype=tdt), [BM, BK],
                                          gl.NVMMASharedLayout.get_default_for([BM, BK], gdt))]
    descs += [TensorDescriptor.from_tensor(torch.empty((2 * n, 512), dtype=tdt), [BN, BK], lw) for n in (512, 256, 256)]
    descs += [TensorDescriptor.from_tensor(torch.empty((256, 512), dtype=tdt), [BM, BN],
                                           gl.NVMMASharedLayout.get_default_for([BM, BN], gdt))]
    descs += [TensorDescriptor.from_tensor(torch.empty((2, 128, n), dtype=tdt), [1, BM, BN], l3) for n in (512, 256, 256)]
    names = ("x_desc", "w0", "w1", "w2", "h_desc", "y0", "y1", "y2")
    sig = dict(zip(names, (mangle_type(d) for d in descs)))
    sig.update({k: "i32" for k in ("B", "T", "N", "K", "N0", "N1")})
    sig.update(STAGES="constexpr", NUM_PROGS="constexpr")
    src = GluonASTSource(fn=_rows_ws_kernel, signature=sig, constexprs={"STAGES": STAGES, "NUM_PROGS": num_progs},
                         attrs={})
    return _sm90_report(src, GPUTarget, ptxas_report)


def _sm90_report(src, GPUTarget, ptxas_report) -> dict:
    """``compile_stats``' figures for a Gluon source compiled for sm_90a as launched (4 warps, maxnreg 168)."""
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=168))
    regs, spill, out = ptxas_report(k.asm["ptx"])
    return dict(regs=regs, spill_bytes=spill, smem=k.metadata.shared, ptxas_rc=out.returncode,
                ptxas_err=out.stderr[-2000:] if out.returncode else "",
                wgmma=k.asm["ttgir"].count("warp_group_dot"), partitions=k.asm["ttgir"].count("partition"),
                wgmma_serialized="C7515" in out.stderr)
