"""The code a submission ships, as one self-extracting Python file: how the records count their code bytes.

A record's ``train_gpt.py`` ships as ``exec(lzma.decompress(base64.b85decode("...")))`` (2026-04-29: 152,661 bytes of
source -> 31,385 counted bytes). The drivers here are ~50 files (the import graph of ``python3 -m train`` and
``python3 -m train.eval``, the codec's C++ sources, and the build recipe ``setup.py`` / ``pyproject.toml``):
~650 KB as files, ~210 KB as one packed file (tar -> xz -> base85). The model's byte budget is 16,000,000 minus
the code, so counting the packed form leaves ~440 KB more for weights, which ``artifact.save_artifact`` otherwise
spends on a coarser int6 grid.

The packed file, run as ``python3 FILE [-m MODULE] [args...]``:

1. extracts its tree once into ``$PGOLF_CODE_DIR`` or ``<FILE's folder>/.pgolf_code/<sha256[:16] of the payload>``
   (a file lock serialises ranks started together; a finished tree is marked ``.complete`` and reused);
2. builds the C++ codec there in place when the tree has no built ``pgolf_kernels/_C`` (``setup.py build_ext
   --inplace``, log in ``build.log``; a failure stops with one line naming the log);
3. puts the tree first on ``sys.path`` and runs MODULE as ``__main__`` with the remaining arguments. MODULE defaults
   to the first entry (``train``); another must be a module of the pack (``-m train.eval``).

``pack`` is deterministic (sorted names, zero times and owners, xz preset 6), so the same files give the same bytes
and the same count. ``unpack`` reads the files back (what the tests compare with the sources).
``python3 -m train.code_pack [--out FILE]`` writes the drivers' pack and prints its bytes; ``--where`` (run through a
pack: ``python3 FILE -m train.code_pack --where``) prints where the running code and its codec come from.
"""
from __future__ import annotations

import base64
import io
import lzma
import os
import re
import tarfile
from typing import Dict, Iterable, Sequence, Tuple

# xz preset 6: 163,388 bytes for the drivers' tree in 0.23 s; preset 9 + extreme 163,268 bytes in 0.32 s
# (2 CPU cores): the 120 bytes do not pay for the time on the eval's load path
PRESET = 6
# The files are packed as they are, not minified. Dropping every string-literal statement (docstrings) and comments
# with ast.unparse, each file checked to parse back to the same tree, gave a payload of 121,860 bytes instead of
# 208,620 (-87 KB, 0.5 % of the cap), but took 1.1 s of interpreter-bound work on 2 cores: the eval counts its code
# while it loads, beside torch.compile's imports, and its warm first score (4.85 s) has 0.15 s to spare.
MAGIC = "# pgolf-code-pack/1"
# the header every pack starts with; {entries} and {payload} are filled in. Kept short: it is counted too.
_HEADER = MAGIC + """: the drivers' source tree, tar -> xz -> base85. Run: python3 THIS_FILE [-m MODULE] [args]
import base64,fcntl,glob,hashlib,io,lzma,os,runpy,subprocess,sys,tarfile
E={entries!r}
D=b"{payload}"
def _tree():
    z=base64.b85decode(D)
    d=os.environ.get("PGOLF_CODE_DIR") or os.path.join(os.path.dirname(os.path.abspath(__file__)),".pgolf_code",hashlib.sha256(z).hexdigest()[:16])
    os.makedirs(d,exist_ok=True)
    with open(os.path.join(d,".lock"),"w") as lk:
        fcntl.flock(lk,fcntl.LOCK_EX)
        if not os.path.isfile(os.path.join(d,".complete")):
            with tarfile.open(fileobj=io.BytesIO(lzma.decompress(z))) as t:
                t.extractall(d,filter="data") if hasattr(tarfile,"data_filter") else t.extractall(d)
            if os.path.isfile(os.path.join(d,"setup.py")) and not glob.glob(os.path.join(d,"pgolf_kernels","_C*.so")):
                with open(os.path.join(d,"build.log"),"wb") as log:
                    if subprocess.call([sys.executable,"setup.py","build_ext","--inplace"],cwd=d,stdout=log,stderr=subprocess.STDOUT):
                        sys.exit("pgolf code pack: building the C++ codec failed; see "+os.path.join(d,"build.log"))
            open(os.path.join(d,".complete"),"w").close()
    return d
def _main():
    a=sys.argv[1:]
    m=E[0] if E else None
    if a[:1]==["-m"]:
        if len(a)<2:
            sys.exit("pgolf code pack: -m needs a module name")
        m,a=a[1],a[2:]
    if m is None:
        sys.exit("pgolf code pack: this pack has no default entry; run it with -m MODULE")
    d=_tree()
    if not any(os.path.isfile(os.path.join(d,*m.split("."))+s) for s in (".py",os.sep+"__init__.py")):
        sys.exit("pgolf code pack: -m "+m+": not a module of this pack (entries: "+", ".join(E)+")")
    sys.path.insert(0,d)
    sys.argv=[os.path.join(d,*m.split("."))]+a
    runpy.run_module(m,run_name="__main__",alter_sys=True)
if __name__=="__main__":
    _main()
"""
_PAYLOAD_RE = re.compile(rb'^D=b"([^"\n]*)"$', re.M)


