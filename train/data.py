"""Challenge shard format and a distributed token loader.

Shard format (the challenge's ``fineweb_*_{train,val}_*.bin``): a header of 256 little-endian int32
(``[0] = 20240520`` magic, ``[1] = 1`` version, ``[2] = n`` token count, the rest 0), then ``n``
little-endian uint16 tokens. The file size must be exactly ``1024 + 2 n`` bytes. Every document is
``[BOS=1] + tokens`` (no EOS).

``DistributedTokenLoader`` streams the shards of a glob in order (wrapping around) and cuts each
global batch into one contiguous span per rank: with W ranks, every step takes
``W * (local_tokens + 1)`` tokens; rank r gets span r, inputs = span[:-1], targets = span[1:].
The stream is deterministic, so a run is reproducible and ranks never read the same tokens.
"""
from __future__ import annotations

import glob as _glob
import os
from typing import List, Optional, Sequence, Union

import numpy as np
import torch

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
BOS_ID = 1


class ShardError(ValueError):
    """A token shard is missing, truncated, or not in the challenge format."""


def _read_header(path: str) -> int:
    if not os.path.exists(path):
        raise ShardError(f"token shard not found: {path}")
    if not os.path.isfile(path):
        raise ShardError(f"token shard is not a regular file: {path}")
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte shard header (truncated or not a shard)")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if int(header[0]) != SHARD_MAGIC:
        raise ShardError(f"{path}: bad magic {int(header[0])} (expected {SHARD_MAGIC}); not a challenge token shard")
    if int(header[1]) != SHARD_VERSION:
        raise ShardError(f"{path}: unsupported shard version {int(header[1])} (expected {SHARD_VERSION})")
    n = int(header[2])
    if n < 0:
        raise ShardError(f"{path}: negative token count {n} in header")
    expected = HEADER_BYTES + 2 * n
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise ShardError(f"{path}: file {what}: header says {n} tokens -> {expected} bytes, file has {size} bytes")
    return n


def shard_num_tokens(path: str) -> int:
    """Token count from the header (validates header and file size, does not read the tokens)."""
    return _read_header(path)


def read_shard(path: str) -> torch.Tensor:
    """Read one shard -> 1-D uint16 tensor of its tokens. Raises ShardError for bad files."""
    n = _read_header(path)
    tokens = np.fromfile(path, dtype="<u2", count=n, offset=HEADER_BYTES)
    if tokens.size != n:  # file shrank between the size check and the read
        raise ShardError(f"{path}: read {tokens.size} tokens, header says {n}")
    return torch.from_numpy(tokens.astype(np.uint16, copy=False))


def write_shard(path: str, tokens: Union[torch.Tensor, np.ndarray, Sequence[int]]) -> int:
    """Write tokens (all in [0, 65535]) as a challenge shard; returns the token count."""
    if isinstance(tokens, torch.Tensor):
        arr = tokens.detach().cpu().numpy()
    else:
        arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"write_shard: tokens must be 1-D, got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise ValueError(f"write_shard: tokens must be in [0, 65535] (uint16), got range [{arr.min()}, {arr.max()}]")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, arr.size
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(arr.astype("<u2").tobytes())
    os.replace(tmp, path)  # atomic: a reader never sees a half-written shard
    return int(arr.size)


def shard_paths(pattern: str) -> List[str]:
    paths = sorted(_glob.glob(pattern))
    if not paths:
        raise ShardError(f"no token shards match {pattern!r}")
    return paths


def load_tokens(pattern: str, max_tokens: Optional[int] = None) -> torch.Tensor:
    """Concatenate all shards of a glob (e.g. the validation set) into one uint16 tensor."""
    parts, total = [], 0
    for p in shard_paths(pattern):
        t = read_shard(p)
        parts.append(t)
        total += t.numel()
        if max_tokens is not None and total >= max_tokens:
            break
    out = torch.cat(parts) if len(parts) > 1 else parts[0]
    return out[:max_tokens] if max_tokens is not None else out


class TokenStream:
    """Endless stream over the shards of a glob, in file order, wrapping around.

    ``vocab_size``: every shard is checked, as it is read, for ids < vocab_size (one max per shard),
    so an out-of-vocabulary id stops the run with the shard's name instead of an embedding error.
    0-token shards are skipped; a glob whose shards hold no token at all is refused here (the stream
    could never make progress)."""

    def __init__(self, pattern: str, vocab_size: Optional[int] = None):
        self.paths = shard_paths(pattern)
        self.vocab_size = vocab_size
        counts = [_read_header(p) for p in self.paths]  # fail at start-up, not mid-run, on a bad shard
        if sum(counts) == 0:
            raise ShardError(f"the {len(self.paths)} shard(s) matching {pattern!r} hold 0 tokens")
        self.reset()

    def _load(self, idx: int):
        self.file_idx = idx
        self.tokens = read_shard(self.paths[idx])
        self.pos = 0
        if self.vocab_size is not None and self.tokens.numel():
            top = int(self.tokens.numpy().max())
            if top >= self.vocab_size:
                raise ShardError(f"{self.paths[idx]}: token id {top} >= vocabulary size {self.vocab_size}")

    def reset(self):
        self._load(0)

    def take(self, n: int) -> torch.Tensor:
        chunks = []
        empty_in_a_row = 0
        while n > 0:
            avail = self.tokens.numel() - self.pos
            if avail <= 0:
                empty_in_a_row += 1
                if empty_in_a_row > len(self.paths):  # a full cycle without a token: never spin
                    raise ShardError(f"token stream made no progress over all {len(self.paths)} shard(s)")
                self._load((self.file_idx + 1) % len(self.paths))
                continue
            empty_in_a_row = 0
            k = min(n, avail)
            chunks.append(self.tokens[self.pos:self.pos + k])
            self.pos += k
            n -= k
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


class DistributedTokenLoader:
    """Per-rank (inputs, targets) batches of shape (local_tokens // seq_len, seq_len), int64.

    ``next_batch(local_tokens, seq_len)``: all ranks advance the shared stream by
    ``world_size * (local_tokens + 1)`` tokens; rank r uses the r-th span (+1 token for the shifted
    targets). ``local_tokens`` must be a multiple of ``seq_len``.
    """

    def __init__(self, pattern: str, rank: int = 0, world_size: int = 1, device: Union[str, torch.device] = "cpu",
                 vocab_size: Optional[int] = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"DistributedTokenLoader: rank {rank} not in [0, {world_size})")
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.stream = TokenStream(pattern, vocab_size)

    def reset(self):
        self.stream.reset()

    def next_batch(self, local_tokens: int, seq_len: int):
        if local_tokens <= 0 or local_tokens % seq_len:
            raise ValueError(f"next_batch: local_tokens={local_tokens} must be a positive multiple of seq_len={seq_len}")
        span = local_tokens + 1
        chunk = self.stream.take(span * self.world_size)
        local = chunk[self.rank * span:(self.rank + 1) * span].to(torch.int64)
        pin = self.device.type == "cuda"
        x = local[:-1].reshape(-1, seq_len)
        y = local[1:].reshape(-1, seq_len)
        if pin:
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self.device, non_blocking=pin), y.to(self.device, non_blocking=pin)
