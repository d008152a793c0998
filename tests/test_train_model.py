"""train/model.py: shapes, attention math against an fp64 reference, causality, the adapter hook."""
import math

import pytest
import torch
import torch.nn.functional as F

from train.model import GPT, GPTConfig, apply_rotary, rms_norm

TINY = dict(vocab_size=96, num_layers=3, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=3, seq_len=24)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    m = GPT(GPTConfig(**{**TINY, **kw}))
    # the init zeroes the output projections (every block = identity); give them weights so tests see the blocks
    with torch.no_grad():
        for b in m.blocks:
            b.attn.proj.weight.normal_(0, 0.2)
            b.mlp.proj.weight.normal_(0, 0.2)
        m.skip_weights.uniform_(0.5, 1.5)
    return m


def test_config_roundtrip_and_validation():
    c = GPTConfig()
    assert (c.vocab_size, c.num_layers, c.model_dim, c.num_heads, c.num_kv_heads, c.mlp_mult, c.seq_len) == \
        (1024, 11, 512, 8, 4, 3, 2048)
    assert c.tie_embeddings and c.logit_softcap == 30.0
    assert GPTConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown keys"):
        GPTConfig.from_dict({**c.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(model_dim=100, num_heads=8)
    with pytest.raises(ValueError, match="multiple"):
        GPTConfig(num_heads=8, num_kv_heads=3)


def test_default_model_size_and_param_groups():
    m = GPT(GPTConfig())
    # 11 x (512*512*2 + 256*512*2 + 1536*512*2) matrices + 1024*512 tied embedding + vectors
    mats = sum(p.numel() for _, p in m.matrix_params())
    assert mats == 11 * (2 * 512 * 512 + 2 * 256 * 512 + 2 * 1536 * 512)
    assert [n for n, _ in m.embedding_params()] == ["tok_emb.weight"]
    names = {n for n, _ in m.matrix_params()} | {n for n, _ in m.embedding_params()} | {n for n, _ in m.scalar_params()}
    assert names == {n for n, _ in m.named_parameters()}  # every parameter in exactly one optimizer group
    assert "blocks.0.resid_mix" in {n for n, _ in m.scalar_params()}  # 2-D control tensor, not a Muon matrix
    assert m.num_encoder_layers == 5 and m.num_decoder_layers == 6 and m.skip_weights.shape == (5, 512)


def test_shapes_and_nll_matches_logits():
    m = _model()
    x = torch.randint(0, 96, (2, 24))
    y = torch.randint(0, 96, (2, 24))
    logits = m(x)
    assert logits.shape == (2, 24, 96) and logits.dtype == torch.float32
    assert logits.abs().max() <= 30.0  # soft-capped
    nll = m(x, y)
    assert nll.shape == (2, 24) and nll.dtype == torch.float32
    ref = -torch.log_softmax(logits.double(), -1).gather(-1, y[..., None]).squeeze(-1)
    torch.testing.assert_close(nll.double(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="input_ids"):
        m(x.float())
    with pytest.raises(ValueError, match="target_ids"):
        m(x, y[:, :5])


def _attention_fp64(attn, h):
    """Explicit softmax attention in float64 with K/V heads repeated (GQA), as a reference."""
    B, T, _ = h.shape
    H, Hk, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    hd = h.double()
    q = (hd @ attn.c_q.weight.double().T).view(B, T, H, D).transpose(1, 2)
    k = (hd @ attn.c_k.weight.double().T).view(B, T, Hk, D).transpose(1, 2)
    v = (hd @ attn.c_v.weight.double().T).view(B, T, Hk, D).transpose(1, 2)
    q = q / q.pow(2).mean(-1, keepdim=True).add(torch.finfo(torch.float32).eps).sqrt() * attn.q_gain.double()[None, :, None, None]
    k = k / k.pow(2).mean(-1, keepdim=True).add(torch.finfo(torch.float32).eps).sqrt()
    pos = torch.arange(T, dtype=torch.float64)
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    ang = torch.outer(pos, inv)
    cos, sin = ang.cos(), ang.sin()

    def rot(t):
        t1, t2 = t[..., : D // 2], t[..., D // 2:]
        return torch.cat((t1 * cos + t2 * sin, t2 * cos - t1 * sin), -1)

    q, k = rot(q), rot(k)
    k = k.repeat_interleave(H // Hk, dim=1)
    v = v.repeat_interleave(H // Hk, dim=1)
    s = q @ k.transpose(-1, -2) / math.sqrt(D)
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * D)
    return y @ attn.proj.weight.double().T


def test_attention_matches_fp64_reference():
    m = _model()
    attn = m.blocks[1].attn
    h = rms_norm(torch.randn(2, 24, 32))
    out = attn(h)
    ref = _attention_fp64(attn, h)
    # fp32 SDPA vs fp64 math: error of fp32 rounding (~1e-6 relative), far below 1e-4
    err = (out.double() - ref).norm() / ref.norm()
    assert err < 1e-4, float(err)


def test_causal():
    m = _model()
    x = torch.randint(0, 96, (1, 24))
    x2 = x.clone()
    x2[0, 15:] = (x2[0, 15:] + 7) % 96
    a, b = m(x), m(x2)
    torch.testing.assert_close(a[:, :15], b[:, :15], rtol=0, atol=1e-5)
    assert not torch.allclose(a[:, 15:], b[:, 15:])


def test_rotary_is_a_rotation():
    x = torch.randn(2, 3, 5, 8)
    ang = torch.rand(5, 4) * 6
    y = apply_rotary(x, ang.cos()[None, None], ang.sin()[None, None])
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))


class _Adapter:
    """Base projections + a fixed low-rank delta on q and v, and a head with a bias on token 5."""

    def __init__(self, d, scale):
        g = torch.Generator().manual_seed(1)
        self.A = torch.randn(2, d, generator=g)
        self.scale = scale
        self.calls = []

    def qkv(self, i, h, attn):
        self.calls.append(i)
        q, k, v = attn.c_q(h), attn.c_k(h), attn.c_v(h)
        if self.scale:
            d = (h @ self.A.T).sum(-1, keepdim=True) * self.scale
            q = q + d
            v = v + d[..., : v.size(-1)]
        return q, k, v

    def head(self, h, model):
        raw = F.linear(h, model.tok_emb.weight)
        if self.scale:
            raw = raw.clone()
            raw[..., 5] += self.scale
        return raw


def test_adapter_hook_identity_and_effect():
    m = _model()
    x = torch.randint(0, 96, (2, 24))
    y = torch.randint(0, 96, (2, 24))
    ident = _Adapter(32, 0.0)
    torch.testing.assert_close(m(x, y, adapter=ident), m(x, y), rtol=0, atol=0)
    assert ident.calls == [0, 1, 2]  # called once per block, with the block index
    eff = _Adapter(32, 0.5)
    out = m(x, adapter=eff)
    assert not torch.allclose(out, m(x))
    assert out.abs().max() <= 30.0  # the model applies the soft-cap after adapter.head


def test_tiny_model_loss_falls_with_adam():
    m = _model(seed=3)
    x = torch.randint(0, 96, (4, 24))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    first = None
    for _ in range(25):
        loss = m(x, torch.roll(x, -1, 1)).mean()
        first = first if first is not None else float(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < first - 1.0, (first, float(loss))


def test_untied_head():
    m = GPT(GPTConfig(**{**TINY, "tie_embeddings": False}))
    assert [n for n, _ in m.embedding_params()] == ["tok_emb.weight", "lm_head.weight"]
    assert torch.count_nonzero(m(torch.randint(0, 96, (1, 8)))) == 0  # zero-init head -> zero logits


@pytest.mark.gpu
def test_gpu_bf16_compiled_forward_backward():
    torch.manual_seed(0)
    m = GPT(GPTConfig(num_layers=4, seq_len=256)).cuda()
    x = torch.randint(0, 1024, (4, 256), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = m(x, x).float()
    cm = torch.compile(m, fullgraph=True, dynamic=False)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = cm(x, x)
    out.mean().backward()
    assert torch.isfinite(out).all()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
    # compiled vs eager in bf16: both round the same math; mean NLL agrees to bf16 precision (~1e-2 nats)
    assert abs(float(out.mean()) - float(ref.mean())) < 2e-2


def test_rope_tables_made_once_per_forward(monkeypatch):
    """GPT.hidden makes the RoPE tables once and hands them to every block: the same hidden state, bit for bit,
    as blocks that make their own (rope=None), with one Rotary call per forward instead of one per block."""
    from train.model import Rotary

    m = _model(seed=4)
    x = torch.randint(0, TINY["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(5))
    calls = []
    orig = Rotary.forward
    monkeypatch.setattr(Rotary, "forward", lambda self, *a: calls.append(a) or orig(self, *a))
    h = m.hidden(x)
    assert len(calls) == 1
    calls.clear()
    y = z = rms_norm(m.tok_emb(x))
    skips = []
    for i, b in enumerate(m.blocks):
        if i >= m.num_encoder_layers and skips:
            y = torch.addcmul(y, m.skip_weights[i - m.num_encoder_layers], skips.pop())  # as GPT.hidden adds it
        y = b(y, z)
        if i < m.num_encoder_layers:
            skips.append(y)
    assert len(calls) == TINY["num_layers"]
    assert torch.equal(h, rms_norm(y))
