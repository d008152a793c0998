"""Import the vendored parameter-golf record scripts without running them (shared by tests and benches).

The record scripts (third party, MIT) live outside the repository, in ``$PGOLF_RECORDS_DIR`` (default
``../shared/records`` next to the repository root); their code is never copied here. Each one runs its
training only under ``if __name__ == "__main__"``, so loading it under another module name (``importlib``)
defines its classes and functions and returns the module.

Two records import FlashAttention-3 (``flash_attn_interface``) at the top level. ``install_standins()`` puts a
stand-in module into ``sys.modules`` when the real one is absent:

* ``flash_attn_func(q, k, v, causal=True)``: q (B, T, H, D), k/v (B, T, Hkv, D) -> (B, T, H, D) through
  ``torch.nn.functional.scaled_dot_product_attention`` (GQA by repeating k/v heads);
* ``flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True, ...)``:
  packed (total, H, D) documents, causal inside each document. CUDA: torch's own FlashAttention-2 varlen kernel
  (``aten::_flash_attention_forward`` with ``cu_seqlens``; autograd, meta and torch.compile support are torch's),
  or ``torch.nn.attention.flex_attention`` with a document mask when ``PGOLF_VARLEN_STANDIN=flex``; CPU: SDPA
  with the same dense mask. Why FA2 by default: under the 2026-04-29 script's ``torch.compile`` every varlen
  shape of its warm-up (4 cu_seqlens buckets, twice) compiled a flex_attention forward + backward template, and
  the record's training and TTT children were still compiling at 257-300 s on an H200; the FA2 op is an extern
  kernel to Inductor (nothing to generate) and the same algorithm family as FA3.

``standin_note()`` says what was replaced; benches copy it into their results.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types
from typing import Dict, Optional

import torch
import torch.nn.functional as F

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RECORDS = {
    "2026-03-17": "2026-03-17_LoRA_TTT",
    "2026-03-23": "2026-03-23_LeakyReLU_LegalTTT_ParallelMuon",
    "2026-04-29": "2026-04-29_SmearGateBOSFix_3Seed_1.06141",
}

_VARLEN_KINDS = {
    "fa2": "torch's FlashAttention-2 varlen kernel (aten::_flash_attention_forward with cu_seqlens)",
    "flex": "flex_attention with a causal document mask",
}


# the CUDA varlen stand-in this process uses, read from the environment once by ``install_standins`` (an eager call):
# flash_attn_varlen_func runs inside the records' torch.compile(fullgraph=True), where a module constant is guarded,
# not an environment lookup per call
_VARLEN_USE = {"kind": "fa2"}


def varlen_standin() -> str:
    """The CUDA stand-in for ``flash_attn_varlen_func``: ``PGOLF_VARLEN_STANDIN`` = fa2 (default) or flex."""
    kind = os.environ.get("PGOLF_VARLEN_STANDIN", "fa2")
    if kind not in _VARLEN_KINDS:
        raise ValueError(f"PGOLF_VARLEN_STANDIN = {kind!r}: expected one of {sorted(_VARLEN_KINDS)}")
    return kind


def standin_note() -> str:
    """What replaced FlashAttention-3, for the results (read when a bench runs, so the environment decides)."""
    return ("FlashAttention-3 replaced: flash_attn_func by torch SDPA (causal, GQA by repeated k/v heads), "
            f"flash_attn_varlen_func by {_VARLEN_KINDS[varlen_standin()]}")



def records_dir() -> str:
    """``$PGOLF_RECORDS_DIR``, else the first ``shared/records`` found beside the repository root or one level
    higher (a git worktree sits one folder deeper than the main checkout)."""
    env = os.environ.get("PGOLF_RECORDS_DIR")
    if env:
        return env
    cands = [os.path.join(os.path.dirname(REPO_ROOT), "shared", "records"),
             os.path.join(os.path.dirname(os.path.dirname(REPO_ROOT)), "shared", "records")]
    return next((c for c in cands if os.path.isdir(c)), cands[0])


def record_path(key: str) -> str:
    if key not in RECORDS:
        raise KeyError(f"records_env: unknown record {key!r}; expected one of {sorted(RECORDS)}")
    return os.path.join(records_dir(), RECORDS[key], "train_gpt.py")


def missing_reason() -> Optional[str]:
    """None when every vendored script is present, else one line saying what is missing."""
    d = records_dir()
    missing = [k for k in RECORDS if not os.path.isfile(record_path(k))]
    if missing:
        return f"record scripts not found under {d} (set PGOLF_RECORDS_DIR): missing {missing}"
    return None


def _repeat_kv(k: torch.Tensor, heads: int) -> torch.Tensor:
    # (B, Hkv, T, D) -> (B, H, T, D)
    return k if k.shape[1] == heads else k.repeat_interleave(heads // k.shape[1], dim=1)


def flash_attn_func(q, k, v, causal: bool = False, softmax_scale=None, **_ignored):
    """FA3 ``flash_attn_func`` layout (B, T, H, D) on torch SDPA."""
    H = q.shape[2]
    qt, kt, vt = q.transpose(1, 2), _repeat_kv(k.transpose(1, 2), H), _repeat_kv(v.transpose(1, 2), H)
    y = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=softmax_scale)
    return y.transpose(1, 2).contiguous()


def _doc_ids(cu: torch.Tensor, total: int) -> torch.Tensor:
    pos = torch.arange(total, device=cu.device)
    return torch.searchsorted(cu[1:].to(torch.int64), pos, right=True)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                           causal: bool = False, softmax_scale=None, window_size=(-1, -1), **_ignored):
    """FA3 varlen layout: q (total, H, D), k/v (total, Hkv, D); attention stays inside each document of
    ``cu_seqlens`` (q and k share the packing here, as in the records; trailing repeated entries are empty
    documents). Tokens past cu_seqlens[-1] are outside every document: their output is unspecified (the records
    end cu_seqlens at the total, so there are none). CUDA: FA2 (default) or flex, as ``install_standins`` read
    ``PGOLF_VARLEN_STANDIN``;
    CPU: SDPA with a dense mask. Compile-safe (the 2026-04-29 script calls it under
    ``torch.compile(fullgraph=True)``): the q/k packing check is a host comparison, so it runs eagerly only."""
    if (q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or k.shape[0] != q.shape[0] or k.shape[1] == 0
            or q.shape[1] % k.shape[1]):
        raise ValueError(f"flash_attn_varlen_func stand-in: expected q (total, H, D) and k, v (total, Hkv, D) with "
                         f"H a multiple of Hkv, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if tuple(window_size) != (-1, -1):
        raise ValueError(f"flash_attn_varlen_func stand-in: only window_size=(-1, -1) (no sliding window, as the "
                         f"records call it) is implemented, got {tuple(window_size)}")
    if (cu_seqlens_q is not cu_seqlens_k and not torch.compiler.is_compiling()
            and not torch.equal(cu_seqlens_q, cu_seqlens_k)):
        raise ValueError("flash_attn_varlen_func stand-in: cu_seqlens_q must equal cu_seqlens_k")
    if not q.is_cuda:
        return varlen_dense(q, k, v, cu_seqlens_q, causal, softmax_scale)
    if _VARLEN_USE["kind"] == "flex":
        return varlen_flex(q, k, v, cu_seqlens_q, causal, softmax_scale)
    return varlen_fa2(q, k, v, cu_seqlens_q, causal, softmax_scale, max_seqlen_q)


def _varlen_layout(q, k, v):
    H = q.shape[1]
    return q.transpose(0, 1)[None], _repeat_kv(k.transpose(0, 1)[None], H), _repeat_kv(v.transpose(0, 1)[None], H)


def varlen_fa2(q, k, v, cu: torch.Tensor, causal: bool, softmax_scale=None, max_seqlen=None) -> torch.Tensor:
    """Document-masked attention on torch's FlashAttention-2 varlen kernel (CUDA, fp16/bf16; the kernel refuses
    other dtypes by name). k/v heads are repeated to q's (as the other stand-ins do). ``max_seqlen`` bounds the
    longest document (FA2 sizes its grid by it; the records pass it); None uses the total, always safe.
    Differentiable through torch's own autograd formula for the op (``_flash_attention_backward``)."""
    total, H = q.shape[0], q.shape[1]
    kk = _repeat_kv(k.transpose(0, 1)[None], H)[0].transpose(0, 1)
    vv = _repeat_kv(v.transpose(0, 1)[None], H)[0].transpose(0, 1)
    cu32 = cu if cu.dtype == torch.int32 else cu.to(torch.int32)
    ms = total if max_seqlen is None else int(max_seqlen)
    kw = {} if softmax_scale is None else {"scale": float(softmax_scale)}
    out = torch.ops.aten._flash_attention_forward(q.contiguous(), kk.contiguous(), vv.contiguous(), cu32, cu32,
                                                  ms, ms, 0.0, bool(causal), False, **kw)[0]
    return out


