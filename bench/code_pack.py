"""What the drivers' code costs a submission, as files and as the packed file that ships (``train.code_pack``).

Measured on the machine it runs on (no GPU needed): the files of the drivers' import graph and build recipe, their
bytes, the packed file's bytes at the xz preset the pack uses and at the strongest one, the time to pack (median of
5, the walk of the import graph done before), and the first and second run of the packed file from an empty folder
without the checkout on the path (``-m train.code_pack --where``): the first extracts and builds the C++ codec in
place, the second reuses the tree. Writes ``bench/results/code-pack-<cpu|gpu>.{json,md}``.

    python3 -m bench.code_pack
"""
from __future__ import annotations

import json
import lzma
import os
import statistics
import subprocess
import sys
import tempfile
import time


def measure() -> dict:
    from train import artifact as art
    from train import code_pack as cp

    files = art.submission_code_files()
    raw = sum(len(v) for v in files.values())
    entries = [e for e in art.DRIVER_ENTRIES if cp.has_module(files, e)]
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        data = cp.pack(files, entries)
        ts.append(time.perf_counter() - t)
    preset, cp.PRESET = cp.PRESET, 9 | lzma.PRESET_EXTREME
    try:
        strongest = len(cp.pack(files, entries))
    finally:
        cp.PRESET = preset
    runs = []
    with tempfile.TemporaryDirectory() as d:
        f = os.path.join(d, "submission_code.py")
        with open(f, "wb") as fh:
            fh.write(data)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PGOLF_CODE_DIR", "TRITON_INTERPRET")}
        for _ in range(2):
            t = time.perf_counter()
            r = subprocess.run([sys.executable, f, "-m", "train.code_pack", "--where"], cwd=d, env=env,
                               capture_output=True, text=True, timeout=1200)
            if r.returncode:
                raise RuntimeError(f"the packed file failed (rc {r.returncode}): {r.stdout[-1500:]}{r.stderr[-1500:]}")
            runs.append(dict(seconds=round(time.perf_counter() - t, 2), where=json.loads(r.stdout)))
    return dict(files=len(files), bytes_files=raw, bytes_packed=len(data), preset=preset,
                bytes_packed_strongest=strongest, pack_s=round(statistics.median(ts), 3),
                first_run_s=runs[0]["seconds"], second_run_s=runs[1]["seconds"],
                codec_built_in_tree=runs[0]["where"]["codec"].startswith(d), cpus=os.cpu_count())


def main() -> None:
    import torch

    from bench import harness

    m = measure()
    row = dict(kernel="code-pack", case=f"drivers' code: {m['files']} files", **m)
    slug = harness.gpu_slug() if torch.cuda.is_available() else "cpu"
    out = os.environ.get("PGOLF_BENCH_RESULTS", harness.RESULTS_DIR)
    os.makedirs(out, exist_ok=True)
    info = harness.env_info()
    with open(os.path.join(out, f"code-pack-{slug}.json"), "w") as fh:
        json.dump(dict(info, kernel="code-pack", rows=[row]), fh, indent=1)
    with open(os.path.join(out, f"code-pack-{slug}.md"), "w") as fh:
        fh.write(f"# code-pack on {info['device']}\n\ntorch {info['torch']}, triton {info['triton']}, {info['date']}; "
                 f"{m['cpus']} CPUs; `python3 -m bench.code_pack`\n\n")
        fh.write("The code a submission ships, as files and as the one self-extracting file that is counted "
                 "(`train.code_pack`). first run: extract + build the C++ codec in place + `--where`; second run: "
                 "the same file again (tree reused).\n\n")
        fh.write(harness.markdown_table([row], list(row)))
    print(harness.markdown_table([row], list(row)))


if __name__ == "__main__":
    main()
