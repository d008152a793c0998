"""train.code_pack: the drivers' code as one self-extracting file (what a submission ships and is counted as)."""
import json
import os
import subprocess
import sys

import pytest

from train import artifact as art
from train import code_pack as cp


def _run(pack_file, *args, env_extra=None, timeout=300):
    """Run a pack file in its own folder, without the checkout on the path (as on a submission machine) and without
    the CPU lane's Triton interpreter (a user's CPU run takes the torch paths; interpreted, 3 training steps of the
    drivers outran 600 s)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PGOLF_CODE_DIR", "TRITON_INTERPRET")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, str(pack_file), *args], cwd=os.path.dirname(str(pack_file)), env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_drivers_pack_round_trips_deterministically_and_is_what_is_counted():
    """The drivers' pack holds every file of the import graph and the build recipe byte for byte, with both driver
    entries; two packs of the same files are the same bytes; it is what submission counts charge (under half the
    files' bytes)."""
    files = art.submission_code_files()
    assert {"train/eval.py", "train/train_gpt.py", "pgolf_kernels/quant.py", "csrc/codec.cpp", "setup.py",
            "pyproject.toml", "train/code_pack.py"} <= set(files)
    data = art.code_pack_bytes()
    assert cp.pack(files, art.DRIVER_ENTRIES) == data
    back, entries = cp.unpack(data)
    assert back == files and entries == art.DRIVER_ENTRIES
    raw = sum(len(v) for v in files.values())
    assert len(data) < 0.5 * raw
    assert data.startswith(cp.MAGIC.encode()) and data.decode("ascii")  # a plain-text Python file


def test_code_paths_given_are_packed_alone_and_empty_means_no_code(tmp_path):
    """Explicit code paths (outside the repository: relative to their common folder) are packed without entries;
    an empty list counts no code; submission_bytes reports the packed and the unpacked size."""
    (tmp_path / "pkg").mkdir()
    a, b = tmp_path / "pkg" / "a.py", tmp_path / "b.txt"
    a.write_bytes(b"print('a')\n" * 50)
    b.write_bytes(b"x" * 1234)
    files = art.submission_code_files([str(a), str(b)])
    assert files == {"pkg/a.py": a.read_bytes(), "b.txt": b.read_bytes()}
    data = art.code_pack_bytes([str(a), str(b)])
    assert cp.unpack(data) == (files, ())
    assert art.code_pack_bytes([]) == b"" and art.submission_code_files([]) == {}
    model = tmp_path / "m.bin"
    model.write_bytes(b"m" * 100)
    sub = art.submission_bytes(str(model), code_paths=[str(a), str(b)])
    assert sub["bytes_code"] == len(data) and sub["bytes_code_files"] == 550 + 1234
    assert sub["bytes_total"] == 100 + len(data)


def test_pack_refuses_bad_input_by_name(tmp_path):
    """No files, an entry that is not a packed module, a path outside the root, a missing file, a file that is not a
    pack and a damaged payload: each refused with one line naming it."""
    with pytest.raises(ValueError, match=r"files: expected a non-empty dict .*\(empty\)"):
        cp.pack({})
    with pytest.raises(ValueError, match=r"files: \['/abs.py'\]: expected relative paths"):
        cp.pack({"/abs.py": b""})
    with pytest.raises(ValueError, match=r"files: \['\.\./up.py'\]: expected relative paths"):
        cp.pack({"../up.py": b""})
    with pytest.raises(ValueError, match=r"files: \['a.py'\]: expected relative paths"):
        cp.pack({"a.py": "text, not bytes"})
    with pytest.raises(TypeError, match="paths: expected a list of file paths, got one path"):
        cp.files_of(str(tmp_path / "a.py"), str(tmp_path))
    with pytest.raises(TypeError, match="code_paths: expected a list of file paths"):
        art.code_pack_bytes(str(tmp_path / "a.py"))
    with pytest.raises(ValueError, match=r"entries \['pkg.nope'\]: not modules"):
        cp.pack({"pkg/__init__.py": b""}, ["pkg.nope"])
    f = tmp_path / "a.py"
    f.write_text("x = 1\n")
    with pytest.raises(ValueError, match="outside the packed root"):
        cp.files_of([str(f)], str(tmp_path / "sub"))
    with pytest.raises(FileNotFoundError, match="is not a file"):
        cp.files_of([str(tmp_path / "missing.py")], str(tmp_path))
    with pytest.raises(ValueError, match="paths: expected at least one file"):
        cp.files_of([], str(tmp_path))
    with pytest.raises(ValueError, match="not a pgolf code pack"):
        cp.unpack(b"import os\n")
    good = cp.pack({"a.py": b"x = 1\n"})
    with pytest.raises(ValueError, match="payload does not decode"):
        cp.unpack(good.replace(b'D=b"', b'D=b"~~~~'))
    with pytest.raises(ValueError, match="E= or D= line is missing"):
        cp.unpack(good.replace(b"\nE=", b"\nF="))


def test_pack_file_runs_its_entries_with_their_arguments(tmp_path):
    """A pack file extracts its tree beside itself, runs the default entry or -m MODULE with the arguments after it,
    from the extracted tree; an unknown module and a bare -m stop with one line; a second run reuses the tree."""
    src = b"import sys\nprint('ran', __name__, __file__, sys.argv[1:])\n"
    data = cp.pack({"pkg/__init__.py": b"", "pkg/hello.py": src, "pkg/other.py": src.replace(b"ran", b"other")},
                   ["pkg.hello"])
    f = tmp_path / "sub.py"
    f.write_bytes(data)
    r = _run(f, "a", "--b")
    assert r.returncode == 0, r.stderr
    tree = os.path.join(str(tmp_path), ".pgolf_code")
    assert r.stdout.startswith("ran __main__ " + tree) and r.stdout.strip().endswith("['a', '--b']")
    r = _run(f, "-m", "pkg.other", "x")
    assert r.returncode == 0 and r.stdout.startswith("other __main__") and "['x']" in r.stdout, r.stderr
    r = _run(f, "-m", "pkg.missing")
    assert r.returncode == 1 and "-m pkg.missing: not a module of this pack (entries: pkg.hello)" in r.stderr
    r = _run(f, "-m")
    assert r.returncode == 1 and "-m needs a module name" in r.stderr
    (d,) = os.listdir(tree)
    assert os.path.isfile(os.path.join(tree, d, ".complete"))
    # PGOLF_CODE_DIR chooses the folder
    r = _run(f, env_extra={"PGOLF_CODE_DIR": str(tmp_path / "here")})
    assert r.returncode == 0 and os.path.isfile(tmp_path / "here" / "pkg" / "hello.py"), r.stderr


def test_drivers_pack_builds_its_codec_and_trains_from_the_extracted_tree(tmp_path):
    """The drivers' own pack, run from a folder without the checkout on the path: it extracts, builds the C++ codec in
    place (setup.py build_ext --inplace), runs the drivers and the codec from there (--where), and its default
    entry trains a few steps and writes an artifact whose code count is the pack file's own size. (~19 s of the
    codec's build on 2 cores.)"""
    f = tmp_path / "submission_code.py"
    f.write_bytes(art.code_pack_bytes())
    r = _run(f, "-m", "train.code_pack", "--where", timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    where = json.loads(r.stdout)
    tree = os.path.join(str(tmp_path), ".pgolf_code")
    assert where["train"].startswith(tree) and where["pgolf_kernels"].startswith(tree), where
    assert where["codec"].startswith(tree) and where["codec"].endswith(".so"), where
    # the tiny preset and no compile on any machine (on a GPU host "auto" would train the full record model); 2,048
    # validation tokens for the run's four evals (the whole 34,008-token fixture split took 9 s more of its 24 s)
    r = _run(f, "--preset", "tiny", "--compile", "0", "--iterations", "3", "--val-every", "0", "--val-max-tokens",
             "2048", "--runs-dir", str(tmp_path / "runs"), "--run-id", "t", timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    summary = json.load(open(tmp_path / "runs" / "t" / "summary.json"))
    a = summary["artifact"]
    assert a["bytes_code"] == os.path.getsize(f) == os.path.getsize(a["code_path"])
    assert open(a["code_path"], "rb").read() == f.read_bytes()