def varlen_flex(q, k, v, cu: torch.Tensor, causal: bool, softmax_scale=None) -> torch.Tensor:
    """Document-masked attention on ``torch.nn.attention.flex_attention`` (needs torch.compile off CUDA)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    total = q.shape[0]
    doc = _doc_ids(cu, total)
    qt, kt, vt = _varlen_layout(q, k, v)

    def mask_mod(b, h, qi, ki):
        same = doc[qi] == doc[ki]
        return (same & (ki <= qi)) if causal else same

    bm = create_block_mask(mask_mod, None, None, total, total, device=q.device)
    return flex_attention(qt, kt, vt, block_mask=bm, scale=softmax_scale)[0].transpose(0, 1).contiguous()


def varlen_dense(q, k, v, cu: torch.Tensor, causal: bool, softmax_scale=None) -> torch.Tensor:
    """Document-masked attention on SDPA with a dense (total, total) mask (small shapes, CPU tests)."""
    total = q.shape[0]
    doc = _doc_ids(cu, total)
    qt, kt, vt = _varlen_layout(q, k, v)
    pos = torch.arange(total, device=q.device)
    m = doc[:, None] == doc[None, :]
    if causal:
        m = m & (pos[None, :] <= pos[:, None])
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=m, scale=softmax_scale)[0].transpose(0, 1).contiguous()


def install_standins() -> Dict[str, str]:
    """Put the FA3 stand-in into ``sys.modules`` unless a real ``flash_attn_interface`` imports.
    Returns {module: what was installed} for the results."""
    _VARLEN_USE["kind"] = varlen_standin()
    out = {}
    mod = sys.modules.get("flash_attn_interface")
    if mod is None or not getattr(mod, "_pgolf_standin", False):  # a stand-in installed earlier is not "real"
        try:
            import flash_attn_interface  # noqa: F401

            out["flash_attn_interface"] = "real FlashAttention-3"
            return out
        except ImportError:
            mod = types.ModuleType("flash_attn_interface")
            mod.flash_attn_func = flash_attn_func
            mod.flash_attn_varlen_func = flash_attn_varlen_func
            mod._pgolf_standin = True
            sys.modules["flash_attn_interface"] = mod
    mod.__doc__ = standin_note()
    out["flash_attn_interface"] = standin_note()
    return out


def load_record(key: str, module_name: Optional[str] = None):
    """Import record ``key`` (e.g. "2026-03-23") as a fresh module named ``module_name`` (never "__main__", so
    its main() does not run). Each call returns a new module object: patches on one do not leak into another."""
    path = record_path(key)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"records_env: {path} not found (set PGOLF_RECORDS_DIR to the records folder)")
    install_standins()
    name = module_name or ("pgolf_record_" + key.replace("-", "_"))
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses/pickle/torch.compile look the module up by name
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return mod


def ttt_model_cpu(ns):
    """(Hyperparameters, GPT) of an imported 2026-04-29-style record at its configured size, fp32 on the CPU, set up
    as the record sets up its TTT model before the TTT warm-up: eval mode (its fused training MLP is CUDA-only),
    looping on when the config loops, base weights frozen, rotary caches sized for ``ttt_eval_seq_len``. Weights
    from ``torch.manual_seed(0)``."""
    h = ns.Hyperparameters()
    torch.manual_seed(0)
    model = ns.GPT(h).float().eval()
    model.looping_active = h.num_loops > 0
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.blocks:
        block.attn.rotary(h.ttt_eval_seq_len, torch.device("cpu"), torch.bfloat16)
    return h, model
