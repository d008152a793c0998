"""Compile the LoRA, linear_act, head_norm_rope and mix_norm kernels for sm_90a on any machine (no GPU needed) and report what
ptxas reports.

``python -m pgolf_kernels.sm90_check [filter ...]`` prints, per kernel variant: registers per thread, spill
bytes, shared memory, and whether the K/N loops were software-pipelined (cp.async copies, or TMA copies for the
tensor-descriptor kernels, in the TTGIR). It uses
Triton's own compiler and bundled ptxas with the argument attributes a real launch at the benchmark shapes would get
(16-byte aligned pointers; T, d, out_i multiples of 16). Without those attributes Triton does not pipeline at all,
so a check that leaves them out reports the wrong kernel.

Why it exists: GPU time is scarce; compile errors, register spills and an unpipelined loop are visible here, on
a host without a GPU, before GPU time is spent. It predicts no timings.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time


def ptxas_report(ptx: str):
    """Assemble ``ptx`` for sm_90a with Triton's bundled ptxas -> (registers per thread or None, spill-store bytes,
    the completed process: its return code and stderr)."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        out = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", out.stderr)
    spill = re.search(r"(\d+) bytes spill stores", out.stderr)
    return int(regs.group(1)) if regs else None, int(spill.group(1)) if spill else 0, out


def _compile(fn, types, consts, num_warps, num_stages, div16=("T", "D", "N0", "N1", "N2", "N3")):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {n: ("constexpr" if n in consts else types[n]) for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n not in consts and (sig[n].startswith("*") or n in div16)}
    t = time.time()
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
    regs, spill, out = ptxas_report(k.asm["ptx"])
    ttg = k.asm["ttgir"]
    return dict(regs=regs, spill_bytes=spill,
                smem=k.metadata.shared, async_copies=ttg.count("async_copy_global_to_local"), tma_copies=ttg.count("async_tma_copy_global_to_local"),
                async_wgmma="isAsync = true" in ttg,
                wgmma=ttg.count("warp_group_dot "), serialized_wgmma="C7515" in out.stderr,
                # 16-byte global accesses against 2-byte scalar ones (an element-wise kernel should have no scalar
                # access on its tensors: a lost divisibility hint shows here)
                ld_v4=k.asm["ptx"].count("ld.global.v4"), st_v4=k.asm["ptx"].count("st.global.v4"),
                ld_b16=k.asm["ptx"].count("ld.global.b16"), st_b16=k.asm["ptx"].count("st.global.b16"),
                compile_s=round(time.time() - t, 1))


