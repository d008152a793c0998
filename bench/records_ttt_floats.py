"""What the patch's TTT piece changes in the 2026-04-29 record's TTT compile, counted on the CPU.

The record compiles ``GPT.forward_ttt`` with ``torch.compile(dynamic=True)``. With dynamic shapes Dynamo turns
every Python float the forward reads into a 0-dim float64 graph input, and on CUDA Inductor builds host C++
kernels for them (g++ in every process). ``pgolf_kernels.patch.apply`` sets
``torch._dynamo.config.specialize_float`` for that compile. This tool traces the record's own ``forward_ttt``
(a tiny config: 4 layers, d 64, vocabulary 256, looping and the parallel lanes on, SmearGate and the sparse
attention gate on) and its backward, over four window lengths, with a backend that records every graph's inputs,
once unpatched and once patched, each in its own process, and counts graphs, graph inputs and 0-dim float64 inputs.

    python3 -m bench.records_ttt_floats      # ~4 min on 2 CPU cores; writes bench/results/records-ttt-floats-cpu.{json,md}

``--warmup``: the record's TTT compile warm-up as the record runs it, at its default config (11 layers, looping on,
LoRA rank 96 on Q/K/V/O/MLP and the head; 2 rows instead of 64): ``torch.compile(dynamic=True)`` with Inductor
on empty cache folders, under bf16 autocast, window lengths ttt_chunk_size then ttt_eval_seq_len (the record's
warm-up), then 2 * ttt_chunk_size (a later eval window). Counts the Dynamo graphs and times each call (the first
ones include the cold compile of forward and backward). Inductor's CPU backend, so the seconds are this machine's
(C++ kernels, not Triton); the graph count is what a GPU run compiles.

    python3 -m bench.records_ttt_floats --warmup   # ~20 min on 2 CPU cores; bench/results/records-ttt-warmup-cpu.{json,md}

``--batch-sizes``: what a new LoRA batch size costs. The record's phased eval builds a new ``BatchedTTTLoRA(bsz)``
for every batch of fewer than ``ttt_batch_size`` documents (phase ends, the last batch). At the record's default
config, ``torch.compile(dynamic=True)`` with aot_eager (trace only), the TTT forward and backward at batch sizes
``BATCH_SIZES`` in turn (the first at windows ttt_chunk_size and 2 * ttt_chunk_size, the others at
2 * ttt_chunk_size), counting the Dynamo graphs (the regions' with the outer one's) after each.

    python3 -m bench.records_ttt_floats --batch-sizes --variants record,patched-regional   # ~7 min on 2 CPU cores
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

KEY = "2026-04-29"
TINY = dict(VOCAB_SIZE="256", NUM_LAYERS="4", MODEL_DIM="64", NUM_HEADS="2", NUM_KV_HEADS="1", LOOP_START="1",
            LOOP_END="2", PARALLEL_START_LAYER="3", XSA_LAST_N="4", SMEAR_GATE_ENABLED="1",
            SPARSE_ATTN_GATE_ENABLED="1", ROPE_DIMS="16", TRAIN_SEQ_LEN="64", EVAL_SEQ_LEN="64",
            ROPE_TRAIN_SEQ_LEN="64", FUSED_CE_ENABLED="0")
LENGTHS = (16, 32, 48, 64)
BATCH_SIZES = (6, 3, 2, 5)


def _child(patched: bool) -> dict:
    import torch

    from bench import records_env

    os.environ.update(TINY)
    ns = records_env.load_record(KEY)
    if patched:
        from pgolf_kernels.patch import apply

        apply(ns, muon=False, ttt=True)
    h = ns.Hyperparameters()
    model = ns.GPT(h).float().eval()  # eval(): the record's TTT path (its fused training MLP is CUDA-only)
    model.looping_active = True
    for p in model.parameters():
        p.requires_grad_(False)
    lora = ns.BatchedTTTLoRA(2, model, 4)
    inputs, graphs = [], []

    def recording(gm, example_inputs):
        inputs.extend(example_inputs)
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    def inner(x, y, lora):  # as the record's _fwd_ttt_inner
        return model.forward_ttt(x, y, lora=lora)

    fn = torch.compile(inner, dynamic=True, backend=recording)
    g = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    for length in LENGTHS:
        x = torch.randint(0, h.vocab_size, (2, length), generator=g)
        y = torch.randint(0, h.vocab_size, (2, length), generator=g)
        fn(x, y, lora)[:, : length // 2].mean(-1).sum().backward()
    floats = [a for a in inputs if isinstance(a, torch.Tensor) and a.dim() == 0 and a.dtype == torch.float64]
    return dict(patched=patched, graphs=len(graphs), graph_inputs=len(inputs), float64_scalar_inputs=len(floats),
                seconds=round(time.perf_counter() - t, 1),
                specialize_float=bool(torch._dynamo.config.specialize_float))


def _warmup_child(variant: str) -> dict:
    import torch

    from bench import records_env

    os.environ["CASEOPS_ENABLED"] = "0"
    ns = records_env.load_record(KEY)
    h, model = records_env.ttt_model_cpu(ns)
    lora = ns.BatchedTTTLoRA(2, model, h.ttt_lora_rank, k_lora=h.ttt_k_lora, mlp_lora=h.ttt_mlp_lora,
                             o_lora=h.ttt_o_lora)
    report = None
    patched = variant != "record"
    if patched:
        from pgolf_kernels.patch import apply

        report = apply(ns, muon=False, ttt=True, regional_ttt=variant == "patched-regional")  # "patched": whole forward
        if variant == "patched-regional":  # the regions count their graphs through the same backend
            import pgolf_kernels.patch as pp

            pp.REGION_BACKEND = lambda gm, ex: counting_inductor(gm, ex)
    from torch._inductor.compile_fx import compile_fx

    graphs = []

    def counting_inductor(gm, example_inputs):
        graphs.append(1)
        return compile_fx(gm, example_inputs)

    def inner(x, y, lora):  # as the record's _fwd_ttt_inner
        return model.forward_ttt(x, y, lora=lora)

    fn = torch.compile(inner, dynamic=True, backend=counting_inductor)
    g = torch.Generator().manual_seed(0)
    C = h.ttt_chunk_size
    calls = []
    for length in (C, h.ttt_eval_seq_len, 2 * C):
        x = torch.randint(0, h.vocab_size, (2, length), generator=g)
        y = torch.randint(0, h.vocab_size, (2, length), generator=g)
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ptl = fn(x, y, lora)
        ptl[:, -min(C, length):].mean(-1).sum().backward()  # the record trains on the window's last chunk
        calls.append(dict(window=length, seconds=round(time.perf_counter() - t, 1), graphs_so_far=len(graphs)))
    return dict(patched=patched, graphs=len(graphs), calls=calls, layers=h.num_layers, lora_slots=len(lora.q_loras),
                rank=h.ttt_lora_rank, patch=(str(report) if report is not None else "unmodified"))


def _bsz_child(variant: str) -> dict:
    import torch

    from bench import records_env

    os.environ["CASEOPS_ENABLED"] = "0"
    ns = records_env.load_record(KEY)
    h, model = records_env.ttt_model_cpu(ns)
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(1)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    report = None
    if variant != "record":
        import pgolf_kernels.patch as pp

        report = pp.apply(ns, muon=False, ttt=True, regional_ttt=variant == "patched-regional")
        pp.REGION_BACKEND = counting
    fn = torch.compile(lambda x, y, lora: model.forward_ttt(x, y, lora=lora), dynamic=True, backend=counting)
    g = torch.Generator().manual_seed(0)
    C = h.ttt_chunk_size
    calls = []
    for i, bsz in enumerate(BATCH_SIZES):
        lora = ns.BatchedTTTLoRA(bsz, model, h.ttt_lora_rank, k_lora=h.ttt_k_lora, mlp_lora=h.ttt_mlp_lora,
                                 o_lora=h.ttt_o_lora)
        t = time.perf_counter()
        for length in ((C, 2 * C) if i == 0 else (2 * C,)):
            x = torch.randint(0, h.vocab_size, (bsz, length), generator=g)
            y = torch.randint(0, h.vocab_size, (bsz, length), generator=g)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                ptl = fn(x, y, lora)
            ptl[:, -C:].mean(-1).sum().backward()
        calls.append(dict(bsz=bsz, seconds=round(time.perf_counter() - t, 1), graphs_so_far=len(graphs)))
    # one line: the report's own line breaks would split a markdown table row (docs/RESULTS.md)
    return dict(graphs=len(graphs), calls=calls, patch=(" ".join(str(report).split()) if report is not None
                                                          else "unmodified"))


def _dump(out: str, payload: dict, intro: str, header: str, lines: list) -> None:
    """``out``.json (``payload``) and ``out``.md: ``intro``, then a table of ``header`` and ``lines``."""
    with open(out + ".json", "w") as f:
        json.dump(payload, f, indent=1)
    with open(out + ".md", "w") as f:
        f.write(intro + "\n\n" + header + "\n" + "|---" * header.count(" | ") + "|---|\n")
        f.writelines(line + "\n" for line in lines)


def _calls(row: dict, key: str, prefix: str) -> str:
    """A row's calls as "<prefix><call[key]>: <seconds> s, <graphs so far>; ..."."""
    return "; ".join(f"{prefix}{c[key]}: {c['seconds']} s, {c['graphs_so_far']}" for c in row["calls"])