def has_module(names: Iterable[str], module: str) -> bool:
    """Whether module ``module`` (``a.b``) is one of the packed file ``names`` (``a/b.py`` or ``a/b/__init__.py``)."""
    base = "/".join(module.split("."))
    names = set(names)
    return base + ".py" in names or base + "/__init__.py" in names


def files_of(paths: Sequence[str], root: str) -> Dict[str, bytes]:
    """``{path relative to root (/-separated): bytes}`` of ``paths``; a path outside ``root``, a missing file or
    no path at all refused by name."""
    if isinstance(paths, (str, bytes, os.PathLike)):
        raise TypeError(f"code_pack: paths: expected a list of file paths, got one path {paths!r}")
    root = os.path.abspath(root)
    if not paths:
        raise ValueError("code_pack: paths: expected at least one file")
    out: Dict[str, bytes] = {}
    for p in paths:
        ap = os.path.abspath(p)
        rel = os.path.relpath(ap, root)
        if rel.startswith("..") or os.path.isabs(rel):
            raise ValueError(f"code_pack: {p!r} is outside the packed root {root!r}")
        if not os.path.isfile(ap):
            raise FileNotFoundError(f"code_pack: {p!r} is not a file")
        with open(ap, "rb") as f:
            out[rel.replace(os.sep, "/")] = f.read()
    return out


def pack(files: Dict[str, bytes], entries: Sequence[str] = ()) -> bytes:
    """The self-extracting Python file of ``files`` (``{relative path: bytes}``, e.g. from ``files_of``); running it
    with no ``-m`` runs ``entries[0]``. Every entry must be a module of ``files`` (``a.b`` -> ``a/b.py`` or
    ``a/b/__init__.py``), refused by name otherwise."""
    if not isinstance(files, dict) or not files:
        raise ValueError(f"code_pack.pack: files: expected a non-empty dict of relative path -> bytes, got "
                         f"{type(files).__name__}{' (empty)' if isinstance(files, dict) else ''}")
    bad = [n for n, v in files.items() if not isinstance(n, str) or not isinstance(v, (bytes, bytearray))
           or os.path.isabs(n) or n.split("/")[0] == ".."]
    if bad:
        raise ValueError(f"code_pack.pack: files: {bad[:3]}: expected relative paths (str) inside the tree -> bytes")
    entries = tuple(entries)
    bad = [e for e in entries if not isinstance(e, str) or not has_module(files, e)]
    if bad:
        raise ValueError(f"code_pack.pack: entries {bad}: not modules of the packed files")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name in sorted(files):
            data = files[name]
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, 0
            tf.addfile(ti, io.BytesIO(data))
    payload = base64.b85encode(lzma.compress(buf.getvalue(), preset=PRESET)).decode("ascii")
    # base85's alphabet has no '"', '\\' or newline, so the payload is a plain bytes literal
    return _HEADER.format(entries=entries, payload=payload).encode("utf-8")


def unpack(data: bytes) -> Tuple[Dict[str, bytes], Tuple[str, ...]]:
    """``(files, entries)`` of a pack made by ``pack``; anything else refused by name."""
    if not isinstance(data, (bytes, bytearray)) or not bytes(data).startswith(MAGIC.encode()):
        raise ValueError(f"code_pack.unpack: not a pgolf code pack (expected a file starting with {MAGIC!r})")
    m = _PAYLOAD_RE.search(data)
    e = re.search(rb"^E=(\(.*\))$", data, re.M)
    if m is None or e is None:
        raise ValueError("code_pack.unpack: the pack's E= or D= line is missing or damaged")
    import ast

    entries = tuple(ast.literal_eval(e.group(1).decode("utf-8")))
    try:
        raw = lzma.decompress(base64.b85decode(m.group(1)))
    except (ValueError, lzma.LZMAError) as err:
        raise ValueError(f"code_pack.unpack: the payload does not decode ({err})") from err
    files: Dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        for ti in tf.getmembers():
            f = tf.extractfile(ti)
            if f is not None:
                files[ti.name] = f.read()
    return files, entries


def where() -> Dict[str, object]:
    """Where the running drivers and the codec come from (the ``--where`` report)."""
    import pgolf_kernels

    import train

    out: Dict[str, object] = {"train": os.path.dirname(os.path.abspath(train.__file__)),
                              "pgolf_kernels": os.path.dirname(os.path.abspath(pgolf_kernels.__file__))}
    try:
        from pgolf_kernels._ext import load_C

        out["codec"] = os.path.abspath(load_C().__file__)
    except RuntimeError as err:
        out["codec"] = f"not loadable: {err}"
    return out


def main(argv=None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python3 -m train.code_pack", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="", help="write the drivers' pack here (default: only print its bytes)")
    ap.add_argument("--where", action="store_true", help="print where the running code and its codec come from")
    args = ap.parse_args(argv)
    if args.where:
        print(json.dumps(where(), indent=1))
        return 0
    from .artifact import code_pack_bytes, submission_code_files

    data = code_pack_bytes()
    files = submission_code_files()
    raw = sum(len(v) for v in files.values())
    if args.out:
        with open(args.out, "wb") as f:
            f.write(data)
    print(f"{len(files)} files, {raw:,} bytes -> {len(data):,} bytes packed"
          + (f": {args.out} (run: python3 {args.out} [-m train.eval] [args])" if args.out else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
