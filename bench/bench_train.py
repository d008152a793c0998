"""Training-driver benchmark: ms/step and tokens/s per GPU, kernels vs ``--reference``, + loss parity.

One process, one GPU, the default model (11L d512 8/4 heads MLP3x, vocab 1024, seq 2048) at
48 x 2048 = 98,304 tokens per GPU per step (the records' per-GPU batch on 8 GPUs), on the offline
fixture (stdlib docstrings + module sources, sp-BPE 1024 trained on them), torch.compile on.

Runs (each: 10 compile/warm-up steps excluded, then a fixed number of optimizer steps with the LR
warm-down over them, then val of raw/EMA weights):
  1. speed: kernels (pgolf_kernels Muon, Triton NS) vs ``--reference`` (the same Muon, torch reference
     NS), 100 timed steps each at 48 x 2048 tokens;
  2. parity: 500 steps at 12 x 2048 tokens (a quarter of the batch, so all of this fits one ~7-minute
     device call), kernels (+ the int6 artifact: bytes, before/after-quant val) vs ``--reference`` with
     the same seed, and ``--reference`` with another seed = the seed-to-seed noise;
  3. speed vs ``MUON_IMPL=torch-banked`` (plain torch NS batched per shape bank).
Later runs are skipped when the time budget (``PGOLF_TRAIN_BENCH_BUDGET_S``, default 300 s) would be
exceeded. Logs + summaries of every run (and rows so far) go to ``$PGOLF_TRAIN_BENCH_LOGS`` when set.
"""
from __future__ import annotations

import gc
import json
import os
import shutil
import time
import traceback

import torch

KERNEL = "train"
STEPS = int(os.environ.get("PGOLF_TRAIN_BENCH_STEPS", "500"))


def _run(args, tag, runs_dir, logs_dir):
    from train.train_gpt import main

    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    argv = args + ["--run-id", tag, "--runs-dir", runs_dir]
    try:
        s = main(argv)
    except Exception:
        traceback.print_exc()
        print(f"[bench_train] run {tag} failed with torch.compile; retrying eager (--compile 0)", flush=True)
        torch._dynamo.reset()
        s = main(argv + ["--compile", "0"])
        s["compile_failed"] = True
    if logs_dir:
        os.makedirs(logs_dir, exist_ok=True)
        for f in ("train.log", "summary.json"):
            p = os.path.join(runs_dir, tag, f)
            if os.path.isfile(p):
                shutil.copy(p, os.path.join(logs_dir, f"{tag}-{f}"))
    return s


def _val(s, key="val_prequant"):
    r = s.get(key) or {}
    return r.get("val_loss"), r.get("val_bpb")


def _args(steps, batch_tokens, seed=1337):
    a = ["--preset", "full", "--train-batch-tokens", str(batch_tokens), "--max-micro-tokens", str(batch_tokens),
         "--iterations", str(steps), "--max-wallclock-seconds", "0", "--warmup-steps", "10",
         "--log-every", "50", "--fixture-sources", "1", "--val-batch-tokens", "98304",
         "--muon-momentum-warmup-steps", str(min(500, steps)), "--seed", str(seed)]
    return a + os.environ.get("PGOLF_TRAIN_BENCH_EXTRA", "").split()  # e.g. a tiny model for a CPU smoke test


