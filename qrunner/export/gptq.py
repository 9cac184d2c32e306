"""GPTQ v1 (``quant_method: gptq``) checkpoint tensors and config; no file I/O.

The tensors are AutoRound's symmetric packing (``qweight``, ``qzeros`` storing zero - 1, ``scales``) plus
``g_idx`` (int32 ``[in]``, input channel i in group ``i // group_size``), which GPTQ loaders (vLLM's ``gptq`` /
``gptq_marlin``, GPTQModel, auto-round's GPTQ path in transformers) read. Layers whose scheme differs from the
model's go in GPTQModel's ``dynamic`` dict: ``"-:regex": {}`` skips a layer (left in full precision),
``"+:regex": {bits, group_size, sym}`` overrides one; vLLM applies the rules in dict order and the first match wins,
so the ``-:`` rules come first. No ``meta`` key: transformers' AutoRound path refuses configs that carry one.

Symmetric schemes only: GPTQ v1 stores ``zero - 1``, so an asymmetric group whose zero point is 0 cannot be
stored (loaders disagree on the wrap-around); asymmetric runs go to ``compressed_tensors`` or ``auto_round``.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from qrunner.export.auto_round import checkpoint_group_size, pack_layer
from qrunner.quant.rtn import QuantizedWeight
from qrunner.quant.scheme import QuantScheme

QUANTIZE_CONFIG_FILE = "quantize_config.json"


def pack_gptq_layer(qw: QuantizedWeight, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``{"qweight", "qzeros", "scales", "g_idx"[, "bias"]}`` for one linear layer (symmetric only)."""
    if not qw.sym:
        raise ValueError("GPTQ v1 export is for symmetric schemes only (it stores zero - 1)")
    tensors = pack_layer(qw, bias)
    group = checkpoint_group_size(qw.in_features, qw.group_size)
    group = qw.in_features if group <= 0 else group
    tensors["g_idx"] = (torch.arange(qw.in_features, dtype=torch.int32) // group).contiguous()
    return tensors


def layer_regex(name: str) -> str:
    """A regex matching exactly one module name (what ``dynamic`` keys hold after their ``+:`` / ``-:``)."""
    return "^" + re.escape(name) + "$"


def dynamic_rules(layers: Sequence[Mapping[str, Any]], scheme: QuantScheme) -> dict[str, dict[str, Any]]:
    """GPTQModel's ``dynamic``: ``-:`` rules (layers left in full precision) first, then ``+:`` rules with the
    keys that differ from the model's scheme (bits, group size as written, symmetry)."""
    skips: dict[str, dict[str, Any]] = {}
    overrides: dict[str, dict[str, Any]] = {}
    for p in layers:
        if not p["quantize"]:
            skips[f"-:{layer_regex(p['name'])}"] = {}
            continue
        written = {"bits": p["bits"], "group_size": checkpoint_group_size(p["in_features"], p["group_size"]),
                   "sym": p["sym"]}
        if any(written[k] != getattr(scheme, k) for k in written):
            overrides[f"+:{layer_regex(p['name'])}"] = written
    return {**skips, **overrides}


def gptq_config(scheme: QuantScheme, block_names: Sequence[str], layers: Sequence[Mapping[str, Any]],
                iters: int) -> dict[str, Any]:
    """The ``quantization_config`` (also written alone as ``quantize_config.json``)."""
    if not scheme.sym or any(p["quantize"] and not p["sym"] for p in layers):
        raise ValueError("GPTQ v1 export is for symmetric schemes only")
    config: dict[str, Any] = {
        "quant_method": "gptq",
        "bits": scheme.bits,
        "group_size": scheme.group_size,
        "sym": True,
        "desc_act": False,
        "true_sequential": False,
        "damp_percent": 0.01,
        "static_groups": False,
        "checkpoint_format": "gptq",
        "lm_head": False,
        "block_name_to_quantize": ",".join(block_names),
        "provider": "qrunner",
        "iters": iters,
    }
    dynamic = dynamic_rules(layers, scheme)
    if dynamic:
        config["dynamic"] = dynamic
    return config
