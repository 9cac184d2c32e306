"""compressed-tensors ``pack-quantized`` checkpoint tensors and config (vLLM's native format); no file I/O.

Per quantized linear ``L`` with weight ``[out, in]``:

* ``L.weight_packed``: int32 ``[out, in * bits / 32]``, each code stored unsigned as ``q_signed + 2^(bits-1)`` in
  one LSB-first bit stream along the input dimension (``pack_cols``: 32/bits values a word at 2/4/8 bits; at 3 bits
  the dense stream of compressed-tensors >= 0.18, which older releases do not read);
* ``L.weight_scale``: ``[out, groups]``, float16 as qrunner's scales are (so the codes and scales are the ones every
  other format carries; loaders cast them to the model's dtype);
* ``L.weight_shape``: int64 ``[2]`` = ``(out, in)``;
* ``L.weight_zero_point`` (asymmetric only): int32 ``[out * bits / 32, groups]``, the signed zero point stored the
  same way, packed along the output dimension. Symmetric checkpoints carry none.

For qrunner's unsigned codes ``w = scale * (q - zero)``: the signed code is ``q - 2^(bits-1)`` and the signed zero
point ``zero - 2^(bits-1)``, so the stored values are ``q`` and ``zero`` themselves.

The config has one ``config_groups`` entry per distinct (bits, group size as written, symmetry): with one group it
targets ``Linear`` and ``ignore`` lists every other linear; with several, each targets its layers by name and the
top-level ``format`` is ``mixed-precision``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from qrunner.export.auto_round import checkpoint_group_size, checkpoint_groups
from qrunner.quant.packing import pack_cols, pack_rows
from qrunner.quant.rtn import QuantizedWeight

FORMAT = "pack-quantized"
SCHEME_KEYS = ("bits", "group_size", "sym")


def pack_ct_layer(qw: QuantizedWeight, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``{"weight_packed", "weight_scale", "weight_shape"[, "weight_zero_point"][, "bias"]}`` for one layer; the
    bias is written in its own dtype, as an unquantized tensor is."""
    out_f, in_f = qw.out_features, qw.in_features
    scale, zero = checkpoint_groups(qw)
    if qw.sym and bool((zero != 2 ** (qw.bits - 1)).any()):
        raise ValueError("a symmetric layer's zero points must all be 2^(bits-1)")
    tensors = {
        "weight_packed": pack_cols(qw.q.to(torch.int64), qw.bits),
        "weight_scale": scale.to(torch.float16).contiguous(),
        "weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64),
    }
    if not qw.sym:
        tensors["weight_zero_point"] = pack_rows(zero.to(torch.int64), qw.bits)
    if bias is not None:
        tensors["bias"] = bias.detach().cpu().contiguous()
    return {k: v.cpu().contiguous() for k, v in tensors.items()}


def written_scheme(layer: Mapping[str, Any]) -> tuple[int, int, bool]:
    """(bits, group size as written, symmetric) of a planned layer."""
    return int(layer["bits"]), checkpoint_group_size(int(layer["in_features"]), int(layer["group_size"])), \
        bool(layer["sym"])


def weights_args(bits: int, group_size: int, sym: bool) -> dict[str, Any]:
    """A config group's ``weights`` (compressed-tensors' ``QuantizationArgs``)."""
    grouped = group_size > 0
    return {"num_bits": bits, "type": "int", "symmetric": sym, "group_size": group_size if grouped else None,
            "strategy": "group" if grouped else "channel", "dynamic": False, "actorder": None,
            "block_structure": None, "observer": "minmax", "observer_kwargs": {}}


def ct_config(layers: Sequence[Mapping[str, Any]], all_linears: Sequence[str]) -> dict[str, Any]:
    """The ``quantization_config``: ``layers`` are the planned layers (name, quantize, bits, group_size, sym,
    in_features), ``all_linears`` every ``nn.Linear`` of the model (those not quantized go in ``ignore``)."""
    by_scheme: dict[tuple[int, int, bool], list[str]] = {}
    for p in layers:
        if p["quantize"]:
            by_scheme.setdefault(written_scheme(p), []).append(p["name"])
    if not by_scheme:
        raise ValueError("no quantized layer to export")
    quantized = {n for names in by_scheme.values() for n in names}
    mixed = len(by_scheme) > 1
    groups = {}
    for i, (key, names) in enumerate(sorted(by_scheme.items())):
        groups[f"group_{i}"] = {"targets": sorted(names) if mixed else ["Linear"], "weights": weights_args(*key),
                                "input_activations": None, "output_activations": None, "format": FORMAT}
    return {
        "quant_method": "compressed-tensors",
        "format": "mixed-precision" if mixed else FORMAT,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": sorted(n for n in all_linears if n not in quantized),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": "0.20.1",
    }
