"""pgolf_kernels.adam_rows: one fused Adam / AdamW pass over stacked adapter rows, against its torch reference
(the ops ``train.ttt_optim.BatchedAdam`` runs) and an fp64 oracle; every dispatch path (the kernel under the
interpreter on the CPU lane, on the GPU at the records' row shapes), per-row and shared step sizes, awkward sizes,
bad arguments refused by name, torch.compile and CUDA-graph capture."""
from __future__ import annotations

import pytest
import torch

from pgolf_kernels.adam_rows import adam_rows_step_, adam_rows_step_ref_
from train.ttt_optim import BatchedAdam


def _state(shape, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    p, gr, m = (torch.randn(shape, generator=g) for _ in range(3))
    v = torch.rand(shape, generator=g)
    return [t.to(device) for t in (p, gr, m, v)]


def _vectors(rows, t, b1, b2, lr, device="cpu"):
    t = torch.as_tensor(t, dtype=torch.float64, device=device).expand(rows).clone()
    return (-lr / (1 - b1 ** t)).float(), (1 - b2 ** t).sqrt().float()


def _oracle(p, g, m, v, step, rbc2, b1, b2, eps, keep):
    """The update in fp64, from the fp32 inputs."""
    p, g, m, v = (x.double() for x in (p, g, m, v))
    shape = (-1,) + (1,) * (p.dim() - 1)
    p = p * keep
    m = m + (1 - b1) * (g - m)
    v = v * b2 + (1 - b2) * g * g
    p = p + m * step.double().view(shape) / (v.sqrt() / rbc2.double().view(shape) + eps)
    return p, m, v


@pytest.mark.parametrize("shape", [(4, 96, 512), (3, 7, 5), (1, 33), (64, 3), (5,)])
@pytest.mark.parametrize("b1,keep", [(0.0, 1.0 - 1e-4), (0.9, 1.0), (0.6, 0.999)])
@pytest.mark.parametrize("per_row", [True, False])
def test_adam_rows_equals_torch_ops_and_fp64(shape, b1, keep, per_row):
    rows = shape[0]
    b2, eps, lr = 0.999, 1e-10, 1e-2
    ours = _state(shape, seed=sum(shape))
    ref = [t.clone() for t in ours]
    step, rbc2 = _vectors(rows if per_row else 1, [3.0 + i for i in range(rows)] if per_row else 2.0, b1, b2, lr)
    want = _oracle(*ref, step, rbc2, b1, b2, eps, keep)
    adam_rows_step_(ours[0], ours[1], ours[2], ours[3], step, rbc2, b1=b1, b2=b2, eps=eps, keep=keep)
    adam_rows_step_ref_(ref[0], ref[1], ref[2], ref[3], step, rbc2, b1, b2, eps, keep)
    for got, r, w in zip((ours[0], ours[2], ours[3]), (ref[0], ref[2], ref[3]), want):
        # the torch ops' own fp32 distance to the fp64 update bounds ours (both round the same ops)
        bound = (r.double() - w).abs().max().item()
        assert (got.double() - w).abs().max().item() <= 2 * bound + 1e-7, ((got.double() - w).abs().max(), bound)
        torch.testing.assert_close(got, r, rtol=1e-5, atol=1e-6)  # a few fp32 ulps: the ops are fused
    assert torch.equal(ours[1], ref[1])  # the gradient is read only


@pytest.mark.parametrize("shape", [(4, 96, 512), (3, 7, 5), (5,)])
@pytest.mark.parametrize("per_row", [True, False])
def test_adam_rows_without_first_moment_equals_the_stored_one_at_b1_0(shape, per_row):
    """b1 = 0 with m=None (no first moment read or written) gives p and v bit for bit as with a stored m, which the
    lerp overwrites with g; the kernel (interpreter here, the GPU in the GPU lane) and the reference alike."""
    rows = shape[0]
    b1, b2, eps, keep = 0.0, 0.999, 1e-10, 1.0 - 1e-4
    step, rbc2 = _vectors(rows if per_row else 1, [1.0 + i for i in range(rows)] if per_row else 4.0, b1, b2, 1e-3)
    for fn in (adam_rows_step_, lambda *a, **k: adam_rows_step_ref_(*a, k["b1"], k["b2"], k["eps"], k["keep"])):
        with_m = _state(shape, seed=11 + rows)
        without = [t.clone() for t in with_m]
        fn(*with_m, step, rbc2, b1=b1, b2=b2, eps=eps, keep=keep)
        fn(without[0], without[1], None, without[3], step, rbc2, b1=b1, b2=b2, eps=eps, keep=keep)
        assert torch.equal(with_m[2], with_m[1])          # the stored m became g
        assert torch.equal(without[0], with_m[0]) and torch.equal(without[3], with_m[3])
        assert not torch.equal(without[0], _state(shape, seed=11 + rows)[0])  # the step did move p


def test_batched_adam_fused_keeps_no_first_moment_at_b1_0():
    """fused with b1 = 0 allocates no m (1.28 GB at the records' recipe); b1 > 0 or the torch ops keep it."""
    p = [torch.zeros(2, 3)]
    assert BatchedAdam(p, 1e-2, (0.0, 0.999), fused=True).m == []
    assert len(BatchedAdam(p, 1e-2, (0.5, 0.999), fused=True).m) == 1
    assert len(BatchedAdam(p, 1e-2, (0.0, 0.999)).m) == 1
    opt = BatchedAdam(p, 1e-2, (0.0, 0.999), per_row=True, fused=True)
    opt.reset()
    opt.reset_rows([1])
    p[0].grad = torch.ones(2, 3)
    opt.step()
    assert opt.t == 1 and p[0].grad is None and bool((p[0] != 0).all())


@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("wd", [0.0, 1.0])
def test_batched_adam_fused_steps_as_the_torch_ops(per_row, wd):
    """BatchedAdam(fused=True) over several steps and a row reset: the same parameters as the torch ops."""
    g = torch.Generator().manual_seed(1)
    ps = [torch.randn(4, 6, 8, generator=g), torch.randn(4, 3, generator=g)]
    qs = [p.clone() for p in ps]
    a = BatchedAdam(ps, 1e-2, (0.0, 0.999), 1e-10, per_row=per_row, weight_decay=wd, fused=True)
    b = BatchedAdam(qs, 1e-2, (0.0, 0.999), 1e-10, per_row=per_row, weight_decay=wd)
    for step in range(5):
        for x, y in zip(ps, qs):
            gr = torch.randn(x.shape, generator=g)
            x.grad, y.grad = gr.clone(), gr.clone()
        a.step()
        b.step()
        if per_row and step == 2:
            a.reset_rows([1])
            b.reset_rows([1])
        for x, y in zip(ps, qs):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
            assert x.grad is None
    if per_row:
        assert torch.equal(a.row_t, b.row_t)


def test_adam_rows_refuses_bad_arguments_by_name():
    p, g, m, v = _state((3, 4), seed=0)
    step, rbc2 = _vectors(3, 1.0, 0.9, 0.999, 1e-2)
    ok = dict(b1=0.9, b2=0.999, eps=1e-8)
    cases = [
        ((p.double(), g, m, v, step, rbc2), ok, TypeError, "p must have dtype float32"),
        ((p, g[:2], m, v, step, rbc2), ok, ValueError, r"g must have p's shape \(3, 4\)"),
        ((p, g, m.t(), v, step, rbc2), ok, ValueError, "m must be contiguous"),
        ((p, g, m, v, step[:2], rbc2), ok, ValueError, "step must hold one value per row of p"),
        ((p, g, m, v, step, rbc2.half()), ok, TypeError, "rbc2 must have dtype float32"),
        ((p, g, m, v, step, rbc2[:1]), ok, ValueError, "step and rbc2 must have one length"),
        ((p, g, m, v, step, rbc2), dict(ok, b1=1.0), ValueError, "b1 must be a float in"),
        ((p, g, m, v, step, rbc2), dict(ok, b2=-0.1), ValueError, "b2 must be a float in"),
        ((p, g, m, v, step, rbc2), dict(ok, eps=0.0), ValueError, "eps must be a float > 0"),
        ((p, g, m, v, step, rbc2), dict(ok, keep=0.0), ValueError, r"keep \(1 - lr \* weight_decay\)"),
        ((p, g, None, v, step, rbc2), ok, ValueError, r"m may be None only with b1 = 0 \(then m = g\), got b1 = 0.9"),
        ((p, g, None, v.double(), step, rbc2), dict(ok, b1=0.0), TypeError, "v must have dtype float32"),
    ]
    for args, kw, exc, match in cases:
        with pytest.raises(exc, match=match):
            adam_rows_step_(*args, **kw)
    with pytest.raises(ValueError, match="expected fp32 parameters"):
        BatchedAdam([torch.zeros(2, 3, dtype=torch.float64)], 1e-2, fused=True)
    with pytest.raises(ValueError, match="expected contiguous parameters"):
        BatchedAdam([torch.zeros(3, 2).t()], 1e-2, fused=True)


def test_batched_adam_fused_checks_its_state_once_and_gradients_every_step():
    """BatchedAdam(fused=True) checks its hyperparameters through the op's own checks when built, and every step's
    gradients' layout before any state moves (torch's .grad assignment refuses another dtype, shape or device), then
    calls the op with validate=False: a non-contiguous gradient is refused on any step and leaves the step counts as
    they were; validate=False computes what validate=True does."""
    with pytest.raises(ValueError, match="b2 must be a float in"):
        BatchedAdam([torch.zeros(2, 3)], 1e-2, (0.0, 1.0), fused=True)
    g = torch.Generator().manual_seed(3)
    p = torch.randn(3, 4, generator=g)
    opt = BatchedAdam([p], 1e-2, (0.0, 0.999), 1e-10, per_row=True, weight_decay=1.0, fused=True)
    for step in range(2):
        p.grad = torch.randn(4, 3, generator=g).t()  # (3, 4), not contiguous
        with pytest.raises(ValueError, match=r"a gradient must be contiguous; got strides \(1, 3\)"):
            opt.step()
        assert opt.t == step and torch.equal(opt.row_t, torch.full((3,), float(step), dtype=torch.float64))
        p.grad = torch.randn(3, 4, generator=g)
        opt.step()
    ours = _state((3, 4), seed=4)
    ref = [t.clone() for t in ours]
    step, rbc2 = _vectors(3, [1.0, 2.0, 3.0], 0.0, 0.999, 1e-2)
    adam_rows_step_(*ours, step, rbc2, b1=0.0, b2=0.999, eps=1e-10, keep=0.99, validate=False)
    adam_rows_step_(*ref, step, rbc2, b1=0.0, b2=0.999, eps=1e-10, keep=0.99)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


def test_adam_rows_under_torch_compile_fullgraph():
    """The op is a custom op with a fake: a compiled optimizer step traces it whole."""
    ours = _state((3, 5), seed=2)
    ref = [t.clone() for t in ours]
    step, rbc2 = _vectors(3, [1.0, 2.0, 5.0], 0.9, 0.999, 1e-3)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(p, g, m, v, step, rbc2):
        adam_rows_step_(p, g, m, v, step, rbc2, b1=0.9, b2=0.999, eps=1e-8, keep=0.99)

    f(*ours, step, rbc2)
    adam_rows_step_ref_(*ref, step, rbc2, 0.9, 0.999, 1e-8, 0.99)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(64, 96, 512), (64, 1024, 96), (2, 7, 33)])
