"""The record-class GPT of the parameter-golf challenge (PR #549 class), written to be forked.

Architecture (defaults = ``GPTConfig()``): vocab 1024, 11 layers, d 512, 8 query heads / 4 KV heads
(GQA, head_dim 64), MLP 3x with LeakyReLU(0.5)^2, tied embedding, RoPE, RMSNorm (no weight),
QK-RMSNorm with a learned per-head query gain, logit soft-cap 30, and encoder/decoder ("U-Net")
skip connections with learned per-channel skip weights. Optional (``bigram_buckets`` > 0): a
BigramHash embedding added to the token embedding (see ``BigramHash``).

Per block i, with x0 the embedding output and n(.) = RMSNorm:

    x   = mix[0] * x + mix[1] * x0                      (learned residual mix, per channel)
    h   = n(x)
    q, k, v = c_q(h), c_k(h), c_v(h)                     (or adapter.qkv(i, h, attn), see below)
    q, k = n(q) * q_gain, n(k);  q, k = RoPE(q), RoPE(k)
    x   = x + attn_scale * proj(SDPA_causal(q, k, v))    (GQA: 8 query heads share 4 K/V heads)
    x   = x + mlp_scale * mlp_proj(leaky_relu(mlp_fc(n(x)), 0.5) ** 2)

The embedding is x0 = n(E[input_t] + bigram_scale * B[hash(input_{t-1}, input_t)]) (second term only
with ``bigram_buckets`` > 0). The first L//2 blocks are the encoder; their outputs are pushed on a stack and the decoder
blocks pop them: before decoder block j, x += skip_weight[j] * skip. The head is
logits = cap * tanh((n(x) @ E^T) / cap) with E the (tied) embedding and cap = 30.

Adapter hook (used by the eval driver's test-time training, ``train/adapters.py``):
    ``forward(input_ids, target_ids=None, adapter=None)``. With ``adapter`` given,
    * in every attention block i: ``q, k, v = adapter.qkv(i, h, attn)`` (or, if the adapter has a
      ``layer(i)`` method, ``adapter.layer(i).qkv(h, attn)``: a per-block view without the index, so
      one compiled ``Block`` serves all layers) where ``h`` is the
      normed block input (B, T, d) and ``attn`` the block's ``CausalSelfAttention``; the adapter
      computes the base projections (``attn.c_q / c_k / c_v``, which are ``nn.Linear`` or
      ``pgolf_kernels.int6_linear.Int6Linear`` after ``convert_linears_to_int6``) plus its LoRA
      deltas and returns q (B, T, num_heads*head_dim), k and v (B, T, num_kv_heads*head_dim).
      The model then applies QK-norm, q gain, RoPE and attention exactly as without adapter.
      A ``layer(i)`` view also provides ``attn_out(h, a)`` (the attention output a, (B, T, d), before
      attn_scale; may add a LoRA of h), ``up(m, fc)`` and ``down(a, proj)`` (the MLP's projections of
      the normed MLP input m and of the activation a) and ``mlp_out(m, y)`` (the MLP output y; may
      add a LoRA of m). A view whose ``fused_residual`` is true instead provides ``attn_residual(x, h, y,
      proj, attn_scale, u_o)`` (the residual stream after attention, from the attention output y before its
      projection; u_o the o adapter's shrink where ``qkv_o(h, attn, fold)`` returned it with q, k and v) and
      ``mlp_residual(x, m, mlp, mlp_scale)`` (after the MLP): the same sums, each in one kernel
      (``pgolf_kernels.linear_residual``); with such an adapter the U-Net skips run through
      ``pgolf_kernels.skip_add`` while ``SKIP_KERNEL`` is on, and the blocks' residual mix and RMS norms through
      ``pgolf_kernels.mix_norm`` while ``NORM_KERNEL`` is on.
    * at the head: ``logits_raw = adapter.head(h_final, model)`` with ``h_final`` the final-normed
      hidden state (B, T, d); the soft-cap is applied by the model afterwards.
    Returns per-token NLL (B, T) float32 (``reduction='none'``) when ``target_ids`` is given,
    else the soft-capped logits (B, T, V) float32.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def _skip_kernel_from_env() -> bool:
    """PGOLF_SKIP_ADD: unset or "kernel" = the U-Net skips through ``pgolf_kernels.skip_add`` where the adapter's
    residual sites are fused (``fused_residual``, the kernel path); "torch" = ``torch.addcmul`` always."""
    from pgolf_kernels._utils import env_choice

    return env_choice("PGOLF_SKIP_ADD", {"kernel": "pgolf_kernels.skip_add with a fused_residual adapter",
                                         "torch": "torch.addcmul"}) == "kernel"


def _skip_fork_from_env() -> bool:
    """PGOLF_SKIP_FORK: unset or "1" = with ``SKIP_KERNEL``'s skips, each encoder output through
    ``pgolf_kernels.skip_add.skip_fork`` (its two gradients summed in one pass); "0" = through ``skip_add`` alone."""
    from pgolf_kernels._utils import env_choice

    return env_choice("PGOLF_SKIP_FORK", {"1": "skip_fork / skip_join", "0": "skip_add, autograd's sum"}) == "1"


def _join_fold_from_env() -> bool:
    """PGOLF_JOIN_FOLD: unset or "1" = with ``SKIP_FORK``, each decoder's join inside its block (``Block.forward``'s
    ``skip``: ``skip_join_inline``, fused by Inductor into the block's residual mix); "0" = the join's own pass
    before the block (``skip_join``)."""
    from pgolf_kernels._utils import env_choice

    return env_choice("PGOLF_JOIN_FOLD", {"1": "the join inside the block", "0": "skip_join before the block"}) == "1"


def _qk_layout_from_env() -> str:
    """PGOLF_QK_LAYOUT: the memory order ``head_norm_rope`` writes q and k in under ``fused_qk``: "bthd" (default) both
    in (B, T, H, D) order, so the attention output (in q's order) is a (B, T, H·D) view; "k-bhtd" k in (B, H, T, D)
    order, q as before; "bhtd" both, the output copied back to (B, T, H·D)."""
    from pgolf_kernels._utils import env_choice

    return env_choice("PGOLF_QK_LAYOUT", {"bthd": "q and k in (B, T, H, D) order", "k-bhtd": "k in (B, H, T, D) "
                                          "order", "bhtd": "q and k in (B, H, T, D) order, the output copied"})


# "bthd" by default: on an H200 cuDNN's attention took 30.6-31.9 ms per records' step with q and k in (B, T, H, D)
# order against 29.9 ms in (B, H, T, D) order (torch's norm and rotary), whose output copy took 1.24 ms
# (bench/results/profile-ttt-h200.md, measurement 11); on an H100 with k alone in (B, H, T, D) order ("k-bhtd") the
# attention took 30.74 / 30.63 ms against 30.60 / 30.79 ms with "bthd", the step 84.03 / 83.91 against 83.90 / 84.09
# GPU-ms (profile-ttt-h100.md, measurement 13): no gain. "bhtd" not timed on the H100
QK_LAYOUT: str = _qk_layout_from_env()


def _norm_kernel_from_env() -> bool:
    """PGOLF_NORM_KERNEL: unset or "torch" = the blocks' residual mix and RMS norms as torch ops; "kernel" = through
    ``pgolf_kernels.mix_norm`` where the adapter's residual sites are fused (``fused_residual``, the kernel path)."""
    from pgolf_kernels._utils import env_choice

    return env_choice("PGOLF_NORM_KERNEL", {"torch": "torch ops (compiled with the step)",
                                            "kernel": "pgolf_kernels.mix_norm with a fused_residual adapter"}) == "kernel"


# Off by measurement: on an H100 mix_norm ran at the compiled composition's speed (forward 0.183 vs 0.185 ms,
# forward + backward 0.405 vs 0.406 ms at 64 x 2048 x 512, ~2.9 TB/s both: bench/results/mix-norm-h100.md) and the
# records' step's GPU time did not move (81.36 / 84.03 ms with it, 82.15 / 81.98 without, profile suffix -nrm)
NORM_KERNEL: bool = _norm_kernel_from_env()


# On by default: in the records' step on an H200 (bench/results/profile-ttt-h200.md, measurement 10) the 5 skips took
# 0.77 ms forward and backward against 1.77 ms for addcmul (0.94) and its backward's mul (0.82), and the eval with it
# scored as without it, eager and under CUDA graphs (GPU test, H200)
SKIP_KERNEL: bool = _skip_kernel_from_env()

# On by default: the U-Net's encoder outputs feed the next block and a skip; through skip_fork their two gradients
# meet in the pass that applies w. In the records' step on an H100 (profile-ttt-h100.md measurement 18, two samples
# each, alternating) autograd's 5 add_ passes (0.646 ms) went and the skip kernel took 0.17 ms more: the step's GPU
# time outside attention 49.97 / 49.94 ms without, 49.45 / 49.55 ms with (-0.45 ms); attention alone moved by up to
# 0.55 ms between the samples, so the whole step's GPU busy (80.65 / 80.40 against 80.01 / 80.56) does not resolve it.
# Its eval scored as without it, eager and under CUDA graphs (GPU test, H100)
SKIP_FORK: bool = _skip_fork_from_env()

# On by default: with the fork, each decoder's join (x + w ⊙ e, skip_join's own pass: 0.121 ms, 403 MB at
# 64 x 2048 x 512 bf16) inside the decoder block's compiled region, where Inductor fuses it into the residual mix that
# reads x and x0 anyway. In the records' step on an H100 (profile-ttt-h100.md measurement 19, two samples each,
# alternating) the 5 join passes (0.601 ms) went, the mix + norm took 0.151 ms more, the step's GPU time outside
# attention 49.41 -> 48.93 ms; the decoder blocks compile a graph of their own (its first call 9.9 s). Case (c)'s timed
# eval on one H100 (bench/results/warmup-h100.md): 184.9 s without, 179.9 / 180.1 s with (the TTT steps 163.2 against
# 161.9 / 161.7 s). The sum stays in fp32 into the mix (one bf16 rounding of each decoder's input fewer): that share's
# val_bpb moved from 3.637061 to 3.636391 (the reference's 3.636905), the fixture set's stays within 5.8e-5 of the
# reference's; the eval with it scored as without it on a GPU (eager and under CUDA graphs, BPB within 1e-4)
JOIN_FOLD: bool = _join_fold_from_env()


@dataclass
class GPTConfig:
    vocab_size: int = 1024
    num_layers: int = 11
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: int = 3
    seq_len: int = 2048
    logit_softcap: float = 30.0
    rope_base: float = 10000.0
    tie_embeddings: bool = True
    leaky_slope: float = 0.5          # MLP activation: leaky_relu(x, 0.5) ** 2
    qk_gain_init: float = 1.5         # learned per-head query gain after QK-RMSNorm (records' value)
    tied_embed_init_std: float = 0.005
    bigram_buckets: int = 0           # BigramHash table rows (0 = off); the training driver picks the default

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"GPTConfig.from_dict: unknown keys {sorted(unknown)}")
        return cls(**d)

    def __post_init__(self):
        if self.model_dim % self.num_heads:
            raise ValueError(f"model_dim={self.model_dim} must be divisible by num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if (self.model_dim // self.num_heads) % 2:
            raise ValueError("head_dim must be even for RoPE")
        if isinstance(self.bigram_buckets, bool) or not isinstance(self.bigram_buckets, int) or self.bigram_buckets < 0:
            raise ValueError(f"bigram_buckets must be an int >= 0 (0 = off), got {self.bigram_buckets!r}")


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


class Rotary(nn.Module):
    """RoPE cos/sin tables (1, 1, T, head_dim/2), recomputed per call: at T 2048, d_h 64 that is a
    131k-element outer product, negligible next to one attention, and keeps torch.compile free of
    Python-side cache state.

    ``inv_freq`` (head_dim/2,) = base^(-2i/head_dim), computed once on the CPU in fp32, is a
    non-persistent buffer: it follows ``model.to(device)`` (not in the state dict or the artifact) and
    stays fp32 through ``model.to(bfloat16)``. It used to be a plain CPU attribute moved by
    ``.to(device)`` inside the forward; that CPU input made Inductor emit host C++ kernels in the
    compiled blocks, and building or loading them (g++, Inductor's vector-ISA probe, their file locks)
    was the largest part of the eval's warm-up with warm caches on the H200
    (bench/results/warmup-h200.md)."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.head_dim, self.base = head_dim, base
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self) -> torch.Tensor:
        return 1.0 / (self.base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:  # a dtype cast: recompute, do not round the frequencies
            self.inv_freq = self._inv_freq().to(self.inv_freq.device)
        return self

    def forward(self, T: int, device, dtype):
        t = torch.arange(T, device=device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.to(device))
        return freqs.cos().to(dtype)[None, None], freqs.sin().to(dtype)[None, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, H, T, D): rotate pairs (x1, x2) = (first half, second half) of the head dim
    h = x.size(-1) // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


_FA3 = None


def _flash_attn3():
    """FlashAttention-3's ``flash_attn_func`` if importable (Hopper builds), else None."""
    global _FA3
    if _FA3 is None:
        try:
            from flash_attn_interface import flash_attn_func  # type: ignore

            _FA3 = flash_attn_func
        except Exception:
            _FA3 = False
    return _FA3 or None


class QATLinear(nn.Linear):
    """``nn.Linear`` (no bias) with a switchable int-k quantization-aware forward.

    ``qat = None`` (default): plain ``F.linear``. ``qat = "kernel"``: ``pgolf_kernels.qat.int6_qat_linear``
    (fake-quantized weights formed inside our Triton matmul, straight-through gradient); ``qat =
    "reference"``: the pure-torch STE ``int6_qat_linear_ref`` (same math). ``qat_bits`` / ``qat_clip``
    select the grid (default int6 with the artifact codec's clip search). A subclass, so
    ``matrix_params``, the artifact and ``convert_linears_to_int6`` treat it as ``nn.Linear``; the
    switch is not state (``GPT.set_qat``)."""

    qat: Optional[str] = None
    qat_bits: int = 6
    qat_clip = "search"
    _qat_fn = None  # set by GPT.set_qat (resolved there, not imported inside the compiled forward)

    def forward(self, x):
        if self.qat is None:
            return super().forward(x)
        if self.qat == "reference" and torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        return self._qat_fn(x, self.weight, self.bias, bits=self.qat_bits, clip=self.qat_clip)


def bigram_keys(input_ids: torch.Tensor, buckets: int, no_prev: int) -> torch.Tensor:
    """Row of the BigramHash table for every position: key[t] = h(input[t-1], input[t]) mod buckets,
    with input[-1] := ``no_prev`` (a fixed id outside the vocabulary) at the first position.

    Only INPUT ids t-1 and t enter: position t predicts input[t+1] (its target), which never
    appears in key[t] (tests/test_bigram.py perturbs targets and checks keys and logits).
    h: a multiply-xorshift mix of the pair in 31 bits (int64 arithmetic, no overflow for ids < 2^24):
    h = ((p * 0x9E3779B1) ^ (c * 0x85EBCA77 + 0x165667B1)) mod 2^31; h ^= h >> 15; h *= 0x2C1B3C6D
    mod 2^31; h ^= h >> 12. Constants are odd 32-bit multipliers (golden-ratio / murmur-style); the
    mix spreads the 1024 x 1025 pairs of sp1024 over every bucket (tested)."""
    ids = input_ids.long()
    prev = torch.cat((torch.full_like(ids[..., :1], no_prev), ids[..., :-1]), dim=-1)
    m31 = (1 << 31) - 1
    h = ((prev * 0x9E3779B1) ^ (ids * 0x85EBCA77 + 0x165667B1)) & m31
    h = h ^ (h >> 15)
    h = (h * 0x2C1B3C6D) & m31
    h = h ^ (h >> 12)
    return h % buckets


class BigramHash(nn.Module):
    """E_bigram[key[t]] * scale, key = ``bigram_keys(input_ids, buckets, no_prev=vocab_size)``.

    Table (buckets, d) initialised like the tied embedding (N(0, 0.005)); the scalar ``scale``
    starts at 0.05 so the model starts as the plain token embedding plus a ~5 % perturbation and
    both the table and the scale receive gradients from step 0 (a zero table would leave the scale
    without gradient and vice versa)."""

    def __init__(self, buckets: int, dim: int, vocab_size: int, init_std: float):
        super().__init__()
        self.buckets = int(buckets)
        self.no_prev = int(vocab_size)
        self.weight = nn.Parameter(torch.empty(self.buckets, dim))
        self.scale = nn.Parameter(torch.tensor(0.05))
        self.init_std = init_std
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        nn.init.normal_(self.weight, std=self.init_std)
        self.scale.fill_(0.05)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(bigram_keys(input_ids, self.buckets, self.no_prev), self.weight) * self.scale


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.model_dim // cfg.num_heads
        kv_dim = self.num_kv_heads * self.head_dim
        self.c_q = QATLinear(cfg.model_dim, cfg.model_dim, bias=False)
        self.c_k = QATLinear(cfg.model_dim, kv_dim, bias=False)
        self.c_v = QATLinear(cfg.model_dim, kv_dim, bias=False)
        self.proj = QATLinear(cfg.model_dim, cfg.model_dim, bias=False)
        self.q_gain = nn.Parameter(torch.full((cfg.num_heads,), cfg.qk_gain_init))
        self.rotary = Rotary(self.head_dim, cfg.rope_base)
        # resolved once here (an import attempt, no GPU query), not inside the compiled forward
        self._fa3 = _flash_attn3()

    def forward(self, h: torch.Tensor, q=None, k=None, v=None, rope=None, keep=None,
                fused_qk: bool = False, project: bool = True) -> torch.Tensor:
        """``rope``: the (cos, sin) tables of ``Rotary`` for this T (``GPT.hidden`` makes them once per
        forward for every block); None computes them here. ``keep`` (B, C) int64 window positions: only those
        queries (each attending causally to keys 0..its position), output (B, C, d) instead of (B, T, d).
        ``fused_qk`` (``TTTConfig.fused_qk``): q's and k's RMSNorm, gain and rotary through
        ``pgolf_kernels.head_norm_rope``, the same function rounded once. ``project=False``: the attention output
        before the output projection (B, T or C, d), for a caller that fuses the projection with the residual."""
        B, T, _ = h.shape
        if q is None:
            q, k, v = self.c_q(h), self.c_k(h), self.c_v(h)
        cos, sin = self.rotary(T, h.device, q.dtype) if rope is None else (rope[0].to(q.dtype), rope[1].to(q.dtype))
        v = v.reshape(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if fused_qk:
            from pgolf_kernels.head_norm_rope import head_norm_rope

            # "bthd": q and k in the projections' (B, T, H, D) order, as v is: cuDNN's SDPA writes its output in
            # q's order, so the transpose back to (B, T, H·D) below is a view, not a copy (QK_LAYOUT: the others)
            q = head_norm_rope(q, cos, sin, self.num_heads, self.q_gain.to(q.dtype),
                               layout="bhtd" if QK_LAYOUT == "bhtd" else "bthd", validate=False)
            k = head_norm_rope(k, cos, sin, self.num_kv_heads, layout="bthd" if QK_LAYOUT == "bthd" else "bhtd",
                               validate=False)
        else:
            q = q.reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2)
            k = k.reshape(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
            q = rms_norm(q) * self.q_gain.to(q.dtype)[None, :, None, None]
            k = rms_norm(k)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if keep is not None:
            # the kept queries only: C of T rows of the scores, so a masked SDPA (no flash kernel) costs C/T of
            # the causal one
            C = keep.size(1)
            q = torch.gather(q, 2, keep[:, None, :, None].expand(B, self.num_heads, C, self.head_dim))
            mask = torch.arange(T, device=h.device)[None, None, None, :] <= keep[:, None, :, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               enable_gqa=self.num_kv_heads != self.num_heads)
            y = y.transpose(1, 2).reshape(B, C, -1)
            return self.proj(y) if project else y
        fa3 = self._fa3 if h.is_cuda else None
        if fa3 is not None and q.dtype in (torch.bfloat16, torch.float16):
            y = fa3(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
            y = y[0] if isinstance(y, tuple) else y
            y = y.reshape(B, T, -1)
        else:
            # SDPA picks the flash backend on CUDA for bf16; enable_gqa avoids materializing repeated K/V
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               enable_gqa=self.num_kv_heads != self.num_heads)
            y = y.transpose(1, 2).reshape(B, T, -1)
        return self.proj(y) if project else y


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = cfg.mlp_mult * cfg.model_dim
        self.fc = QATLinear(cfg.model_dim, hidden, bias=False)
        self.proj = QATLinear(hidden, cfg.model_dim, bias=False)
        self.slope = cfg.leaky_slope

    def forward(self, x, adapter=None):
        """``adapter`` (a block's adapter view): ``up(x, fc)`` / ``down(a, proj)`` replace the two
        projections (base + LoRA delta), see ``GPT.hidden``."""
        if adapter is None:
            return self.proj(F.leaky_relu(self.fc(x), self.slope).square())
        if getattr(adapter, "fused_mlp", False):  # TTTConfig.fused_mlp: pgolf_kernels.linear_act.mlp_leaky_sq
            return adapter.mlp(x, self)
        return adapter.down(F.leaky_relu(adapter.up(x, self.fc), self.slope).square(), self.proj)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        d = cfg.model_dim
        self.attn = CausalSelfAttention(cfg)
        self.mlp = MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(d))
        self.mlp_scale = nn.Parameter(torch.ones(d))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(d), torch.zeros(d))))

    def forward(self, x, x0, adapter=None, rope=None, keep=None, skip=None):
        """``adapter``: this block's adapter view, see the module docstring and ``GPT.hidden``; ``rope``: the
        RoPE (cos, sin) tables (``CausalSelfAttention.forward``). ``keep`` (B, C) int64: the block's output at
        those window positions only, (B, C, d): the Q, K and V projections still see every position, the
        attention queries, the output projection and the MLP only the kept ones (``GPT.hidden(..., keep=)``).
        ``skip``: a ``skip_add.ScaledSkip`` joined to x first (x + w ⊙ e, ``skip_join_inline``: ``JOIN_FOLD``)."""
        if skip is not None:
            from pgolf_kernels.skip_add import skip_join_inline

            x = skip_join_inline(x, skip, validate=False)
        fused_norm = NORM_KERNEL and getattr(adapter, "fused_residual", False)
        if fused_norm:
            from pgolf_kernels.mix_norm import mix_rms_norm, rms_norm_rows

            x, h = mix_rms_norm(x.contiguous(), x0.contiguous(), self.resid_mix.to(x.dtype), validate=False)
        else:
            mix = self.resid_mix.to(x.dtype)
            x = mix[0] * x + mix[1] * x0
            h = rms_norm(x)
        hk = h
        if keep is not None:
            hk = torch.gather(h, 1, keep[..., None].expand(-1, -1, h.size(-1)))
            x = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.size(-1)))
        if adapter is not None and getattr(adapter, "fused_residual", False):
            # TTTConfig.fused_residual: each residual site as one pgolf_kernels.linear_residual GEMM (projection,
            # the o / mlp adapters' expand and the scaled residual add)
            # the o adapter reads h too: where it is h itself (not the kept positions), its shrink may run inside
            # the q / k / v op (adapters.O_FOLD)
            q, k, v, u_o = adapter.qkv_o(h, self.attn, fold=keep is None)
            y = self.attn(h, q, k, v, rope, keep=keep, fused_qk=getattr(adapter, "fused_qk", False), project=False)
            x = adapter.attn_residual(x, hk, y, self.attn.proj, self.attn_scale, u_o)
            return adapter.mlp_residual(x, rms_norm_rows(x.contiguous(), validate=False) if fused_norm else rms_norm(x),
                                        self.mlp, self.mlp_scale)
        if adapter is not None:
            q, k, v = adapter.qkv(h, self.attn)
            a = adapter.attn_out(hk, self.attn(h, q, k, v, rope, keep=keep,
                                               fused_qk=getattr(adapter, "fused_qk", False)))
        else:
            a = self.attn(h, rope=rope, keep=keep)
        x = x + self.attn_scale.to(x.dtype) * a
        m = rms_norm(x)
        y = self.mlp(m) if adapter is None else adapter.mlp_out(m, self.mlp(m, adapter))
        x = x + self.mlp_scale.to(x.dtype) * y
        return x


