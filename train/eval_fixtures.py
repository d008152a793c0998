"""Small models and token streams for the eval driver's tests and benchmark (no validation data).

``tiny_model``: a GPT whose blocks are not the identity (the records zero-init the output
projections, which would make every Q/V adapter gradient exactly zero and the TTT tests vacuous).
``doc_stream``: ``[BOS] + tokens`` documents of given lengths; tokens are drawn from a per-document
Zipf-like law over a document-specific permutation of the ids, so a document repeats its own
frequent tokens and test-time training has something to learn.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .data import BOS_ID
from .model import GPT, GPTConfig


def tiny_config(**kw) -> GPTConfig:
    base = dict(vocab_size=1024, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=2, seq_len=256)
    base.update(kw)
    return GPTConfig(**base)


@torch.no_grad()
def randomize_(model: GPT, seed: int = 0, proj_std: float = 0.02, emb_std: float = 0.05) -> GPT:
    """Give the zero-initialized projections small random values (deterministic in ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    for b in model.blocks:
        for lin in (b.attn.proj, b.mlp.proj):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * proj_std)
    model.tok_emb.weight.copy_(torch.randn(model.tok_emb.weight.shape, generator=g) * emb_std)
    return model


def tiny_model(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    m = GPT(tiny_config(**kw))
    randomize_(m, seed)
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def doc_stream(lengths: Sequence[int], vocab_size: int = 1024, seed: int = 0, shared_law: bool = False) -> torch.Tensor:
    """int64 stream of documents ``[BOS] + L tokens`` for each L in ``lengths``.

    ``shared_law=True``: every document draws from the same permutation (one "language" across the
    stream), so what an adapter learns on earlier documents helps on later ones (chunked TTT)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(4, vocab_size, dtype=torch.float64)
    parts = []
    shared = torch.randperm(vocab_size - 4, generator=g) + 4 if shared_law else None
    for L in lengths:
        perm = shared if shared_law else torch.randperm(vocab_size - 4, generator=g) + 4
        p = 1.0 / (ids - 3.0) ** 1.2
        toks = perm[torch.multinomial(p / p.sum(), int(L), replacement=True, generator=g)]
        parts.append(torch.cat([torch.tensor([BOS_ID]), toks]))
    return torch.cat(parts).to(torch.int64)


def synthetic_lut(vocab_size: int = 1024):
    """A byte LUT that needs no tokenizer file: ids 0-3 control (0 bytes, boundary), 4-259 one byte
    (byte-fallback pieces), the rest 1-4 bytes with every 3rd id carrying a leading space."""
    from .bpb import ByteLUT

    V = vocab_size
    base = torch.zeros(V, dtype=torch.int16)
    base[4:260] = 1
    base[260:] = (torch.arange(260, V) % 4 + 1).to(torch.int16)
    lead = torch.zeros(V, dtype=torch.bool)
    lead[260::3] = True
    bound = torch.zeros(V, dtype=torch.bool)
    bound[:4] = True
    return ByteLUT(base, lead, bound)
