"""The work each TTT schedule hands the GPU, counted on the CPU (no model runs).

For a recipe (window, chunk, 64 documents per batch) and one rank's share of the official-size synthetic val set
(its 50,000 document lengths, ``train.synthetic.doc_lengths``; share k/n = every n-th longest-first batch of 64
from batch k, as ``--share`` cuts it), this walks the steps of the batch schedule (``rows.batch_steps``) and of the
rolling schedule (``rows.rolling_steps``, claiming the share's batches in order), the code the eval runs, and counts
per schedule: steps, window positions of the real rows (``real``), the positions of the CUDA-graph buckets the steps
replay (``bucketed``: rows padded to 2, 4, 8 or a multiple of 8, windows to the graphs' length buckets,
``graphs.graph_buckets``) and how many steps run with 8 rows or fewer. ``real / bucketed`` is the share of the GPU's
positions that carry a scored window; steps with few rows are latency-bound on the GPU.

    python3 -m bench.schedule_work      # seconds; writes bench/results/schedule-work-cpu.{json,md}
"""
from __future__ import annotations

import datetime
import json
import os
from typing import Dict, List

import numpy as np

RECIPES = {"seeds": dict(window=1024, chunk=256), "records": dict(window=2048, chunk=48)}
SHARES = ((0, 8), (0, 1))
BATCH = 64
PHASED_L_STEPS = (256, 128, 96, 48)  # 256: the default for the records' recipe (window 2048 / 8)


def _count(steps, r_buckets, l_buckets, window) -> Dict[str, float]:
    from train.graphs import bucket_of, window_spans
    from train.ttt_config import TTTConfig

    n = real = bucketed = small = 0
    keys, graphs = set(), {}
    for live, b, trains in steps:
        spans = window_spans(b, window)
        R, L = bucket_of(r_buckets, l_buckets, live, int(spans.max()))
        keys.add((R, L))
        graphs[(R, L, bool(trains))] = graphs.get((R, L, bool(trains)), 0) + 1
        n += 1
        real += int(spans.sum())
        bucketed += R * L
        small += live <= 8
    return dict(steps=n, real_positions=real, bucketed_positions=bucketed, fill=round(real / max(bucketed, 1), 4),
                steps_8_rows_or_fewer=small, buckets=len(keys), graphs=len(graphs),
                graphs_captured=sum(c >= TTTConfig.graph_min_steps for c in graphs.values()))


def work(recipe: str, share=(0, 8), batch: int = BATCH, phased: bool = False,
         l_step=None) -> List[Dict[str, object]]:
    """Rows (one per schedule) for ``recipe`` on share k/n of the official-size synthetic lengths. ``phased``: the
    documents in the eval's phase groups (``phased.phase_plan`` with the recipe's phases and phase_docs: the phase
    documents first, each group cut into its own batches, the share taken in each group, as the eval does);
    ``l_step``: the graphs' window bucket step (``TTTConfig.graph_window_step``; None = the default)."""
    from train.doc_queue import share_of
    from train.graphs import graph_buckets
    from train.phased import phase_plan
    from train.rows import batch_steps, plan_doc_batches, rolling_steps
    from train.synthetic import doc_lengths
    from train.ttt_config import recipe as ttt_recipe

    if recipe not in RECIPES:
        raise ValueError(f"schedule_work: recipe = {recipe!r}: expected one of {sorted(RECIPES)}")
    k, n = share
    if not (isinstance(k, int) and isinstance(n, int) and 0 <= k < n):
        raise ValueError(f"schedule_work: share = {share!r}: expected (k, n) with 0 <= k < n")
    window, chunk = RECIPES[recipe]["window"], RECIPES[recipe]["chunk"]
    ns = doc_lengths() - 1  # targets per document (its BOS is not a target)
    cfg = ttt_recipe(recipe)
    if phased and cfg.phases < 1:
        raise ValueError(f"schedule_work: recipe {recipe!r} has no phases")
    # the documents longest first (phased: each phase group, then the rest), cut into batches as the eval cuts them
    # (plan_doc_batches), and this share's batches of each group (every n-th from k)
    groups = phase_plan(ns, cfg.phase_docs, cfg.phases) if phased else [np.arange(len(ns))]
    shared = [[g[b] for b in share_of(plan_doc_batches(ns[g], batch), (k, n))] for g in groups]
    rb, lb = graph_buckets(batch, window, chunk, l_step)

    def batch_sched():
        for batches in shared:
            for docs in batches:
                for live, _a, b, t in batch_steps(ns[docs], chunk):
                    yield live.size, b, t.any()

    def rolling_sched():
        for batches in shared:  # each phase's queue drains before the next one starts
            it = iter(batches)
            for _s, _n, live, _d, _a, b, t in rolling_steps(ns, chunk, batch, lambda: next(it, None)):
                yield live.size, b, t.any()

    docs = int(sum(len(b) for batches in shared for b in batches))
    return [dict(recipe=recipe, window=window, chunk=chunk, share=f"{k}/{n}", docs=docs, schedule=name,
                 phases=cfg.phases if phased else 0, l_step=lb[0], **_count(sched(), rb, lb, window))
            for name, sched in (("batch", batch_sched), ("rolling", rolling_sched))]


def main() -> None:
    from train.ttt_config import TTTConfig

    rows = [r for recipe in RECIPES for share in SHARES for r in work(recipe, share)]
    # case (c) as the eval runs it (3 phases over the 2,000 longest documents), per window bucket step
    rows += [r for step in PHASED_L_STEPS for r in work("records", (0, 8), phased=True, l_step=step)]
    here = os.path.dirname(os.path.abspath(__file__))
    out = os.path.join(here, "results", "schedule-work-cpu")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    import torch
    import triton

    with open(out + ".json", "w") as f:
        json.dump(dict(device="cpu", torch=torch.__version__, triton=triton.__version__, date=date, batch=BATCH,
                       rows=rows), f, indent=1)
    with open(out + ".md", "w") as f:
        f.write("# TTT schedules: the work they hand the GPU (CPU count)\n\n"
                f"{date}; `python3 -m bench.schedule_work` (host-side walk of the eval's own schedule code; no model "
                f"runs, no timing). Official-size synthetic document lengths, {BATCH} documents per batch. "
                "fill = real / bucketed window positions.\n\n"
                "phases: the eval's phase groups (the recipe's 3 phases over its 2,000 longest documents, then the "
                "rest), each cut into its own batches and drained before the next. window step: the CUDA graphs' "
                "window buckets (`--graph-window-step`); buckets: distinct (rows, window) buckets the steps use; "
                "graphs: distinct (bucket, kind) pairs, kind = a step that trains or a score-only one (every live "
                "row at its last chunk), what the eval plans for this share; captured: those met in at least "
                f"{TTTConfig.graph_min_steps} steps (`--graph-min-steps`, the default), the rest run without a graph.\n\n"
                "| recipe | share | docs | phases | schedule | window step | steps | real positions | "
                "bucketed positions | fill | steps with <= 8 rows | buckets | graphs | captured |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['recipe']} (window {r['window']}, chunk {r['chunk']}) | {r['share']} | {r['docs']:,} | "
                    f"{r['phases']} | {r['schedule']} | {r['l_step']} | {r['steps']:,} | {r['real_positions']:,} | "
                    f"{r['bucketed_positions']:,} | {r['fill']:.3f} | {r['steps_8_rows_or_fewer']:,} | "
                    f"{r['buckets']} | {r['graphs']} | {r['graphs_captured']} |\n")
    for r in rows:
        print(r)
    print(f"-> {out}.md")


if __name__ == "__main__":
    main()
