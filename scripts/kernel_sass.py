"""Compile the package's Triton kernels for sm_90 on any machine (no GPU needed: triton ships ptxas) and write the
SASS of every production tile config, one file per variant, so that a change meant to keep the kernels as they are
can be checked against the machine code:

    PYTHONPATH=<tree A> python3 scripts/kernel_sass.py /tmp/sass_a
    PYTHONPATH=<tree B> python3 scripts/kernel_sass.py /tmp/sass_b
    diff -r /tmp/sass_a /tmp/sass_b

(optional arguments after OUT_DIR: variant name prefixes to compile, e.g. ``ns_`` or ``i6_dx``).

Variants: int6_linear fwd/dx for every ``_CONFIGS`` tuple (EVEN 0/1, bf16; fwd also fp16 with bias), QAT fwd/dx for
every ``_CONFIGS`` tuple (fp32 W, EVEN 0/1), the QAT row-scale kernel per clip mode, the Newton-Schulz kernels at
``GPU_CONFIG`` and ``SMALL_GPU_CONFIG`` (EVEN 0/1, FINAL 0/1) plus the pack kernel, and the multi-LoRA forward at
rank pads 16 and 128. Pointer and int arguments carry the divisible-by-16 hint a real launch gives them. About
100 compiles: ~8 min on 2 CPU cores. Line info stays on (as in a real launch): it can move ptxas's schedule.
"""
import hashlib
import os
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp())

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import pgolf_kernels.int6_linear as I6  # noqa: E402
import pgolf_kernels.lora_triton as LT  # noqa: E402
import pgolf_kernels.newton_schulz as NS  # noqa: E402
import pgolf_kernels.qat as QA  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_sass(out_dir, only, name, fn, types, consts, warps, stages, no_hint=()):
    """Write ``out_dir/<name>-<constexprs>-w<warps>s<stages>.sass`` (only if ``name`` starts with one of ``only``,
    when given); arguments not in ``types`` are *bf16 pointers (names ending in "ptr") or i32."""
    if only and not name.startswith(tuple(only)):
        return
    sig, attrs = {}, {}
    for i, a in enumerate(fn.arg_names):
        if a in consts:
            sig[a] = "constexpr"
            continue
        t = types.get(a, "*bf16" if a.endswith("ptr") else "i32")
        sig[a] = t
        if (t.startswith("*") or t == "i32") and a not in no_hint:
            attrs[(i,)] = [["tt.divisibility", 16]]
    tag = name + "-" + "-".join(f"{k}{v}" for k, v in consts.items()) + f"-w{warps}s{stages}"
    c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), target=TARGET,
                       options={"num_warps": warps, "num_stages": stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(c.asm["cubin"])
        f.flush()
        sass = subprocess.run([CUOBJDUMP, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    with open(os.path.join(out_dir, tag + ".sass"), "w") as f:
        f.write(sass)
    print(tag, hashlib.sha1(sass.encode()).hexdigest()[:10], flush=True)


def main(out_dir, only=()):
    os.makedirs(out_dir, exist_ok=True)
    run = lambda *a, **k: compile_sass(out_dir, only, *a, **k)  # noqa: E731
    autotune_keys = ("M_BUCKET", "CFG_MASK")  # do_not_specialize: no hint
    i6 = dict(q_ptr="*i8", s_ptr="*fp16", ws_ptr="*fp32", cnt_ptr="*i32")
    for c in I6._CONFIGS:
        for even in (1, 0):
            run("i6_fwd", I6._fwd_kernel, i6, dict(HAS_BIAS=0, PREC="tf32", **I6._fwd_cfg_dict(c), EVEN_K=even),
                c[5], c[6], autotune_keys)
            run("i6_dx", I6._dx_kernel, i6, dict(PREC="tf32", **I6._dx_cfg_dict(c), EVEN_N=even), c[5], c[6],
                autotune_keys)
        run("i6_fwd", I6._fwd_kernel, dict(i6, x_ptr="*fp16", y_ptr="*fp16", b_ptr="*fp16"),
            dict(HAS_BIAS=1, PREC="tf32", **I6._fwd_cfg_dict(c), EVEN_K=1), c[5], c[6], autotune_keys)
    qw = dict(w_ptr="*fp32", s_ptr="*fp32")
    for c in QA._CONFIGS:
        for even in (1, 0):
            run("qat_fwd", QA._qat_fwd_kernel, qw,
                dict(QMAX=31, HAS_BIAS=even, PREC="tf32", BM=c[0], BN=c[1], BK=c[2], EVEN_K=even), c[3], c[4])
            run("qat_dx", QA._qat_dx_kernel, qw, dict(QMAX=31, PREC="tf32", BM=c[0], BK=c[1], BN=c[2], EVEN_N=even),
                c[3], c[4])
    for mode in (0, 1, 2):
        run("qat_rowscale", QA._row_scale_kernel, dict(qw, cand_ptr="*fp32", CLIP_K="fp32"),
            dict(QMAX=31, MODE=mode, NF=17, NC=23, BR=16, BK=512), 4, 3)
    for cfg in (NS.GPU_CONFIG, NS.SMALL_GPU_CONFIG):
        for even in (1, 0):
            run("ns_gram", NS._ns_gram_kernel, dict(X="*bf16", A="*bf16", items="*i64"),
                dict(BLOCK=cfg["g_block"], BK=cfg["g_bk"], EVEN=even, IEEE=0), cfg["g_warps"], cfg["g_stages"])
            run("ns_square", NS._ns_square_kernel, dict(A="*bf16", Bm="*bf16", items="*i64", b="fp32", c="fp32"),
                dict(BLOCK=cfg["s_block"], BK=cfg["s_bk"], EVEN=even, IEEE=0), cfg["s_warps"], cfg["s_stages"])
            for final in (0, 1):
                run("ns_update", NS._ns_update_kernel, dict(X="*bf16", Bm="*bf16", Y="*bf16", items="*i64", a="fp32"),
                    dict(BM=cfg["u_bm"], BN=cfg["u_bn"], BK=cfg["u_bk"], EVEN=even, FINAL=final, IEEE=0),
                    cfg["u_warps"], cfg["u_stages"])
    for trans in (0, 1):
        run("ns_pack", NS._ns_pack_kernel, dict(G="*bf16", X="*bf16", den="*fp32", x_base="i64"),
            dict(TRANS=trans, BR=64, BC=64), 4, 3)
    lora = dict(X="*bf16", LEN="*i32", IDX="*i32", alpha="fp32")
    for i in range(4):
        lora.update({f"W{i}": "*i8", f"S{i}": "*fp16", f"A{i}": "*bf16", f"B{i}": "*bf16", f"Y{i}": "*bf16"})
    for rp in (16, 128):
        run("lora_fwd", LT._fwd_kernel, lora,
            dict(NS=2, HAS_SCALE=1, HAS_LEN=1, HAS_IDX=1, BT=128, BN=256, BK=64, RP=rp, IP="tf32"), 8,
            3 if rp <= 32 else 2)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: PYTHONPATH=<tree> python3 scripts/kernel_sass.py OUT_DIR [NAME_PREFIX ...]")
    main(sys.argv[1], sys.argv[2:])
