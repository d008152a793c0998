"""What ``--parallel-compile``'s children save: the eval's compile from their cache entries against a cold compile.

The eval compiles its forward as separate functions (``train.forward.compile_rows_nll``). ``--parallel-compile`` starts
one child per function group (``--warmup-part``: ttt-block, ttt-head, ttt-tail, global), each compiling only its
functions (``compile_rows_nll(only=...)``) on one synthetic TTT batch of the eval's warm-up size (before that: a
few small steps, which bench/results/parallel-compile-{cpu,h200}.md measured), in parallel. Here, each in processes
of its own and on fresh Inductor / Triton cache folders:

* ``ttt``: the eval's TTT warm-up (``train.warmup.warmup``, full size, every function compiled) cold, against the
  TTT children in parallel and then that warm-up on their cache entries;
* ``global``: the phased recipe's global pass (``train.phased.global_pass``, micro-batches of 32 x 2,048 targets on
  synthetic documents, all marked scored) cold, against the global child and then the pass on its entries.

Each row: the cold compile (``baseline_ms``), the children's wall in parallel and the compile after them
(``ours_ms`` = children's wall + the compile after them, what the eval's critical path pays when the children start
at its beginning and nothing else overlaps them), and the cache counters of the process after the children (all
hits expected). The model: the train driver's default config with random weights on CUDA (the graphs' shapes are
what matter), a tiny one on CPU (``--model tiny``). Synthetic tokens only.

    python3 -m bench.parallel_compile [--device cpu] [--model tiny]   # bench/results/parallel-compile-<gpu|cpu>.*
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

KERNEL = "parallel-compile"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TTT_PARTS = ("ttt-block", "ttt-head", "ttt-tail")


def _cfg(tail: bool):
    from train.ttt_config import recipe

    return recipe("records", tail_block=tail, global_batch_seqs=32)


def _model(name: str, device):
    import torch

    from train.eval_fixtures import randomize_, tiny_model
    from train.model import GPT, GPTConfig

    if name == "tiny":
        m = tiny_model(seed=3)
    else:
        m = randomize_(GPT(GPTConfig()), 3)
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
    return m.to(device=device, dtype=torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)


def child(what: str, device: str, model: str, tail: bool) -> Dict[str, object]:
    """One process: ``what`` = a --warmup-part (its functions only, one warm-up-size TTT batch) or ``ttt-full`` (the eval's
    TTT warm-up at full size) or ``global-full`` (a global pass at full size); returns its time and counters."""
    import numpy as np
    import torch

    from train.eval import PARALLEL_PARTS
    from train.forward import compile_rows_nll
    from train.warmup import compile_cache_counts, warmup, warmup_global, warmup_ttt_steps

    dev = torch.device(device)
    m = _model(model, dev)
    cfg = _cfg(tail)
    if model == "tiny":  # the tiny model's sequence length
        cfg = dataclasses.replace(cfg, window=m.config.seq_len, chunk=16, global_seq_len=m.config.seq_len)
    V = m.config.vocab_size
    from train.bpb import ByteLUT

    lut = ByteLUT(torch.ones(V, dtype=torch.int16, device=dev), torch.zeros(V, dtype=torch.bool, device=dev),
                  torch.zeros(V, dtype=torch.bool, device=dev))
    compile_rows_nll(m, only=PARALLEL_PARTS.get(what))
    t = time.perf_counter()
    if what == "ttt-full":
        warmup(m, lut, cfg, "bmm", dev, n_docs=cfg.batch_size, doc_len=cfg.window + cfg.chunk, graphs=True)
    elif what == "global-full":
        from train.data import BOS_ID
        from train.phased import global_pass, global_rows
        from train.rows import split_docs
        from train.scoring import make_state

        g = torch.Generator().manual_seed(1)
        lengths = [3 * cfg.global_seq_len + 100 * i for i in range(2 * cfg.global_batch_seqs // 3 + 2)]
        stream = torch.cat([torch.cat([torch.tensor([BOS_ID]), torch.randint(4, V, (n,), generator=g)])
                            for n in lengths]).to(dev)
        starts, ns = split_docs(stream.cpu())
        st = make_state(stream, lut)
        st.ledger.count.fill_(1)  # every target "scored": this only times the pass's compile
        global_pass(m, stream, global_rows(starts, ns, np.arange(len(ns)), cfg.global_seq_len),
                    dataclasses.replace(cfg, global_chunk_tokens=cfg.global_batch_seqs * cfg.global_seq_len), st)
    elif what == "global":
        warmup_global(m, cfg, dev)
    else:
        warmup_ttt_steps(m, lut, cfg, "bmm", dev)
    s = time.perf_counter() - t
    return dict(seconds=s, **{k: v for k, v in compile_cache_counts().items()
                              if "cache" in k or k in ("dynamo_frames", "compile_s.frame")})


def _spawn(whats: List[str], caches: str, args) -> List[Dict[str, object]]:
    """Run one child process per entry of ``whats`` at once on the cache folders ``caches``; their results and the
    wall time of the group."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(caches, "inductor"),
               TRITON_CACHE_DIR=os.path.join(caches, "triton"),
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    t = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "bench.parallel_compile", "--child", w, "--device", args.device,
                               "--model", args.model] + (["--tail-block"] if args.tail_block else []),
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for w in whats]
    outs = []
    for w, p in zip(whats, procs):
        out, err = p.communicate(timeout=args.timeout)
        if p.returncode != 0:
            raise RuntimeError(f"parallel_compile: child {w} exited {p.returncode}: {err[-2000:]}")
        outs.append(json.loads(out.strip().splitlines()[-1]))
    wall = time.perf_counter() - t
    for o in outs:
        o["group_wall_s"] = wall
    return outs


def run(args) -> List[Dict[str, object]]:
    from bench.harness import make_row

    rows = []
    parts = [p for p in TTT_PARTS if p != "ttt-tail" or args.tail_block]
    for name, full, kids in (("ttt", "ttt-full", parts), ("global", "global-full", ["global"])):
        if args.only and name not in args.only:
            continue
        with tempfile.TemporaryDirectory() as cold, tempfile.TemporaryDirectory() as warm:
            (c,) = _spawn([full], cold, args)
            ks = _spawn(kids, warm, args)
            (after,) = _spawn([full], warm, args)
        ours = ks[0]["group_wall_s"] + after["seconds"]
        rows.append(make_row(KERNEL, f"{name}: {full} cold vs children {', '.join(kids)} in parallel, then {full}",
                             1e3 * ours, f"{full} cold", 1e3 * c["seconds"], children_wall_s=round(ks[0]["group_wall_s"], 2),
                             children={k: round(o["seconds"], 2) for k, o in zip(kids, ks)},
                             after_s=round(after["seconds"], 2), cold_counts=c, after_counts=after,
                             device=args.device, model=args.model, tail_block=args.tail_block))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.parallel_compile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    ap.add_argument("--model", default=None, choices=["default", "tiny"], help="default on CUDA, tiny on CPU")
    ap.add_argument("--tail-block", action="store_true", help="the records' recipe with --tail-block (one more part)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per child process")
    ap.add_argument("--only", nargs="*", choices=["ttt", "global"], default=None, help="which rows (default both)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.model = args.model or ("default" if args.device == "cuda" else "tiny")
    if args.child:
        print(json.dumps(child(args.child, args.device, args.model, args.tail_block)), flush=True)
        return 0
    from bench.harness import save_results

    rows = run(args)
    path = save_results(KERNEL, rows, notes=__doc__.split("\n\n")[1])
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