def _write_bsz(out: str, info: dict, rows: list) -> None:
    intro = (f"# {KEY} record: Dynamo graphs per new LoRA batch size (CPU)\n\n"
             f"torch {info['torch']}, {info['date']}; `python3 -m bench.records_ttt_floats --batch-sizes`: the record's "
             "default config (CaseOps off), its TTT forward and backward under torch.compile(dynamic=True) with "
             "aot_eager (trace only), a new BatchedTTTLoRA at each batch size in turn, as its phased eval builds one per "
             "batch of fewer than ttt_batch_size documents. seconds: that batch size's calls on 2 CPU cores, a "
             "recompile's tracing included.")
    _dump(out, dict(info, key=KEY, batch_sizes=BATCH_SIZES, rows=rows), intro,
          "| variant | Dynamo graphs | batch size: seconds, graphs so far |",
          [f"| {r['variant']} | {r['graphs']} | {_calls(r, 'bsz', '')} |" for r in rows])


def _write_warmup(out: str, info: dict, rows: list) -> None:
    """``out``.json / .md; rows of variants not run now stay as they were (each row carries its date)."""
    rows = [dict(r, date=r.get("date", info["date"]), torch=r.get("torch", info["torch"])) for r in rows]
    if os.path.isfile(out + ".json"):
        with open(out + ".json") as f:
            old = json.load(f)
        ran = {r["variant"] for r in rows}
        rows = [dict(r, date=r.get("date", old.get("date")), torch=r.get("torch", old.get("torch")))
                for r in old.get("rows", []) if r["variant"] not in ran] + rows
    intro = (f"# {KEY} record: its TTT compile warm-up, unpatched vs patched (CPU, Inductor)\n\n"
             "`python3 -m bench.records_ttt_floats --warmup [--variants ...]`: the "
             "record's default config (CaseOps off), 2 rows, LoRA at the record's rank and targets, "
             "torch.compile(dynamic=True) with Inductor's CPU backend on empty cache folders, one process per "
             "variant, run one after the other on 2 CPU cores. Each call: forward under bf16 autocast and the "
             "backward of the last chunk's mean loss; the first call holds the cold compile.\n\n"
             "patched-regional: `apply(..., regional_ttt=True)`, the per-block regions' graphs counted with the "
             "outer one's.")
    _dump(out, dict(info, key=KEY, rows=rows), intro,
          "| variant | date | torch | Dynamo graphs | call: window, seconds, graphs so far |",
          [f"| {r['variant']} | {r['date']} | {r['torch']} | {r['graphs']} | {_calls(r, 'window', 'T=')} |"
           for r in rows])


