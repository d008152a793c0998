"""Artifact quantization on the GPU (csrc/cuda/quantize.cu) vs the C++ codec on the host's cores.

    python3 -m bench.bench_quant [--out DIR] [--quick]     # or: python3 -m bench --only quant

The default model (train/config + train/model: 11 layers, d=512, 26.5 M parameters) with N(0, 0.02) block
matrices, as tests/test_train_artifact.py builds it. Rows:
  * ``quantize <N>x<K> x<count>``: every state-dict matrix of that shape, clip search (int6 blocks, int8
    embedding); ours = the CUDA kernel (triton do_bench, CUDA events, incl. the per-call refused-row check),
    baseline = the C++ codec (wall time, median of 3, torch's CPU threads). ``bit_exact``: codes and fp16
    scales identical.
  * ``quantize all matrices``: the same over the whole model.
  * ``artifact write zstd-<L>``: ``train.artifact.save_artifact`` from GPU weights (ours) and from CPU weights
    (baseline), with its split (quantize, coarsen, zstd fit packs, final pack) for both; the two files must be
    byte-identical (``same_bytes``). ``--quick``: zstd-3 instead of the driver's zstd-22.
Writes ``<out>/quant-<gpu>.json`` and ``.md`` (device, torch, triton, date) via ``bench.harness``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict

import torch

KERNEL = "quant"


def default_model(device: str):
    from train.model import GPT, GPTConfig

    torch.manual_seed(0)
    m = GPT(GPTConfig())
    with torch.no_grad():
        for _, p in m.matrix_params():
            p.normal_(0, 0.02)
    return m.to(device)


def _cpu_ms(fn, reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _same(a, b) -> bool:
    return torch.equal(a.q.cpu(), b.q.cpu()) and torch.equal(a.scale.cpu().view(torch.int16), b.scale.cpu().view(torch.int16))


def quantize_rows_bench(model) -> list:
    from bench.harness import bench_ms, make_row
    from pgolf_kernels.quant import quantize_rows
    from train.artifact import EMBED_BITS, MATRIX_BITS, embedding_names, matrix_names

    mats, embs = set(matrix_names(model)), set(embedding_names(model))
    groups = defaultdict(list)  # (shape, bits) -> [(cpu fp32, gpu fp32)]
    for name, t in model.state_dict().items():
        if name in mats or name in embs:
            w = t.detach().float().contiguous()
            groups[(tuple(w.shape), MATRIX_BITS if name in mats else EMBED_BITS)].append((w.cpu(), w.cuda()))
    rows, tot_c, tot_g, all_exact, n_all = [], 0.0, 0.0, True, 0
    for (shape, bits), ws in sorted(groups.items()):
        exact = all(_same(quantize_rows(c, bits, backend="cpu"), quantize_rows(g, bits)) for c, g in ws)
        t_cpu = _cpu_ms(lambda: [quantize_rows(c, bits, backend="cpu") for c, _ in ws])
        t_gpu = bench_ms(lambda: [quantize_rows(g, bits) for _, g in ws], warmup=3, rep=50)
        n = sum(c.numel() for c, _ in ws)
        rows.append(make_row(KERNEL, f"quantize {shape[0]}x{shape[1]} x{len(ws)} int{bits} search", t_gpu,
                             f"C++ codec ({torch.get_num_threads()} threads)", t_cpu, params=n, bit_exact=exact))
        tot_c, tot_g, all_exact, n_all = tot_c + t_cpu, tot_g + t_gpu, all_exact and exact, n_all + n
        print(rows[-1], flush=True)
    rows.append(make_row(KERNEL, f"quantize all matrices ({n_all / 1e6:.1f} M params)", tot_g,
                         f"C++ codec ({torch.get_num_threads()} threads)", tot_c, params=n_all, bit_exact=all_exact))
    return rows


def artifact_bench(model_cpu, level: int) -> list:
    from bench.harness import make_row
    from train.artifact import save_artifact

    out, blobs = {}, {}
    with tempfile.TemporaryDirectory() as d:
        for dev in ("cuda", "cpu"):
            m = model_cpu.to(dev)
            path = os.path.join(d, f"{dev}.ptz")
            if dev == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            info = save_artifact(m, path, level=level, warn=False)
            out[dev] = (time.perf_counter() - t0, info)
            with open(path, "rb") as f:
                blobs[dev] = f.read()
            print(dev, f"{out[dev][0]:.1f} s", info, flush=True)
    (tg, ig), (tc, ic) = out["cuda"], out["cpu"]
    split = {f"{dev}_{k}_s": v for dev, (_, i) in out.items() for k, v in i["seconds"].items()}
    return [make_row(KERNEL, f"artifact write zstd-{level} (default model, fit to 16,000,000 B)", tg * 1e3,
                     "weights on the CPU (C++ codec)", tc * 1e3, same_bytes=blobs["cuda"] == blobs["cpu"],
                     step_mult=ig["step_mult"], bytes_total=ig["bytes_total"], packs=str(ig["packs"]),
                     quantize_on=ig["quantize"], **split)]


NOTES = """The CUDA quantizer is bit-exact with the C++ codec (``bit_exact``, ``same_bytes``). In the artifact write it
removes the clip search's CPU time and the re-gridding of each fit step (coarsen, torch ops on the weights' device);
the zstd packs (``*_pack_fit_s``: the zstd-3 bisection, ``*_pack_s``: the final zstd-22) stay on the CPU and are most
of the write."""


def run(quick: bool = False) -> list:
    if not torch.cuda.is_available():
        raise RuntimeError("bench_quant times the CUDA quantizer and needs a CUDA GPU")
    from pgolf_kernels.quant import cuda_quantizer_status

    ok, why = cuda_quantizer_status()
    if not ok:
        raise RuntimeError(f"bench_quant: {why}")
    model = default_model("cpu")
    return quantize_rows_bench(model) + artifact_bench(model, 3 if quick else 22)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.bench_quant", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="results folder (default bench/results)")
    ap.add_argument("--quick", action="store_true", help="artifact write with zstd-3 instead of zstd-22")
    args = ap.parse_args(argv)
    from bench.harness import markdown_table, save_results

    rows = run(quick=args.quick)
    path = save_results(KERNEL, rows, results_dir=args.out, notes=NOTES)
    print(markdown_table(rows))
    print(f"-> {path}")
    return 0 if all(r.get("bit_exact", True) and r.get("same_bytes", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