def _dot_precision(dtype: str, RP: int) -> str:
    """The ``IP`` a LoRA launch on ``dtype`` ("bf16" / "fp16" / "fp32") at padded rank ``RP`` gets
    (``lora_triton.lora_dot_precision``)."""
    import torch

    from .lora_triton import lora_dot_precision

    return lora_dot_precision({"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype], RP)


def fwd_stats(RP=16, BT=128, BN=256, BK=64, num_warps=8, num_stages=3, quant=False, ns=2, dtype="bf16", ip=None):
    from . import lora_triton as K

    types = {"X": f"*{dtype}", "LEN": "*i64", "IDX": "*i64", "alpha": "fp32"}
    for i in range(4):
        types.update({f"Y{i}": f"*{dtype}", f"W{i}": "*i8" if quant else f"*{dtype}",
                      f"S{i}": "*fp16" if quant else f"*{dtype}", f"A{i}": f"*{dtype}", f"B{i}": f"*{dtype}",
                      f"N{i}": "i32", f"R{i}": "i32"})
    types.update({n: "i32" for n in ("C1", "C2", "C3", "T", "D", "n_adapters", "NT", "TT")})
    consts = dict(NS=ns, HAS_SCALE=quant, HAS_LEN=True, HAS_IDX=False, BT=BT, BN=BN, BK=BK, RP=RP,
                  IP=ip or _dot_precision(dtype, RP))
    return _compile(K._fwd_kernel, types, consts, num_warps, num_stages)


def bwd_stats(RP=16, BT=128, BN=128, BD=128, BK=64, num_warps=8, num_stages=2, split=False, ns=2, dtype="bf16",
              phase=0, ip=None):
    """phase 0: the one-launch backward; 1 / 2: the "G once" G pass / dx pass (lora_triton.bwd_g_once)."""
    from . import lora_triton as K

    types = {"X": f"*{dtype}", "DX": f"*{dtype}", "LEN": "*i64", "IDX": "*i64", "alpha": "fp32"}
    for i in range(4):
        types.update({f"DY{i}": f"*{dtype}", f"W{i}": f"*{dtype}", f"A{i}": f"*{dtype}", f"B{i}": f"*{dtype}",
                      f"DA{i}": "*fp32", f"DB{i}": "*fp32", f"G{i}": f"*{dtype}", f"N{i}": "i32", f"R{i}": "i32"})
    types.update({n: "i32" for n in ("T", "D", "n_adapters", "TT", "TSPLIT", "DT")})
    consts = dict(NS=ns, HAS_LEN=True, HAS_IDX=False, GRAD_IDX=True, COMPUTE_DX=True, BASE=not split,
                  LOAD_DX=split, PHASE=phase, BT=BT, BN=BN, BD=BD, BK=BK, RP=RP,
                  IP=ip or _dot_precision(dtype, RP))
    return _compile(K._bwd_kernel, types, consts, num_warps, num_stages)


# shared memory an sm_90 block may use (227 KB, H100 / H200): a variant above it compiles but cannot launch
SMEM_LIMIT = 232448


def linear_act_stats(BM=128, BN=128, BK=64, num_warps=8, num_stages=3, act=1, save=False, w_kn=False, per_row=True,
                     dtype="bf16", res=False, x2=False, SUBTILE=False, PER_SM=1):
    """``linear_act._linear_act_kernel`` with host tensor descriptors (act 0 none, 1 leaky_relu², 2 its derivative
    with W read as (K, N), as the fused MLP's backward launches it; 3 leaky_relu² with h's packed signs, 4 the
    derivative from act(h) and those signs; ``res``: the residual epilogue of
    ``linear_residual`` (act 0), ``x2``: with its second product, a LoRA's expand; ``SUBTILE``: the epilogue on two
    (BM, BN / 2) halves; ``PER_SM``: programs per SM, which share its shared memory)."""
    from . import linear_act as L

    BNE = BN // 2 if SUBTILE else BN
    wblk = f"[1,{BK},{BN}]" if w_kn else f"[1,{BN},{BK}]"
    types = {"x_desc": f"tensordesc<{dtype}[1,{BM},{BK}]>", "w_desc": f"tensordesc<{dtype}{wblk}>",
             "y_desc": f"tensordesc<{dtype}[1,{BM},{BNE}]>", "h_desc": f"tensordesc<{dtype}[1,{BM},{BNE}]>",
             "x2_desc": f"tensordesc<{dtype}[1,{BM},{BK}]>", "w2_desc": f"tensordesc<{dtype}[1,{BN},{BK}]>",
             "s_ptr": f"*{dtype}", "sg_ptr": "*u8", "B": "i32", "T": "i32", "N": "i32", "K": "i32", "R": "i32", "slope": "fp32"}
    consts = dict(BM=BM, BN=BN, BK=BK, ACT=act, SAVE_PRE=save, PER_ROW_W=per_row, W_KN=w_kn, HAS_X2=x2, RES=res,
                  SUBTILE=SUBTILE, NUM_PROGS=132, PRECISION="ieee" if dtype == "fp32" else "tf32")
    s = _compile(L._linear_act_kernel, types, consts, num_warps, num_stages, div16=("T", "N", "K", "R"))
    # two programs per SM share its 228 KB, each with 1 KB reserved
    s["fits_smem"] = s["smem"] <= (SMEM_LIMIT if PER_SM == 1 else 228 * 1024 // PER_SM - 1024)
    return s


def sum_products_stats(nsrc=3, dtype="bf16", BM=128, BN=256, BK=64, num_warps=8, num_stages=3):
    """``lora_merged._sum_products_kernel`` (the merged backward's dx over ``nsrc`` sources) with host descriptors."""
    from . import lora_merged as M

    types = {"y_desc": f"tensordesc<{dtype}[1,{BM},{BN}]>", "B": "i32", "T": "i32", "N": "i32", "K0": "i32",
             "K1": "i32", "K2": "i32", "K3": "i32"}
    for i in range(M.MAX_SOURCES):
        types[f"x{i}_desc"] = f"tensordesc<{dtype}[1,{BM},{BK}]>"
        types[f"w{i}_desc"] = f"tensordesc<{dtype}[1,{BK},{BN}]>"
    consts = dict(BM=BM, BN=BN, BK=BK, NSRC=nsrc, NUM_PROGS=132, PRECISION="ieee" if dtype == "fp32" else "tf32")
    s = _compile(M._sum_products_kernel, types, consts, num_warps, num_stages, div16=("T", "N", "K0", "K1", "K2", "K3"))
    s["fits_smem"] = s["smem"] <= SMEM_LIMIT
    return s


CASES = {
    "fwd r<=16 (default)": lambda: fwd_stats(RP=16),
    "fwd r=96 (default)": lambda: fwd_stats(RP=128, num_stages=2),
    "fwd r<=16 BN=128": lambda: fwd_stats(RP=16, BN=128),
    "fwd r=96 BN=128": lambda: fwd_stats(RP=128, BN=128, num_stages=2),
    "fwd int6 r<=16": lambda: fwd_stats(RP=16, quant=True),
    "bwd fused r<=16 (default)": lambda: bwd_stats(RP=16),
    "bwd fused r=96 (default)": lambda: bwd_stats(RP=128, BN=64),
    "bwd split r<=16": lambda: bwd_stats(RP=16, split=True),
    "bwd split r=96": lambda: bwd_stats(RP=128, BN=64, split=True),
    "bwd G-once G pass r<=16": lambda: bwd_stats(RP=16, phase=1),
    "bwd G-once dx pass r<=16": lambda: bwd_stats(RP=16, phase=2),
    "bwd G-once G pass r=96": lambda: bwd_stats(RP=128, BN=64, phase=1),
    "bwd G-once dx pass r=96": lambda: bwd_stats(RP=128, BN=64, phase=2),
}
def _linear_act_cases():
    """Every tile config of ``linear_act.TILE_CONFIGS`` (the bench's candidates) in each epilogue."""
    from .linear_act import TILE_CONFIGS

    for c in TILE_CONFIGS:
        for name, kw in (("none", dict(act=0)), ("act", dict(act=1)), ("act+h", dict(act=1, save=True)),
                         ("grad", dict(act=2, w_kn=True)), ("residual+lora", dict(act=0, res=True, x2=True)),
                         ("act+signs", dict(act=3)), ("grad from signs", dict(act=4, w_kn=True))):
            yield (f"linear_act {name} {c['BM']}x{c['BN']} w{c['num_warps']} s{c['num_stages']}"
                   f"{' sub' if c.get('SUBTILE') else ''}{' x' + str(c['PER_SM']) if c.get('PER_SM', 1) > 1 else ''}",
                   lambda c=c, kw=kw: linear_act_stats(**c, **kw))


CASES.update(_linear_act_cases())
CASES.update({f"sum_products {n} sources": (lambda n=n: sum_products_stats(n)) for n in (1, 2, 3, 4)})


def head_norm_rope_stats(bwd=False, gain=True, need_dg=True, P=32, BT=64, dtype="bf16"):
    """``head_norm_rope``'s forward or backward kernel as the op launches it on a GPU (BT 64, 4 warps, head dim 2P;
    either output layout: its strides are arguments)."""
    from . import head_norm_rope as M

    ptrs = ("DY", "X", "COS", "SIN", "G", "DX", "DG") if bwd else ("X", "COS", "SIN", "G", "Y")
    types = {n: ("*fp32" if n == "DG" else f"*{dtype}") for n in ptrs}
    ints = ("T", "H", "sxb", "sxt", "sob", "soh", "sot", "sdb", "sdt", "n_tiles") if bwd else \
        ("T", "sxb", "sxt", "sob", "soh", "sot")
    types.update({n: "i32" for n in ints}, eps="fp32")
    consts = dict(HAS_GAIN=gain, P=P, BT=BT) | (dict(NEED_DG=need_dg) if bwd else {})
    # the strides as a real launch specializes them: multiples of 16 at the records' shapes (Triton's integer
    # specialization); without the batch strides' hint the kernels fall back to 2-byte accesses
    return _compile(M._head_norm_rope_bwd_kernel if bwd else M._head_norm_rope_fwd_kernel, types, consts, 4, 3,
                    div16=("T", "sxb", "sxt", "sob", "soh", "sot", "sdb", "sdt"))


CASES.update({"head_norm_rope fwd q": lambda: head_norm_rope_stats(),
              "head_norm_rope fwd k": lambda: head_norm_rope_stats(gain=False),
              "head_norm_rope bwd q": lambda: head_norm_rope_stats(bwd=True),
              "head_norm_rope bwd k": lambda: head_norm_rope_stats(bwd=True, gain=False, need_dg=False)})


def mix_norm_stats(bwd=False, has_mix=True, has_gxm=True, need_dx0=False, rows=8, num_warps=4, d=512, dtype="bf16"):
    """``mix_norm``'s forward (the mix + norm, or the norm alone) or backward kernel as the op launches it on a GPU
    (``NORM_CONFIG``'s tile: 8 rows of d 512, 4 warps; the row count and d multiples of 16 at the records' shapes)."""
    from . import mix_norm as M

    if bwd:
        fn, ptrs = M._mix_norm_bwd_kernel, ("XM", "GH", "GXM", "MIX", "DX", "DX0")
        consts = dict(HAS_GXM=has_gxm, NEED_DX0=need_dx0, BLOCK_R=rows, BLOCK_D=d)
    else:
        fn, ptrs = M._mix_norm_kernel, ("X", "X0", "MIX", "XM", "H")
        consts = dict(HAS_MIX=has_mix, BLOCK_R=rows, BLOCK_D=d)
    types = {n: f"*{dtype}" for n in ptrs}
    types.update(R="*fp32", M="i32", D="i32", eps="fp32")
    return _compile(fn, types, consts, num_warps, 3, div16=("M", "D"))


CASES.update({"mix_norm fwd mix": lambda: mix_norm_stats(),
              "mix_norm fwd norm": lambda: mix_norm_stats(has_mix=False),
              "mix_norm bwd": lambda: mix_norm_stats(bwd=True),
              "mix_norm bwd dx0": lambda: mix_norm_stats(bwd=True, need_dx0=True)})


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter replaces the compiler")
        return 2
    filt = (argv if argv is not None else sys.argv[1:])
    rc = 0
    for name, f in CASES.items():
        if filt and not any(s in name for s in filt):
            continue
        try:
            print(f"{name:28s} {f()}", flush=True)
        except Exception as e:  # report every case
            rc = 1
            print(f"{name:28s} FAILED {type(e).__name__}: {str(e)[:500]}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
