"""pgolf_kernels: fused Triton kernels for parameter-golf-style tiny language models.

* int6 (and int5/7/8) dequant-matmul straight from the artifact's codes: ``int6_linear``,
  ``Int6Linear`` (``pgolf_kernels.int6_linear``), with the codec in ``pgolf_kernels.quant``.
* batched multi-LoRA projection, one adapter per document: ``pgolf_kernels.lora``.
* Newton-Schulz orthogonalization and the Muon optimizer: ``pgolf_kernels.newton_schulz``,
  ``pgolf_kernels.muon``; a Muon step's element-wise passes (momentum, decay + update), each fused:
  ``pgolf_kernels.muon_update``.
* a linear layer with its activation (leaky_relu(h, 0.5)², the record models' MLP) in the GEMM's epilogue, one
  persistent TMA kernel (``pgolf_kernels.linear_act``; Hopper; the TTT eval's ``--fused-mlp``).
* the attention's per-head RMSNorm, gain and rotary of q or k in one pass (``pgolf_kernels.head_norm_rope``; the TTT
  eval's ``--fused-qk``).
* the U-Net skip x + w ⊙ s in one vectorized pass each way: ``pgolf_kernels.skip_add``.
* one Adam / AdamW step over stacked per-document adapter rows in one pass (the TTT eval's optimizer):
  ``pgolf_kernels.adam_rows``.
* drop-in for a parameter-golf record script (``apply(globals())`` swaps its Muon for the grouped NS):
  ``pgolf_kernels.patch``.

Importing the package never touches the GPU and never loads the compiled extension;
submodules are imported lazily on first attribute access.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> submodule that defines it. The functions `int6_linear` and `newton_schulz`
# (and `linear_act`, `head_norm_rope`) share their submodule's name, so they are NOT re-exported here (once the
# submodule is imported, Python binds the package attribute to the module and a lazy alias would flip
# between function and module). Import them from their modules:
#     from pgolf_kernels.int6_linear import int6_linear
#     from pgolf_kernels.newton_schulz import newton_schulz
_LAZY = {
    "Int6Linear": "int6_linear",
    "convert_linears_to_int6": "int6_linear",
    "quantize_rows": "quant",
    "dequantize": "quant",
    "QTensor": "quant",
    "pack_artifact": "quant",
    "unpack_artifact": "quant",
    "multi_lora_linear": "lora",
    "BatchedLoRALinear": "lora",
    "newton_schulz_many": "newton_schulz",
    "Muon": "muon",
    "momentum_update": "muon_update",
    "decay_add_": "muon_update",
    "adam_rows_step_": "adam_rows",
    "LinearLeakyReLUSquared": "linear_act",
    "LeakyReLUSquaredMLP": "linear_act",
    "mlp_leaky_sq": "linear_act",
    "HeadNormRope": "head_norm_rope",
    "UNetSkip": "skip_add",
    "skip_fork": "skip_add",
    "skip_join": "skip_add",
    "skip_join_inline": "skip_add",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'pgolf_kernels' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{mod}", __name__), name)


def __dir__():
    return sorted(list(globals()) + __all__)
