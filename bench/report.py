"""Regenerate README.md's results section from bench/results/*.json.

    python3 -m bench.report            # rewrite the block between the results markers
    python3 -m bench.report --print    # print the markdown instead
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re

from .harness import RESULTS_DIR, markdown_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START, END = "<!-- results:start -->", "<!-- results:end -->"


def render(results_dir: str = RESULTS_DIR) -> str:
    parts = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        if re.search(r"-(run|session)\d+\.json$", path):
            continue  # superseded earlier runs stay in bench/results for the record, not in README
        with open(path) as f:
            d = json.load(f)
        if "rows" not in d:
            continue  # not a harness results file (e.g. profile-ttt-*.json: see its .md)
        rows = d.get("rows", [])
        sp = sorted(float(r["speedup"]) for r in rows if isinstance(r.get("speedup"), (int, float)))
        name = os.path.basename(path)
        span = (f"{len(rows)} rows; speedup min {sp[0]:.2f} / median {sp[len(sp) // 2]:.2f} / max {sp[-1]:.2f}"
                if sp else f"{len(rows)} rows")
        parts.append(
            f"### `{name}` — {d.get('device')} · torch {d.get('torch')} · triton {d.get('triton')} · {d.get('date')}\n\n"
            + f"<details><summary>{span}</summary>\n\n"
            + (d.get("notes", "").strip() + "\n\n" if d.get("notes") else "")
            + markdown_table(rows)
            + "\n</details>\n"
        )
    if not parts:
        return "(no GPU results yet)\n"
    head = ("speedup = baseline_ms / ours_ms (> 1 means ours is faster). Times are medians "
            "(triton.testing.do_bench or CUDA-graph replay, as each file's notes say).\n\n")
    return head + "\n".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.report")
    ap.add_argument("--print", action="store_true")
    args = ap.parse_args(argv)
    md = render()
    if args.print:
        print(md)
        return 0
    readme = os.path.join(ROOT, "README.md")
    text = open(readme).read()
    if START not in text or END not in text:
        raise SystemExit(f"README.md lacks the {START} / {END} markers")
    pre, rest = text.split(START, 1)
    _, post = rest.split(END, 1)
    with open(readme, "w") as f:
        f.write(pre + START + "\n" + md + END + post)
    print(f"README.md results section updated from {len(glob.glob(os.path.join(RESULTS_DIR, '*.json')))} files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