def test_gpu_adam_rows_equals_torch_ops_and_replays_in_a_graph(shape):
    """At the records' adapter shapes on the GPU: the kernel against the torch ops and the fp64 oracle, then the
    same step captured in a CUDA graph and replayed equals the eager kernel."""
    rows = shape[0]
    b1, b2, eps, keep = 0.0, 0.999, 1e-10, 1.0 - 1e-4
    ours = _state(shape, seed=7, device="cuda")
    ref = [t.clone() for t in ours]
    step, rbc2 = _vectors(rows, [1.0 + i % 5 for i in range(rows)], b1, b2, 1e-4, device="cuda")
    want = _oracle(*ref, step, rbc2, b1, b2, eps, keep)
    adam_rows_step_(*ours, step, rbc2, b1=b1, b2=b2, eps=eps, keep=keep)
    adam_rows_step_ref_(*ref, step, rbc2, b1, b2, eps, keep)
    for got, r, w in zip((ours[0], ours[2], ours[3]), (ref[0], ref[2], ref[3]), want):
        bound = (r.double() - w).abs().max().item()
        assert (got.double() - w).abs().max().item() <= 2 * bound + 1e-7
        torch.testing.assert_close(got, r, rtol=1e-5, atol=1e-6)  # a few fp32 ulps: the ops are fused
    eager = [t.clone() for t in ours]
    graphed = [t.clone() for t in ours]
    adam_rows_step_(*graphed, step, rbc2, b1=b1, b2=b2, eps=eps, keep=keep)  # warm
    graphed = [t.clone() for t in ours]
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        adam_rows_step_(*graphed, step, rbc2, b1=b1, b2=b2, eps=eps, keep=keep)
    for t, src in zip(graphed, ours):
        t.copy_(src)
    gr.replay()
    adam_rows_step_(*eager, step, rbc2, b1=b1, b2=b2, eps=eps, keep=keep)
    torch.cuda.synchronize()
    for a, b in zip(graphed, eager):
        assert torch.equal(a, b)
    # b1 = 0 without a stored first moment (what BatchedAdam(fused=True) runs): p and v bit for bit
    no_m = [t.clone() for t in ours]
    adam_rows_step_(no_m[0], no_m[1], None, no_m[3], step, rbc2, b1=b1, b2=b2, eps=eps, keep=keep)
    assert torch.equal(no_m[0], eager[0]) and torch.equal(no_m[3], eager[3])
