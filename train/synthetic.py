"""Synthetic token sets with the official validation set's size and shape, for timing runs.

The official sp1024 validation set: the first 50,000 FineWeb documents, 62,021,846 tokens including
one BOS per document (mean 1,240.4 tokens per document incl. BOS). Document lengths are heavy-tailed;
here they are drawn from a log-normal (sigma 1.0: median ~ 0.61 x mean, the top 1 % of documents
> ~7x the mean), then rescaled and corrected by +-1 token so the total is exact. Token ids are
drawn from a Zipf-like law (p ~ 1/(rank+10)^1.1) over the non-control ids 4..V-1, by inverse-CDF
lookup in numpy (~2 s for 62 M tokens). BPB on such data is meaningless; it has the shapes and
sizes that make timing honest (document-boundary handling, length sorting, padding).

``python3 -m train.synthetic OUT_DIR`` writes ``OUT_DIR/synthetic_val_000000.bin`` (official size).
"""
from __future__ import annotations

import os
import time

import numpy as np

from .data import BOS_ID, write_shard

OFFICIAL_DOCS = 50_000
OFFICIAL_TOKENS = 62_021_846   # incl. 50,000 BOS


def doc_lengths(n_docs: int = OFFICIAL_DOCS, total_tokens: int = OFFICIAL_TOKENS, sigma: float = 1.0,
                min_len: int = 2, seed: int = 0) -> np.ndarray:
    """Per-document lengths (incl. BOS) summing exactly to ``total_tokens``."""
    if total_tokens < n_docs * min_len:
        raise ValueError(f"total_tokens={total_tokens} < n_docs * min_len = {n_docs * min_len}")
    rng = np.random.default_rng(seed)
    raw = rng.lognormal(mean=0.0, sigma=sigma, size=n_docs)
    target = total_tokens - n_docs * min_len          # tokens above the minimum length
    lens = np.floor(raw / raw.sum() * target).astype(np.int64)
    short = target - int(lens.sum())                  # < n_docs by construction of floor
    lens[rng.choice(n_docs, size=short, replace=False)] += 1
    lens += min_len
    assert int(lens.sum()) == total_tokens
    return lens


def synthetic_tokens(n_docs: int = OFFICIAL_DOCS, total_tokens: int = OFFICIAL_TOKENS, vocab_size: int = 1024,
                     seed: int = 0, sigma: float = 1.0) -> np.ndarray:
    """uint16 stream: for each document [BOS] + (len-1) Zipf-distributed ids in [4, vocab_size)."""
    if vocab_size <= 4:
        raise ValueError(f"vocab_size must be > 4 (ids 0-3 are control), got {vocab_size}")
    lens = doc_lengths(n_docs, total_tokens, sigma=sigma, seed=seed)
    rng = np.random.default_rng(seed + 1)
    ranks = np.arange(vocab_size - 4, dtype=np.float64)
    p = 1.0 / (ranks + 10.0) ** 1.1
    cdf = np.cumsum(p / p.sum())
    cdf[-1] = 1.0
    perm = rng.permutation(vocab_size - 4) + 4          # which id gets which rank
    u = rng.random(total_tokens, dtype=np.float32)
    toks = perm[np.searchsorted(cdf, u, side="right").clip(max=vocab_size - 5)].astype(np.uint16)
    starts = np.concatenate(([0], np.cumsum(lens)[:-1]))
    toks[starts] = BOS_ID
    return toks


def write_synthetic_val(out_dir: str, n_docs: int = OFFICIAL_DOCS, total_tokens: int = OFFICIAL_TOKENS,
                        vocab_size: int = 1024, seed: int = 0, name: str = "synthetic_val_000000.bin") -> str:
    path = os.path.join(out_dir, name)
    write_shard(path, synthetic_tokens(n_docs, total_tokens, vocab_size, seed))
    return path


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(prog="python3 -m train.synthetic", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--docs", type=int, default=OFFICIAL_DOCS)
    ap.add_argument("--tokens", type=int, default=OFFICIAL_TOKENS)
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="synthetic_val_000000.bin")
    a = ap.parse_args(argv)
    t0 = time.time()
    p = write_synthetic_val(a.out_dir, a.docs, a.tokens, a.vocab_size, a.seed, a.name)
    print(f"wrote {p}: {a.docs:,} documents, {a.tokens:,} tokens in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
