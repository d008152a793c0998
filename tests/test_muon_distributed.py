"""Muon under torch.distributed: each rank orthogonalizes its share, results are all-gathered; the update
must equal the single-process update bitwise.

CPU lane: 2 gloo processes on the reference NS path (proves the sharding / padding / all-gather logic).
GPU lane: 2 NCCL processes on 2 GPUs on the kernel path (skipped with fewer than 2 GPUs).
"""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# 5 slices of 16x24 in a bank + two more 16x24 matrices -> 7 in one shape group (odd: rank 1 gets a pad);
# a tall bank and a single matrix of its own shape; one shape with a single matrix (rank 1 gets nothing)
SHAPES = [(5, 16, 24), (16, 24), (2, 40, 24), (40, 24), (16, 24), (12, 20)]


def _run(ps, device, use_kernel, steps=2):
    from pgolf_kernels.muon import Muon

    opt = Muon(ps, lr=0.05, weight_decay=0.1, use_kernel=use_kernel)
    g = torch.Generator().manual_seed(1234)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(device)
        opt.step()
    return [p.detach().cpu() for p in ps]


def _make_params(device):
    g = torch.Generator().manual_seed(99)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in SHAPES]


def _worker(rank, world, init_file, backend, out_dir, use_kernel):
    if backend == "nccl":
        torch.cuda.set_device(rank)
    device = f"cuda:{rank}" if backend == "nccl" else "cpu"
    # single-process update first (dist not initialized yet -> the local path)
    single = _run(_make_params(device), device, use_kernel)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        distributed = _run(_make_params(device), device, use_kernel)
    finally:
        dist.destroy_process_group()
    torch.save({"single": single, "dist": distributed}, os.path.join(out_dir, f"rank{rank}.pt"))


def _spawn_and_check(backend, use_kernel):
    with tempfile.TemporaryDirectory() as d:
        init_file = os.path.join(d, "init")
        mp.start_processes(_worker, args=(2, init_file, backend, d, use_kernel), nprocs=2,
                           start_method="forkserver")
        res = [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(2)]
    for r in range(2):
        for i, (s, t) in enumerate(zip(res[r]["single"], res[r]["dist"])):
            assert torch.equal(s, t), f"rank {r} param {i} {tuple(s.shape)}: distributed update != single-process"
            assert torch.equal(t, res[0]["dist"][i]), f"ranks disagree on param {i}"
    # the params moved (a no-op optimizer would pass the equalities above)
    p0 = _make_params("cpu")
    assert all(not torch.equal(a.detach(), b) for a, b in zip(p0, res[0]["dist"]))


def test_two_process_gloo_reference_path_equals_single_process():
    _spawn_and_check("gloo", use_kernel=False)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for the NCCL 2-process run")
def test_two_process_nccl_kernel_path_equals_single_process():
    _spawn_and_check("nccl", use_kernel=True)
