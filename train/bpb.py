"""Bits per byte, the challenge's score, from a sentencepiece tokenizer's byte tables.

Per token id v the tokenizer gives three tables (``ByteLUT``):

* ``base_bytes[v]``: UTF-8 length of the piece with its leading ``▁`` removed; a byte-fallback piece
  (``<0xAB>``) counts 1 byte; control / unknown / unused pieces (pad, BOS, EOS, UNK) count 0.
* ``leading_space[v]``: the piece began with ``▁`` (a space that decoding turns into one byte).
* ``boundary[v]``: control / unknown / unused pieces; after one of them a leading ``▁`` decodes to
  nothing (sentencepiece drops the dummy-prefix space at the start of a document).

Per scored target t with previous token p::

    bytes(p, t) = base_bytes[t] + (leading_space[t] and not boundary[p])
    bpb = (sum of NLL in nats / ln 2) / sum of bytes          (both sums in float64)

A BOS target therefore adds its loss and 0 bytes. Both sums are all-reduced over ranks
(``BPBAccumulator.all_reduce``) before the division.

A tokenizer without byte fallback is refused: text it cannot cover maps to UNK, which counts
0 bytes, so the denominator shrinks and BPB looks better than it is (the non-official sp1024
model undercounts the 200-document FineWeb sample by 0.95 %: 1,475,292 vs 1,489,418 bytes).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch

LN2 = math.log(2.0)


class TokenizerError(ValueError):
    """The tokenizer cannot be used to count bytes (no byte fallback, too large for the model...)."""


@dataclass
class ByteLUT:
    """Per-token-id byte tables (CPU or device tensors of length ``vocab_size``)."""

    base_bytes: torch.Tensor  # int16 (V,)
    leading_space: torch.Tensor  # bool (V,)
    boundary: torch.Tensor  # bool (V,)

    @property
    def vocab_size(self) -> int:
        return int(self.base_bytes.numel())

    @classmethod
    def from_sentencepiece(
        cls,
        model: Union[str, os.PathLike, "object"],
        *,
        vocab_size: Optional[int] = None,
        require_byte_fallback: bool = True,
    ) -> "ByteLUT":
        """Build the tables from a ``.model`` path or a loaded ``SentencePieceProcessor``.

        ``vocab_size`` pads the tables to the model's embedding size (ids past the tokenizer's
        vocabulary never occur in data; they get 0 bytes and are boundaries). Raises
        ``TokenizerError`` when the tokenizer has no byte-fallback pieces (unless
        ``require_byte_fallback=False``, which exists only to measure the undercount in tests) or
        when it is larger than ``vocab_size``.
        """
        import sentencepiece as spm

        if isinstance(model, (str, os.PathLike)):
            path = os.fspath(model)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"tokenizer model not found: {path}")
            sp = spm.SentencePieceProcessor(model_file=path)
            name = path
        else:
            sp = model
            name = "tokenizer"
        n = sp.vocab_size()
        V = n if vocab_size is None else int(vocab_size)
        if V < n:
            raise TokenizerError(f"{name} has {n} pieces but the model's vocabulary is only {V}")
        n_byte = sum(1 for i in range(n) if sp.is_byte(i))
        if require_byte_fallback and n_byte != 256:
            raise TokenizerError(
                f"{name} has {n_byte} byte-fallback pieces (need all 256): without byte fallback, text it "
                "cannot cover becomes UNK (0 bytes) and the byte count, hence BPB, is wrong. Use the official "
                "challenge tokenizer (byte_fallback=True)."
            )
        base = torch.zeros(V, dtype=torch.int16)
        lead = torch.zeros(V, dtype=torch.bool)
        bound = torch.ones(V, dtype=torch.bool)
        for i in range(n):
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                continue  # 0 bytes, boundary
            bound[i] = False
            if sp.is_byte(i):
                base[i] = 1
                continue
            piece = sp.id_to_piece(i)
            if piece.startswith("\u2581"):
                lead[i] = True
                piece = piece[1:]
            base[i] = len(piece.encode("utf-8"))
        return cls(base, lead, bound)

    def to(self, device) -> "ByteLUT":
        return ByteLUT(self.base_bytes.to(device), self.leading_space.to(device), self.boundary.to(device))

    def target_bytes(self, prev: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """Bytes of each target (int32, same shape): base[t] + (leading_space[t] & ~boundary[prev])."""
        if prev.shape != tgt.shape:
            raise ValueError(f"prev {tuple(prev.shape)} and tgt {tuple(tgt.shape)} must have the same shape")
        prev = prev.long()
        tgt = tgt.long()
        return self.base_bytes[tgt].int() + (self.leading_space[tgt] & ~self.boundary[prev]).int()

    def stream_bytes(self, tokens: torch.Tensor) -> int:
        """Total bytes over all targets of a token stream (targets = tokens[1:])."""
        tokens = torch.as_tensor(tokens).long().reshape(-1)
        if tokens.numel() < 2:
            return 0
        return int(self.target_bytes(tokens[:-1], tokens[1:]).sum(dtype=torch.int64))


class BPBAccumulator:
    """Float64 sums of NLL (nats), bytes and target count; ``all_reduce`` then ``bpb``.

    Sums live on ``device`` so adding a batch never synchronizes with the host.
    """

    def __init__(self, device="cpu"):
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # nll, bytes, targets

    def add(self, nll: torch.Tensor, nbytes: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        """Add per-target NLL (nats) and bytes; ``mask`` (bool) selects the targets that count."""
        nll = nll.detach().to(torch.float64)
        nbytes = nbytes.to(torch.float64)
        if mask is not None:
            m = mask.to(torch.float64)
            nll = nll * m
            nbytes = nbytes * m
            cnt = m.sum()
        else:
            cnt = torch.tensor(float(nll.numel()), dtype=torch.float64, device=nll.device)
        self.sums += torch.stack([nll.sum(), nbytes.sum(), cnt]).to(self.sums.device)

    def merge(self, other: "BPBAccumulator") -> None:
        self.sums += other.sums.to(self.sums.device)

    def all_reduce(self, group=None) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.sums, op=dist.ReduceOp.SUM, group=group)

    @property
    def loss_sum(self) -> float:
        return float(self.sums[0])

    @property
    def byte_sum(self) -> float:
        return float(self.sums[1])

    @property
    def n_targets(self) -> int:
        return int(round(float(self.sums[2])))

    @property
    def val_loss(self) -> float:
        s = self.sums.cpu()
        return float(s[0] / s[2]) if s[2] > 0 else float("nan")

    @property
    def bpb(self) -> float:
        s = self.sums.cpu()
        return float(s[0] / LN2 / s[1]) if s[1] > 0 else float("nan")


def bpb_from_sums(loss_sum: float, byte_sum: float) -> float:
    return loss_sum / LN2 / byte_sum
