"""Eval driver benchmark: legal score-first LoRA TTT on an int6 artifact of the default 11-layer model.

Set-up (all on the GPU, inside this one process):
  * model: ``GPTConfig()`` (11 layers, d 512, vocab 1024), projections randomized (the records' zero
    init would make the blocks the identity), then briefly trained with Adam on FineWeb sample
    documents 0-149 when the sample is present; saved as an int6 artifact (``train/artifact.py``).
  * val set: ``train.synthetic.synthetic_tokens()`` -- official size, 50,000 documents, 62,021,846 tokens.

Rows (kernel ``eval``, baseline ``reference`` = dequantized bf16 weights + bmm LoRA, same loop; both
paths run with the driver's ``--compile`` default, i.e. a torch.compile'd forward):
  (a) one rank's 1/8 share (every 8th longest-first batch of 64 docs), seeds' TTT config (rank 8 on
      Q/V + head, chunk 256, window 1024, Adam lr 0.01);
  (b) all 50,000 documents on one GPU (the driver's own 570 s deadline);
  (c) 1/8 share with the records' recipe (``--recipe records``: rank 96 on q,k,v,o,mlp,head, chunk 48,
      window 2048, AdamW, warm-start A, phased TTT); PGOLF_EVAL_C_SHARE=64 runs every 64th batch;
  (f) fixture parity: FineWeb sample documents 150-199 (held out from the brief training), kernels vs
      reference TTT BPB, and TTT vs no-TTT (base) BPB;
  chunked: the chunked mode (one shared Q/V LoRA, 32,768-token chunks, 3 epochs, window 2048
      stride 64) on the held-out FineWeb docs (BPB vs sliding no-TTT) and on the first 800 synthetic docs (time).
Cases: env PGOLF_EVAL_CASES (default "fixture,a,b,c,chunked"); PGOLF_EVAL_PATHS (default
"kernels,reference") picks the paths run; PGOLF_EVAL_NO_REF lists cases whose reference run is
skipped (so one device call can hold one long case); PGOLF_EVAL_SCHEDULE=rolling runs
the per-document cases with ``--schedule rolling`` (rows labelled so); PGOLF_EVAL_GRAPHS=1 runs the seeds'
per-document cases with ``--cuda-graphs`` (rows labelled with the graphs captured and their preparation time).
``ours_ms`` = wall time with kernels from artifact load to the report (load + warm-up + scoring);
``baseline_ms`` = the same with ``--reference`` (NaN where not measured). Each row is also appended to
``eval-partial.jsonl`` as soon as it is measured.
"""
from __future__ import annotations

import gc
import json
import os
import time

import numpy as np
import torch

from bench.harness import env_flag, make_row

KERNEL = "eval"
RUN_BUDGET_S = float(os.environ.get("PGOLF_EVAL_BENCH_BUDGET_S", "380"))  # of the device call's 480 s
_T0 = time.perf_counter()


def _left() -> float:
    return RUN_BUDGET_S - (time.perf_counter() - _T0)


def _data_dir():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for p in (os.environ.get("PGOLF_SHARED_DATA"), os.path.join(here, "runs", "evaldata"),
              os.path.join(here, "..", "shared", "data")):
        if p and os.path.isfile(os.path.join(p, "fineweb_1024_bpe.model")):
            return p
    return None


def _out_dir():
    return os.environ.get("PGOLF_BENCH_RESULTS", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))


