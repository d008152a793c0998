"""BPB byte tables: golden count on the FineWeb sample, per-document decode check, refusal of a
tokenizer without byte fallback, float64 accumulation and all-reduce semantics."""
import json
import math
import os

import numpy as np
import pytest
import torch

from train.bpb import LN2, BPBAccumulator, ByteLUT, TokenizerError

SP1024 = "fineweb_1024_bpe.model"
NOBF = os.path.join("tokenizers", "nonofficial_fineweb_1024_bpe_no_byte_fallback.model")
SHARD = os.path.join("fineweb_sample", "fineweb_sample200_sp1024_000000.bin")
GOLDEN = os.path.join("fineweb_sample", "fineweb_sample200_sp1024.golden.json")


def _tokens(shared_data):
    try:
        from train.data import read_shard
    except ImportError:  # the train driver's reader; fall back to the documented format
        read_shard = None
    path = os.path.join(shared_data, SHARD)
    if read_shard is not None:
        return torch.as_tensor(np.asarray(read_shard(path)).astype(np.int64))
    hdr = np.fromfile(path, dtype="<i4", count=256)
    assert hdr[0] == 20240520 and hdr[1] == 1
    toks = np.fromfile(path, dtype="<u2", offset=1024)
    assert toks.size == hdr[2]
    return torch.from_numpy(toks.astype(np.int64))


def test_golden_byte_count(shared_data):
    golden = json.load(open(os.path.join(shared_data, GOLDEN)))
    toks = _tokens(shared_data)
    assert toks.numel() == golden["n_tokens_incl_bos"]
    lut = ByteLUT.from_sentencepiece(os.path.join(shared_data, SP1024))
    assert lut.stream_bytes(toks) == 1_489_418 == golden["lut_bytes_over_targets"]
    # the same through target_bytes, and the leading-space count of the golden file
    b = lut.target_bytes(toks[:-1], toks[1:])
    assert int(b.sum()) == 1_489_418
    assert int(lut.leading_space[toks[1:]].sum()) == golden["n_targets_with_leading_space"]
    assert int((lut.base_bytes[toks[1:]] == 1).logical_and(toks[1:] < 260).logical_and(toks[1:] >= 4).sum()) == golden[
        "n_byte_fallback_tokens"
    ]


def test_lut_equals_decoded_bytes_per_document(shared_data):
    """Independent check: per document, LUT bytes over its targets == UTF-8 length of decode(ids)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=os.path.join(shared_data, SP1024))
    lut = ByteLUT.from_sentencepiece(sp)
    toks = _tokens(shared_data)
    bos = (toks == 1).nonzero().flatten().tolist() + [toks.numel()]
    # whole stream: every doc starts with BOS, so a doc's targets are its own tokens after BOS
    # (plus the next doc's BOS, 0 bytes)
    for s, e in zip(bos[:-1][:60], bos[1:][:60]):
        doc = toks[s:e]
        want = len(sp.decode(doc[1:].tolist()).encode("utf-8"))
        assert lut.stream_bytes(doc) == want


def test_byte_rules_on_constructed_ids(shared_data):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=os.path.join(shared_data, SP1024))
    lut = ByteLUT.from_sentencepiece(sp, vocab_size=1100)
    assert lut.vocab_size == 1100
    for i in (0, 1, 2, 3, 1050):  # pad, BOS, EOS, UNK, padding id past the tokenizer
        assert lut.base_bytes[i] == 0 and bool(lut.boundary[i])
    for i in (4, 100, 259):  # byte fallback pieces: 1 byte, no space
        assert lut.base_bytes[i] == 1 and not bool(lut.leading_space[i])
    sp_id = next(i for i in range(260, 1024) if sp.id_to_piece(i).startswith("\u2581") and len(sp.id_to_piece(i)) > 2)
    n = len(sp.id_to_piece(sp_id)[1:].encode())
    word = next(i for i in range(260, 1024) if not sp.id_to_piece(i).startswith("\u2581"))
    prev = torch.tensor([1, word, 4])
    tgt = torch.tensor([sp_id] * 3)
    # after BOS the leading space is dropped; after a normal piece or a byte piece it counts
    assert lut.target_bytes(prev, tgt).tolist() == [n, n + 1, n + 1]


def test_refuses_tokenizer_without_byte_fallback(shared_data):
    path = os.path.join(shared_data, NOBF)
    with pytest.raises(TokenizerError, match="byte-fallback"):
        ByteLUT.from_sentencepiece(path)
    with pytest.raises(TokenizerError, match="vocabulary"):
        ByteLUT.from_sentencepiece(os.path.join(shared_data, SP1024), vocab_size=512)
    with pytest.raises(FileNotFoundError):
        ByteLUT.from_sentencepiece(os.path.join(shared_data, "nope.model"))


def test_no_byte_fallback_undercounts(shared_data):
    """Why the refusal matters: the same 200 docs, tokenized by the non-official model, count fewer bytes."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=os.path.join(shared_data, NOBF))
    lut = ByteLUT.from_sentencepiece(sp, require_byte_fallback=False)
    total = 0
    with open(os.path.join(shared_data, "fineweb_sample", "verify_docs.jsonl")) as f:
        for line in f:
            ids = [1] + sp.encode(json.loads(line)["text"])
            total += lut.stream_bytes(torch.tensor(ids))
    assert total == 1_475_292 < 1_489_418


def test_accumulator_float64_and_mask():
    acc = BPBAccumulator()
    nll = torch.full((4, 1000), 1e-4, dtype=torch.float32)
    nb = torch.ones(4, 1000, dtype=torch.int32)
    mask = torch.zeros(4, 1000, dtype=torch.bool)
    mask[:, :500] = True
    for _ in range(2000):  # 4e6 tiny adds: fp32 would drift, fp64 must not
        acc.add(nll, nb, mask)
    assert acc.n_targets == 4_000_000
    assert acc.byte_sum == 4_000_000.0
    want = 4_000_000 * float(torch.tensor(1e-4, dtype=torch.float32))
    assert abs(acc.loss_sum - want) / want < 1e-10
    assert math.isclose(acc.bpb, acc.loss_sum / LN2 / acc.byte_sum)
    other = BPBAccumulator()
    other.add(torch.tensor([2.0]), torch.tensor([3]))
    acc.merge(other)
    assert acc.n_targets == 4_000_001