def _write(out: str, info: dict, rows: list) -> None:
    """``out``.json and ``out``.md from the two children's rows."""
    with open(out + ".json", "w") as f:
        json.dump(dict(info, key=KEY, config=TINY, lengths=LENGTHS, rows=rows), f, indent=1)
    with open(out + ".md", "w") as f:
        f.write(f"# {KEY} record: its TTT forward under torch.compile(dynamic=True), unpatched vs patched (CPU)\n\n"
                f"torch {info['torch']}, {info['date']}; `python3 -m bench.records_ttt_floats` (trace only: "
                f"Dynamo + AOTAutograd with aot_eager, forward and backward, window lengths {list(LENGTHS)}; "
                f"tiny config {TINY}). trace_s: the four calls' wall time on 2 CPU cores.\n\n"
                "| variant | specialize_float | graphs | graph inputs | 0-dim float64 inputs | trace_s |\n"
                "|---|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['variant']} | {r['specialize_float']} | {r['graphs']} | {r['graph_inputs']} | "
                    f"{r['float64_scalar_inputs']} | {r['seconds']} |\n")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print("RESULT " + json.dumps(_child(sys.argv[2] == "patched")), flush=True)
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--warmup-child":
        print("RESULT " + json.dumps(_warmup_child(sys.argv[2])), flush=True)
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--bsz-child":
        print("RESULT " + json.dumps(_bsz_child(sys.argv[2])), flush=True)
        return 0
    import argparse

    ap = argparse.ArgumentParser(prog="python3 -m bench.records_ttt_floats",
                                 description="the 2026-04-29 record's TTT compile, unpatched vs patched, on the CPU")
    ap.add_argument("--warmup", action="store_true",
                    help="time the record's cold compile warm-up at its default config (Inductor) instead of "
                         "counting the tiny config's graph inputs")
    ap.add_argument("--batch-sizes", action="store_true",
                    help="count the Dynamo graphs as the LoRA batch size changes (default config, aot_eager)")
    ap.add_argument("--variants", default="record,patched",
                    help="--warmup / --batch-sizes only: comma list of record, patched, patched-regional "
                         "(regional_ttt=True)")
    a = ap.parse_args(sys.argv[1:])
    warmup, bsz = a.warmup, a.batch_sizes
    variants = [v for v in a.variants.split(",") if v]
    bad = [v for v in variants if v not in ("record", "patched", "patched-regional")]
    if warmup and bsz:
        ap.error("--warmup and --batch-sizes: pick one")
    if bad or not variants or (not (warmup or bsz) and a.variants != "record,patched"):
        ap.error(f"--variants {a.variants!r}: expected a comma list of record, patched, patched-regional "
                 f"(with --warmup or --batch-sizes)")
    from bench import records_env
    from bench.harness import env_info

    miss = records_env.missing_reason()
    if miss:
        print(f"bench.records_ttt_floats: {miss}")
        return 1
    rows = []
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for variant in variants:
        env = dict(os.environ, PYTHONPATH=root)
        if warmup:  # a fresh machine: empty compile caches of its own per child
            import tempfile

            env.update(TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(), TRITON_CACHE_DIR=tempfile.mkdtemp())
        mode = "--warmup-child" if warmup else "--bsz-child" if bsz else "--child"
        p = subprocess.run([sys.executable, "-m", "bench.records_ttt_floats", mode, variant], cwd=root,
                           capture_output=True, text=True, env=env)
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if p.returncode != 0 or not line:
            print(f"bench.records_ttt_floats: the {variant} child failed: {(p.stdout + p.stderr)[-1500:]}")
            return 1
        rows.append(dict(variant=variant, **json.loads(line[0][7:])))
    if warmup:
        _write_warmup(os.path.join(root, "bench", "results", "records-ttt-warmup-cpu"), env_info(), rows)
    elif bsz:
        _write_bsz(os.path.join(root, "bench", "results", "records-ttt-bsz-cpu"), env_info(), rows)
    else:
        _write(os.path.join(root, "bench", "results", "records-ttt-floats-cpu"), env_info(), rows)
    for r in rows:
        print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