def run(quick: bool = False):
    from bench.harness import make_row

    t0 = time.time()
    budget = float(os.environ.get("PGOLF_TRAIN_BENCH_BUDGET_S", "300"))
    timed = int(os.environ.get("PGOLF_TRAIN_BENCH_TIMED_STEPS", "20" if quick else "100"))
    parity = 60 if quick else STEPS
    ptok = int(os.environ.get("PGOLF_TRAIN_BENCH_PARITY_TOKENS", str(12 * 2048)))
    runs_dir = os.environ.get("PGOLF_TRAIN_BENCH_RUNS", "/tmp/pgolf_train_bench")
    logs_dir = os.environ.get("PGOLF_TRAIN_BENCH_LOGS", "")
    gpu = torch.cuda.get_device_name()
    anchor = 786_432 / 0.0834 / 8  # PR #549: 83.4 ms/step at 786,432 tok/step on 8xH100 -> tokens/s per GPU
    rows = []

    def save_partial():
        if logs_dir:
            with open(os.path.join(logs_dir, "rows_partial.json"), "w") as f:
                json.dump(rows, f, indent=1)

    def left():
        return budget - (time.time() - t0)

    # 1) speed at the records' per-GPU batch: 48 x 2048 tokens, default model
    k = _run(_args(timed, 98304) + ["--reference", "0", "--artifact", "0"], "speed-kernels", runs_dir, logs_dir)
    r = _run(_args(timed, 98304) + ["--reference", "1", "--artifact", "0"], "speed-reference", runs_dir, logs_dir)
    rows.append(make_row(
        KERNEL, f"speed: default 11L d512, 1 GPU, 48x2048 tok/step, {timed} timed steps",
        k["ms_per_step"], "reference", r["ms_per_step"], gpu=gpu,
        tokens_per_s_per_gpu=round(k["tokens_per_s_per_gpu"]),
        tokens_per_s_per_gpu_reference=round(r["tokens_per_s_per_gpu"]),
        target_tokens_per_s_per_gpu=round(anchor), steps=k["steps"],
        warmup_s_kernels=k["warmup_seconds"], warmup_s_reference=r["warmup_seconds"],
        compile_failed=bool(k.get("compile_failed") or r.get("compile_failed"))))
    save_partial()
    # a later run = warm-cache compile (~ the reference run's warm-up) + steps + ~15 s of set-up and eval
    est_parity = r["warmup_seconds"] + parity * r["ms_per_step"] / 1000 * ptok / 98304 + 15

    # 2) 500-step parity on the fixture (smaller batch so the whole bench fits one device call)
    if left() > 2 * est_parity + 30:  # + ~30 s for the artifact (quantize, fit, zstd-22) and its two evals
        pk = _run(_args(parity, ptok) + ["--reference", "0", "--artifact", "1"], "parity-kernels", runs_dir, logs_dir)
        pr = _run(_args(parity, ptok) + ["--reference", "1", "--artifact", "0"], "parity-reference", runs_dir, logs_dir)
        noise = None
        if left() > (pr["total_seconds"] if "total_seconds" in pr else est_parity) + 5:
            p2 = _run(_args(parity, ptok, seed=2024) + ["--reference", "1", "--artifact", "0"], "parity-reference-seed2",
                      runs_dir, logs_dir)
            noise = abs(_val(p2)[0] - _val(pr)[0])
        kl, kb = _val(pk)
        rl, rb = _val(pr)
        art = pk.get("artifact", {})
        qk = pk.get("val_quant", {})
        q6 = pk.get("val_quant_int6", {})
        rows.append(make_row(
            KERNEL, f"parity: default 11L d512, {ptok // 2048}x2048 tok/step, {parity} steps, stdlib fixture",
            pk["ms_per_step"], "reference", pr["ms_per_step"], gpu=gpu,
            tokens_per_s_per_gpu=round(pk["tokens_per_s_per_gpu"]),
            tokens_per_s_per_gpu_reference=round(pr["tokens_per_s_per_gpu"]), steps=pk["steps"],
            val_loss_kernels=kl, val_loss_reference=rl, val_loss_diff=abs(kl - rl), seed_noise_val_loss=noise,
            val_bpb_kernels=kb, val_bpb_reference=rb, weights_kernels=pk.get("weights"),
            weights_reference=pr.get("weights"), train_loss_kernels=pk["final_train_loss"],
            train_loss_reference=pr["final_train_loss"],
            artifact_bytes_total=art.get("bytes_total"), artifact_bytes_model=art.get("bytes_model"),
            artifact_bytes_code=art.get("bytes_code"), int6_step_mult=art.get("step_mult"),
            val_loss_after_quant=qk.get("val_loss"), val_bpb_after_quant=qk.get("val_bpb"),
            val_bpb_after_quant_int6linear=q6.get("val_bpb")))
        save_partial()

    # 3) a stronger eager baseline: plain torch NS batched per same-shape bank
    if left() > r["warmup_seconds"] + timed * r["ms_per_step"] / 1000 + 20:
        b = _run(_args(timed, 98304) + ["--reference", "1", "--artifact", "0", "--muon-impl", "torch-banked"],
                 "speed-torch-banked", runs_dir, logs_dir)
        rows.append(make_row(
            KERNEL, f"speed: default 11L d512, 1 GPU, 48x2048, {timed} steps, vs plain-torch NS batched per bank",
            k["ms_per_step"], "torch-banked", b["ms_per_step"], gpu=gpu,
            tokens_per_s_per_gpu=round(k["tokens_per_s_per_gpu"]),
            tokens_per_s_per_gpu_baseline=round(b["tokens_per_s_per_gpu"]), steps=b["steps"]))
        save_partial()
    print(json.dumps(rows, indent=1), flush=True)
    print(f"[bench_train] total {time.time() - t0:.0f} s", flush=True)
    return rows