def _log_row(row):
    os.makedirs(_out_dir(), exist_ok=True)
    with open(os.path.join(_out_dir(), "eval-partial.jsonl"), "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
    print(json.dumps(row, default=str), flush=True)


def _fineweb(ddir):
    from train.data import read_shard

    toks = read_shard(os.path.join(ddir, "fineweb_sample", "fineweb_sample200_sp1024_000000.bin")).to(torch.int64)
    starts = (toks == 1).nonzero().flatten().tolist() + [toks.numel()]
    return toks, starts


def build_artifact(path, ddir, train_steps=150, cfg=None, device="cuda"):
    """Default 11-layer model, randomized projections, briefly trained on FineWeb docs 0-149."""
    from train.artifact import save_artifact
    from train.eval_fixtures import randomize_
    from train.model import GPT, GPTConfig

    torch.manual_seed(0)
    m = GPT(cfg or GPTConfig())
    randomize_(m, seed=0, proj_std=0.02, emb_std=0.05)
    m.to(device)
    info = {"train_steps": 0}
    if ddir is not None and train_steps:
        toks, starts = _fineweb(ddir)
        train = toks[: starts[150]].to(device)
        opt = torch.optim.Adam(m.parameters(), lr=2e-3, betas=(0.9, 0.95))
        B, T = 32, 1024
        g = torch.Generator(device=device).manual_seed(0)
        t = time.perf_counter()
        for step in range(train_steps):
            off = torch.randint(0, train.numel() - T - 1, (B,), device=device, generator=g)
            idx = off[:, None] + torch.arange(T + 1, device=device)[None]
            seq = train[idx]
            with torch.autocast(torch.device(device).type, torch.bfloat16):
                loss = m(seq[:, :-1], seq[:, 1:]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        _sync(device)
        info = {"train_steps": train_steps, "train_loss": float(loss.detach()), "train_s": time.perf_counter() - t}
    # level 3: the fit to 16 MB is decided on zstd-3 sizes anyway; zstd-22 would add ~20-60 s of CPU here
    # for ~0.5 % fewer bytes (load time is decompression + dequant, about the same for both levels)
    info.update(save_artifact(m.float().cpu(), path, code_paths=[], warn=False, fit=True, level=3))
    del m
    return info


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def eval_once(path, tokens_cpu, lut, cfg, *, reference, share=None, mode="ttt", budget_s=570.0, warm=True,
              device="cuda", compile=True, chunked=None):
    """Load + warm-up + score, timed like the driver (deadline origin = start of the artifact load).
    ``compile``: the driver's --compile (default on for CUDA), for both paths alike."""
    from train import eval as ev
    from train import warmup as wu
    from train.forward import compile_rows_nll

    _sync(device)
    t_start = time.perf_counter()
    model, _ = ev.load_model(path, reference=reference, device=device)
    if compile:
        compile_rows_nll(model)
    _sync(device)
    load_s = time.perf_counter() - t_start
    t = time.perf_counter()
    rates = None
    backend = "bmm" if reference else "kernel"
    if warm and mode == "chunked":
        rates = wu.warmup_chunked(model, lut, chunked, backend, device)
    elif warm:
        rates = wu.warmup(model, lut, cfg, backend, device, n_docs=cfg.batch_size, doc_len=cfg.window + cfg.chunk,
                          graphs=cfg.cuda_graphs and mode == "ttt")  # as the driver does
    warmup_s = time.perf_counter() - t
    tokens = tokens_cpu.to(device)
    rep = ev.evaluate(model, tokens, lut, mode=mode, cfg=cfg, backend=backend, t_start=t_start, budget_s=budget_s,
                      rates=rates if mode != "chunked" else None, share=share, progress_s=30.0, chunked=chunked)
    _sync(device)
    rep.update(load_s=load_s, warmup_s=warmup_s, wall_s=time.perf_counter() - t_start, rates=rates, compiled=compile)
    del model, tokens
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return rep


def _row(case, k, r, **extra):
    if k.get("schedule") == "rolling":
        case = f"{case} [rolling schedule]"
    if k.get("cuda_graphs"):
        cg = k["cuda_graphs"]
        case = f"{case} [CUDA graphs: {cg.get('graphs')} captured in {cg.get('graph_prepare_s', 0):.1f} s]"
    ours = k["wall_s"] * 1e3
    base = r["wall_s"] * 1e3 if r else float("nan")
    row = make_row(KERNEL, case, ours, "reference", base, docs=k.get("docs"), tokens=k["targets"] + k.get("docs", 0),
                   targets=k["targets"], bytes=k["bytes"], load_s=k["load_s"],
                   warmup_s=k["warmup_s"], score_s=k["score_s"], docs_no_ttt_deadline=k.get("docs_no_ttt_deadline"),
                   lora_backend=k.get("lora_backend"), steps=k.get("steps"),
                   window_positions=k.get("window_positions"), compiled=k.get("compiled"))
    row["val_bpb"] = k["val_bpb"]  # full precision (make_row rounds extras to 4 decimals)
    # warm-up phase times (train.eval.warmup: shape sweep, first/second TTT and scoring passes)
    row.update({f"warmup_{n}": round(v, 2) for n, v in (k.get("rates") or {}).items()
                if n.endswith("_s") and isinstance(v, float)})
    if r:
        row.update(ref_val_bpb=r["val_bpb"], bpb_diff=k["val_bpb"] - r["val_bpb"], ref_load_s=r["load_s"],
                   ref_warmup_s=r["warmup_s"], ref_score_s=r["score_s"],
                   ref_docs_no_ttt_deadline=r["docs_no_ttt_deadline"],
                   score_speedup=r["score_s"] / k["score_s"])
    else:
        row["reference"] = "not measured (time)"
    row.update(extra)
    _log_row(row)
    return row


def run(quick: bool = False):
    from bench.harness import save_results
    from train.bpb import ByteLUT
    from train.synthetic import synthetic_tokens
    from train.ttt_config import TTTConfig

    gpu = torch.cuda.get_device_name()
    rows = []
    ddir = _data_dir()
    path = "/tmp/pgolf_eval_bench.ptz"
    art = build_artifact(path, ddir, train_steps=0 if quick else 150)
    print(f"[bench_eval] {gpu}: artifact {art}", flush=True)
    V = 1024
    if ddir is not None:
        lut = ByteLUT.from_sentencepiece(os.path.join(ddir, "fineweb_1024_bpe.model"), vocab_size=V)
    else:  # no tokenizer here: 1 byte per token (BPB values are then per token / ln2, timings unaffected)
        lut = ByteLUT(torch.ones(V, dtype=torch.int16), torch.zeros(V, dtype=torch.bool),
                      torch.zeros(V, dtype=torch.bool))
    sched = os.environ.get("PGOLF_EVAL_SCHEDULE", "batch")  # "rolling": rows refilled as documents finish
    graphs = env_flag("PGOLF_EVAL_GRAPHS")  # "1": --cuda-graphs (seeds cases; records: phases)
    seeds = TTTConfig(schedule=sched, cuda_graphs=graphs)
    from train.ttt_config import recipe

    record = recipe("records", schedule=sched)  # rank 96 on q,k,v,o,mlp,head, chunk 48, window 2048, 3 phases

    def save():
        save_results(KERNEL, rows, notes=f"GPU: {gpu}. Artifact: default 11L d512 model, {art.get('train_steps')} "
                     f"brief training steps on FineWeb sample docs 0-149, int6 ({art.get('bytes_model')} bytes). "
                     "Synthetic official-size val set (train/synthetic.py). ours_ms/baseline_ms = wall from artifact "
                     "load (load + warm-up on synthetic tokens + scoring); NaN baseline = not measured.")

    def guarded(what, fn):
        """One failing eval must not cost the others' numbers (a single device run)."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - logged with its traceback, row marked failed
            import traceback

            traceback.print_exc()
            _log_row({"kernel": KERNEL, "case": what, "error": f"{type(e).__name__}: {e}"})
            return None

    cases = os.environ.get("PGOLF_EVAL_CASES", "fixture,a,b,c,chunked").split(",")
    no_ref = set(os.environ.get("PGOLF_EVAL_NO_REF", "").split(","))  # cases whose --reference run is skipped
    print(f"[bench_eval] cases {cases}, no reference for {sorted(no_ref - {''})}", flush=True)

    # PGOLF_EVAL_PATHS: "kernels,reference" (default) or one of them (a reference-only run logs its
    # report to eval-partial.jsonl; table rows need the kernel run)
    paths = set(os.environ.get("PGOLF_EVAL_PATHS", "kernels,reference").split(","))

    def pair(case, fn_k, fn_r, est=None):
        """kernels, then reference unless skipped or this run's time is short (est: reference's expected s)."""
        k = guarded(f"{case} kernels", fn_k) if "kernels" in paths else None
        r = None
        if "reference" in paths and case not in no_ref and (k is None or _left() > (est or 1.3 * k["wall_s"]) + 30):
            r = guarded(f"{case} reference", fn_r)
            if k is None and r is not None:
                _log_row({"kernel": KERNEL, "case": f"{case} (reference only)", "path": "reference",
                          **{key: r.get(key) for key in ("wall_s", "load_s", "warmup_s", "score_s", "val_bpb", "docs",
                                                         "targets", "steps", "window_positions", "chunks",
                                                         "train_steps", "docs_no_ttt_deadline", "schedule")}})
        return k, r

    toks = starts = None
    if ddir is not None:
        toks, starts = _fineweb(ddir)
    # (f) fixture parity + TTT delta on held-out FineWeb docs (cheap, first)
    if "fixture" in cases and toks is not None:
        held = toks[starts[150]:]
        k, r = pair("fixture", lambda: eval_once(path, held, lut, seeds, reference=False),
                    lambda: eval_once(path, held, lut, seeds, reference=True))
        b = guarded("fixture base", lambda: eval_once(path, held, lut, seeds, reference=True, mode="base", warm=False))
        if k is not None:
            extra = {}
            if b is not None:
                extra = dict(no_ttt_val_bpb=b["val_bpb"], ttt_delta_bpb=k["val_bpb"] - b["val_bpb"])
            rows.append(_row("fixture: FineWeb sample docs 150-199 (held out), seeds TTT", k, r, **extra))
            save()

    # chunked score-first TTT (one shared Q/V LoRA, 32,768-token chunks, 3 epochs, window 2048 stride 64)
    if "chunked" in cases:
        from train.chunked import ChunkedConfig

        cc = ChunkedConfig()
        if toks is not None:
            held = toks[starts[150]:]
            k, r = pair("chunked fixture", lambda: eval_once(path, held, lut, seeds, reference=False, mode="chunked",
                                                            chunked=cc),
                        lambda: eval_once(path, held, lut, seeds, reference=True, mode="chunked", chunked=cc))
            sl = guarded("chunked fixture sliding", lambda: eval_once(
                path, held, lut, TTTConfig(window=2048), reference=True, mode="sliding", warm=False))
            if k is not None:
                extra = {"chunks": k.get("chunks"), "train_steps": k.get("train_steps")}
                if sl is not None:
                    extra.update(no_ttt_val_bpb=sl["val_bpb"], ttt_delta_bpb=k["val_bpb"] - sl["val_bpb"])
                rows.append(_row("chunked: FineWeb docs 150-199, 32k chunks, 3 epochs, r8 Q/V, window 2048 stride 64",
                                 k, r, **extra))
                save()

    if not {"a", "b", "c", "chunked"} & set(cases):
        return rows
    t = time.perf_counter()
    syn = torch.from_numpy(synthetic_tokens().astype(np.int64))
    print(f"[bench_eval] synthetic val {syn.numel():,} tokens in {time.perf_counter() - t:.1f} s", flush=True)

    if "chunked" in cases:
        from train.eval import docs_prefix

        pre = docs_prefix(syn, 800)  # ~1 M tokens: timing of the chunked loop at the records' settings
        k, r = pair("chunked synthetic", lambda: eval_once(path, pre, lut, seeds, reference=False, mode="chunked",
                                                          chunked=cc),
                    lambda: eval_once(path, pre, lut, seeds, reference=True, mode="chunked", chunked=cc))
        if k is not None:
            rows.append(_row(f"chunked: first 800 synthetic docs ({pre.numel():,} tokens), same config", k, r,
                             chunks=k.get("chunks"), train_steps=k.get("train_steps")))
            save()

    k = None
    if "a" in cases:  # (a) 1/8 share, seeds config
        k, r = pair("(a)", lambda: eval_once(path, syn, lut, seeds, reference=False, share=(0, 8)),
                    lambda: eval_once(path, syn, lut, seeds, reference=True, share=(0, 8)))
        if k is not None:
            rows.append(_row("(a) 1/8 share (6,250 docs), r8 Q/V+head, chunk 256, window 1024", k, r))
            save()
    if quick:
        return rows

    if "b" in cases:  # (b) all 50,000 docs on one GPU, the driver's own 570 s deadline
        # ... or this run's time left, whichever is shorter, so that a (deadline-marked) row always comes
        # back from a 10-minute device call: docs_no_ttt_deadline then says how many fell back
        k, r = pair("(b)", lambda: eval_once(path, syn, lut, seeds, reference=False,
                                             budget_s=max(60.0, min(570.0, _left() - 20))),
                    lambda: eval_once(path, syn, lut, seeds, reference=True, budget_s=max(60.0, min(570.0, _left() - 20))))
        if k is not None:
            rows.append(_row("(b) all 50,000 docs, r8 Q/V+head, chunk 256, window 1024", k, r))
            save()

    if "c" in cases:  # (c) 1/8 share, records' config
        # If this run cannot hold the whole share (estimated from the measured (a) rate), run every 64th batch
        # instead -- a smaller but complete, representative sample -- rather than a deadline-truncated share.
        nshare = int(os.environ.get("PGOLF_EVAL_C_SHARE", "8"))  # 64: a smaller complete sample
        if k is not None and nshare == 8:
            from train.rows import plan_doc_batches, split_docs, ttt_positions

            _, ns = split_docs(syn)
            bat = plan_doc_batches(ns, record.batch_size)
            pos_c = sum(ttt_positions(ns[bat[i]], record.chunk, record.window) for i in range(0, len(bat), 8))
            est_c = 60 + 1.5 * pos_c / (k["window_positions"] / k["score_s"])
            if est_c > _left() - 20:
                nshare = 64
            print(f"[bench_eval] (c) estimate {est_c:.0f} s for the 1/8 share, {_left():.0f} s left: share 1/{nshare}",
                  flush=True)
        k, r = pair("(c)", lambda: eval_once(path, syn, lut, record, reference=False, share=(0, nshare)),
                    lambda: eval_once(path, syn, lut, record, reference=True, share=(0, nshare)))
        if k is not None:
            rows.append(_row(f"(c) 1/{nshare} share, records recipe (r96 q,k,v,o,mlp,head, chunk 48, window 2048, "
                             f"AdamW, warm-start A, {record.phases} phases over {record.phase_docs} docs"
                             f"{', --tail-block' if record.tail_block else ''})", k, r,
                             share=f"1/{nshare}"))
            save()
    return rows