class _BoundAdapter:
    """``adapter.qkv(i, h, attn)`` bound to block i, for adapters without a ``layer(i)`` view; such an
    adapter touches Q/K/V only (the other hooks are the identity)."""

    def __init__(self, adapter, i: int):
        self.adapter, self.i = adapter, i

    def qkv(self, h, attn):
        return self.adapter.qkv(self.i, h, attn)

    def attn_out(self, h, a):
        return a

    def mlp_out(self, m, y):
        return y

    def up(self, m, fc):
        return fc(m)

    def down(self, a, proj):
        return proj(a)


def _layer_adapter(adapter, i: int):
    if adapter is None:
        return None
    layer = getattr(adapter, "layer", None)
    return layer(i) if layer is not None else _BoundAdapter(adapter, i)


class GPT(nn.Module):
    """See the module docstring for the math and the adapter hook."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.bigram = (BigramHash(cfg.bigram_buckets, cfg.model_dim, cfg.vocab_size, cfg.tied_embed_init_std)
                       if cfg.bigram_buckets > 0 else None)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.num_encoder_layers = cfg.num_layers // 2
        self.num_decoder_layers = cfg.num_layers - self.num_encoder_layers
        n_skip = min(self.num_encoder_layers, self.num_decoder_layers)
        self.skip_weights = nn.Parameter(torch.ones(n_skip, cfg.model_dim))
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.model_dim, cfg.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        cfg = self.config
        std = cfg.tied_embed_init_std if cfg.tie_embeddings else 1.0 / math.sqrt(cfg.model_dim)
        nn.init.normal_(self.tok_emb.weight, std=std)
        if self.bigram is not None:
            self.bigram.reset_parameters()
        for b in self.blocks:
            for lin in (b.attn.c_q, b.attn.c_k, b.attn.c_v, b.mlp.fc):
                nn.init.uniform_(lin.weight, -1 / math.sqrt(lin.in_features), 1 / math.sqrt(lin.in_features))
            # zero-init output projections: every block starts as the identity (records' choice)
            nn.init.zeros_(b.attn.proj.weight)
            nn.init.zeros_(b.mlp.proj.weight)
        if self.lm_head is not None:
            nn.init.zeros_(self.lm_head.weight)

    def head_weight(self) -> torch.Tensor:
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    def hidden(self, input_ids: torch.Tensor, adapter=None, keep=None) -> torch.Tensor:
        """Final-normed hidden state (B, T, d); with ``keep`` (B, C) int64 window positions, (B, C, d) at those
        positions, the last block computing only what they need (``Block.forward``): the same values, without
        that block's attention queries, output projection and MLP at the other T - C positions (its Q projection
        still runs over the window, with K and V)."""
        if keep is not None and (not isinstance(keep, torch.Tensor) or keep.dtype != torch.int64 or keep.dim() != 2
                                 or keep.shape[0] != input_ids.shape[0] or keep.shape[1] > input_ids.shape[1]
                                 or keep.device != input_ids.device):
            got = (f"{keep.dtype} {tuple(keep.shape)} on {keep.device}" if isinstance(keep, torch.Tensor)
                   else type(keep).__name__)
            # the positions' values are not checked here: that would sync the host every step
            raise ValueError(f"GPT.hidden: keep must be an int64 (B, C) tensor of window positions on "
                             f"{input_ids.device} with B = {input_ids.shape[0]} and C <= T = {input_ids.shape[1]}, "
                             f"got {got}")
        x = self.tok_emb(input_ids)
        if self.bigram is not None:
            x = x + self.bigram(input_ids)
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        x = rms_norm(x)
        x0 = x
        # RoPE tables once per forward, not in every block: inside the compiled blocks they were fused into the
        # QK-norm kernels and their backward, which evaluated cos and sin for every q/k element (the two
        # largest elementwise kernels of a TTT step on the H100, 3.3 and 3.5 ms of 52 ms,
        # bench/results/profile-ttt-h100.md)
        rope = self.blocks[0].attn.rotary(x.size(1), x.device, x.dtype)
        skips = []
        kernel_skips = SKIP_KERNEL and getattr(adapter, "fused_residual", False)
        n_enc = self.num_encoder_layers
        for i in range(n_enc):
            x = self.blocks[i](x, x0, _layer_adapter(adapter, i), rope)
            j = n_enc - 1 - i  # the decoder block that pops this output (skips is a stack)
            if kernel_skips and SKIP_FORK and j < self.num_decoder_layers:
                from pgolf_kernels.skip_add import skip_fork

                # x's two gradients (next block, skip) summed in the fork's one pass, not by autograd after a
                # product pass (pgolf_kernels/skip_add.py says why)
                x, s = skip_fork(x.contiguous(), self.skip_weights[j].to(x.dtype), validate=False)
                skips.append(s)
            else:
                skips.append(x)
        for j in range(self.num_decoder_layers):
            i = n_enc + j
            last = keep if j == self.num_decoder_layers - 1 else None
            inside = None  # a skip the block joins itself, inside its compiled region (JOIN_FOLD says why)
            if skips:
                # one pass (x + w * skip, fp32 inside, rounded once) instead of a product pass and a sum pass: the
                # skips run outside the compiled blocks, where the two had taken 1.75 + 0.65 ms of each records' TTT
                # step on an H100 (profile-ttt-h100.md measurement 3)
                if kernel_skips and SKIP_FORK and JOIN_FOLD:
                    inside = skips.pop()
                elif kernel_skips and SKIP_FORK:
                    from pgolf_kernels.skip_add import skip_join

                    x = skip_join(x.contiguous(), skips.pop(), validate=False)
                elif kernel_skips:
                    from pgolf_kernels.skip_add import skip_add

                    x = skip_add(x, self.skip_weights[j].to(x.dtype), skips.pop())
                else:
                    x = torch.addcmul(x, self.skip_weights[j].to(x.dtype), skips.pop())
            x = self.blocks[i](x, x0, _layer_adapter(adapter, i), rope, last, inside)
        return rms_norm(x)

    def forward(self, input_ids: torch.Tensor, target_ids: Optional[torch.Tensor] = None, adapter=None):
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"GPT.forward: input_ids must be (B, T) int64, got {tuple(input_ids.shape)} {input_ids.dtype}")
        h = self.hidden(input_ids, adapter)
        if adapter is not None:
            raw = adapter.head(h, self)
        else:
            w = self.head_weight()
            raw = F.linear(h, w.to(h.dtype))
        cap = self.config.logit_softcap
        logits = raw.float()
        if cap > 0:
            logits = cap * torch.tanh(logits / cap)
        if target_ids is None:
            return logits
        if target_ids.shape != input_ids.shape:
            raise ValueError(f"GPT.forward: target_ids shape {tuple(target_ids.shape)} != input_ids {tuple(input_ids.shape)}")
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target_ids.reshape(-1).long(), reduction="none")
        return nll.view_as(target_ids).float()

    # ---- parameter groups for the optimizers -------------------------------------------------
    def matrix_params(self):
        """Weights of the nn.Linear layers inside the blocks (Muon; int6 in the artifact), in a fixed order.
        (Not "every 2-D parameter": ``resid_mix`` is a (2, d) control tensor.)"""
        return [(f"{mn}.weight", m.weight) for mn, m in self.named_modules()
                if mn.startswith("blocks.") and isinstance(m, nn.Linear)]

    def embedding_params(self):
        """Embedding tables (Adam at the embedding lr; int8 rows in the artifact): the token embedding,
        the untied head, and the BigramHash table."""
        out = [("tok_emb.weight", self.tok_emb.weight)]
        if self.lm_head is not None:
            out.append(("lm_head.weight", self.lm_head.weight))
        if self.bigram is not None:
            out.append(("bigram.weight", self.bigram.weight))
        return out

    def set_qat(self, mode: Optional[str], bits: int = 6, clip="search") -> int:
        """Switch every block matrix (``QATLinear``) to QAT: ``mode`` "kernel" | "reference" | None (off).
        Returns the number of layers switched."""
        if mode not in (None, "kernel", "reference"):
            raise ValueError(f"set_qat: mode must be None, 'kernel' or 'reference', got {mode!r}")
        fn = None
        if mode is not None:
            from pgolf_kernels.qat import int6_qat_linear, int6_qat_linear_ref

            fn = int6_qat_linear if mode == "kernel" else int6_qat_linear_ref
        n = 0
        for mn, m in self.named_modules():
            if mn.startswith("blocks.") and isinstance(m, QATLinear):
                m.qat, m.qat_bits, m.qat_clip, m._qat_fn = mode, bits, clip, fn
                n += 1
        return n

    def scalar_params(self):
        """Vectors and control tensors (gains, scales, mixes, skip weights) -> Adam."""
        mats = {id(p) for _, p in self.matrix_params()} | {id(p) for _, p in self.embedding_params()}
        return [(n, p) for n, p in self.named_parameters() if id(p) not in mats]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
