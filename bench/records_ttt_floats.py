"""What the patch's TTT piece changes in the 2026-04-29 record's TTT compile, counted on the CPU.

The record compiles ``GPT.forward_ttt`` with ``torch.compile(dynamic=True)``. With dynamic shapes Dynamo turns
every Python float the forward reads into a 0-dim float64 graph input, and on CUDA Inductor builds host C++
kernels for them (g++ in every process). ``pgolf_kernels.patch.apply`` sets
``torch._dynamo.config.specialize_float`` for that compile. This tool traces the record's own ``forward_ttt``
(a tiny config: 4 layers, d 64, vocabulary 256, looping and the parallel lanes on, SmearGate and the sparse
attention gate on) and its backward, over four window lengths, with a backend that records every graph's inputs,
once unpatched and once patched, each in its own process, and counts graphs, graph inputs and 0-dim float64 inputs.

    python3 -m bench.records_ttt_floats      # ~4 min on 2 CPU cores; writes bench/results/records-ttt-floats-cpu.{json,md}
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
    from bench import records_env
    from bench.harness import env_info

    miss = records_env.missing_reason()
    if miss:
        print(f"bench.records_ttt_floats: {miss}")
        return 1
    rows = []
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for variant in ("record", "patched"):
        p = subprocess.run([sys.executable, "-m", "bench.records_ttt_floats", "--child", variant], cwd=root,
                           capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=root))
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if p.returncode != 0 or not line:
            print(f"bench.records_ttt_floats: the {variant} child failed: {(p.stdout + p.stderr)[-1500:]}")
            return 1
        rows.append(dict(variant=variant, **json.loads(line[0][7:])))
    _write(os.path.join(root, "bench", "results", "records-ttt-floats-cpu"), env_info(), rows)
    for r in rows:
        print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
