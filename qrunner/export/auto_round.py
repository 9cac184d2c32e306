"""AutoRound (``quant_method: auto-round``) checkpoint tensors and config; no file I/O.

Matches what auto-round 0.16.1 writes and what transformers 5.24 + auto-round load
(``auto_round_extension.torch.qlinear_torch[_zp].QuantLinear`` on CPU):

* symmetric -> ``packing_format "auto_round:auto_gptq"``: ``qzeros`` stores ``zero - 1``
  (GPTQ v1; the loader adds 1 back), every word ``0x77777777`` at 4 bits;
* asymmetric, every quantized layer 4-bit -> ``packing_format "auto_round:auto_awq"`` (what AutoRound
  writes for 4-bit asym, and what vLLM and SGLang accept): AWQ's GEMM layout, ``qweight`` int32
  ``[in, out/8]`` and ``qzeros`` int32 ``[n_groups, out/8]`` packed along the output dimension in
  AWQ's nibble order (column ``8j+k`` at nibble ``AWQ_ORDER[k]``), the zero point itself;
* other asymmetric -> ``packing_format "auto_round"``: ``qzeros`` stores the zero point itself
  (transformers + auto-round load it; vLLM and SGLang do not).

Per linear ``L`` with weight ``[out, in]``: ``L.qweight`` int32 ``[in*bits/32, out]``,
``L.qzeros`` int32 ``[n_groups, out*bits/32]``, ``L.scales`` float16 ``[n_groups, out]``,
``L.bias`` float16 ``[out]`` if present; no ``g_idx``. The loader's kernels need in/out
divisible by 32 (:func:`layer_supported`).

A group size that does not divide ``in`` (a shorter last group: ``ceil(in / g)`` groups, as
AutoRound quantizes and packs it) is written under the layer's own group size
:func:`checkpoint_group_size` in ``extra_config``: ``-1`` when one group covers the row
(``in < g``), else ``gcd(in, g)`` with each group's scale and zero repeated ``g / gcd`` times.
The weights the loader dequantizes are the same; the reason is the loader: its CPU backends
(``auto_round:torch``/``torch_zp``) require ``in % group_size == 0`` and, for a layer they
reject, auto-round 0.16.1 falls back to ``auto_round:fake``, which ignores ``qweight`` and
leaves the layer's weight uninitialised (the load "succeeds", the forward pass fails).

Loader notes (checked against the real loader): ``config.json``'s ``quantization_config``
is all it reads (``quantization_config.json`` is written alongside only to mirror
AutoRound); on CPU without ``auto-round-lib`` it picks the pure-torch backend, whose
compute dtypes are float16/bfloat16, so a model requested in float32 is cast to float16
after loading ("Forced model to torch.float16").
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from qrunner.quant.packing import pack_cols, pack_rows, unpack_cols, unpack_rows
from qrunner.quant.rtn import QuantizedWeight
from qrunner.quant.scheme import QuantScheme

__all__ = [
    "AUTOROUND_FORMAT_VERSION",
    "PACKING_ASYM",
    "PACKING_AWQ",
    "PACKING_SYM",
    "QUANTIZATION_CONFIG_FILE",
    "checkpoint_group_size",
    "checkpoint_groups",
    "layer_supported",
    "model_packing",
    "pack_layer",
    "packing_format",
    "quantization_config",
    "unpack_layer",
]

PACKING_SYM = "auto_round:auto_gptq"  # zero point stored minus one
PACKING_ASYM = "auto_round"  # zero point stored as is
PACKING_AWQ = "auto_round:auto_awq"  # 4-bit asymmetric, AWQ GEMM layout
AWQ_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # nibble of column k of each 8 packed into one int32 word
# The auto-round release whose on-disk format this module reproduces (fixed so that the
# written config does not depend on which auto-round happens to be installed).
AUTOROUND_FORMAT_VERSION = "0.16.1"
QUANTIZATION_CONFIG_FILE = "quantization_config.json"

# Tuning parameters AutoRound leaves out of the config when they equal these defaults
# (auto_round.export.utils.filter_quantization_config); lr/minmax_lr depend on iters.
_TUNING_DEFAULTS: dict[str, Any] = {
    "amp": True,
    "batch_size": 8,
    "dataset": "NeelNanda/pile-10k",
    "enable_minmax_tuning": True,
    "enable_norm_bias_tuning": False,
    "enable_quanted_input": True,
    "gradient_accumulate_steps": 1,
    "low_gpu_mem_usage": False,
    "nsamples": 128,
    "scale_dtype": "torch.float16",
    "seqlen": 2048,
}
_CORE_KEYS = (
    "quant_method",
    "packing_format",
    "bits",
    "group_size",
    "sym",
    "data_type",
    "iters",
    "autoround_version",
    "block_name_to_quantize",
    "extra_config",
)
# The loader's stored-zero offsets per packing format.
_ZERO_OFFSET = {PACKING_SYM: 1, PACKING_ASYM: 0, "auto_round:gptqmodel": 0, PACKING_AWQ: 0}


def packing_format(sym: bool) -> str:
    """The ``packing_format`` AutoRound uses for integer weights of this symmetry."""
    return PACKING_SYM if sym else PACKING_ASYM


def model_packing(layers: Sequence[Mapping[str, Any]]) -> str:
    """The ``packing_format`` of a checkpoint whose planned layers are ``layers`` (dicts with quantize, bits, sym):
    AWQ when every quantized layer is 4-bit asymmetric, GPTQ-style when every one is symmetric, else plain."""
    quantized = [p for p in layers if p["quantize"]]
    if quantized and all(not p["sym"] and p["bits"] == 4 for p in quantized):
        return PACKING_AWQ
    return PACKING_SYM if all(p["sym"] for p in quantized) else PACKING_ASYM


def pack_awq(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes ``[rows, cols]`` -> int32 ``[rows, cols/8]`` in AWQ's order along the columns."""
    rows, cols = codes.shape
    if cols % 8:
        raise ValueError(f"AWQ packs 8 columns a word; {cols} columns")
    grouped = codes.to(torch.int64).reshape(rows, cols // 8, 8)
    shifts = torch.tensor(AWQ_ORDER, dtype=torch.int64) * 4
    words = (grouped << shifts).sum(dim=-1)
    return (words - (words >= 2**31).to(torch.int64) * 2**32).to(torch.int32)


def unpack_awq(words: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_awq`."""
    shifts = torch.tensor(AWQ_ORDER, dtype=torch.int64) * 4
    values = (words.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF
    return values.reshape(words.shape[0], -1)[:, :cols]


def layer_supported(in_features: int, out_features: int, scheme: QuantScheme) -> bool:
    """Whether the loader's kernels accept this layer shape (else leave it in full precision).

    Any group size is accepted: one that does not divide ``in_features`` is written as
    :func:`checkpoint_group_size` says.
    """
    if in_features <= 0 or out_features <= 0:
        return False
    return not (in_features % 32 or out_features % 32)


def checkpoint_group_size(in_features: int, group_size: int) -> int:
    """The group size a layer is written with: ``group_size`` when it divides ``in_features`` (or is -1);
    -1 when one (shorter) group covers the row; else ``gcd(in_features, group_size)``."""
    if group_size <= 0 or in_features % group_size == 0:
        return group_size
    if in_features < group_size:
        return -1
    return math.gcd(in_features, group_size)


def checkpoint_groups(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """``qw``'s scales and zero points ``[out, groups]`` as the checkpoint's group size lays them out."""
    in_f = qw.in_features
    written = checkpoint_group_size(in_f, qw.group_size)
    if written in (qw.group_size, -1):  # the scheme's own groups, or one group per row
        return qw.scale, qw.zero
    index = torch.arange(0, in_f, written, device=qw.scale.device) // qw.group_size
    return qw.scale[:, index], qw.zero[:, index]


def pack_layer(qw: QuantizedWeight, bias: torch.Tensor | None = None, packing: str | None = None
               ) -> dict[str, torch.Tensor]:
    """Checkpoint tensors ``{"qweight", "qzeros", "scales"[, "bias"]}`` for one linear layer in the checkpoint's
    ``packing`` (default: :func:`packing_format` of the layer's symmetry), grouped by :func:`checkpoint_group_size`
    (a shorter last group written as smaller groups with repeated scales)."""
    out_f, in_f = qw.out_features, qw.in_features
    if qw.q.shape != (out_f, in_f) or qw.scale.shape != qw.zero.shape or qw.scale.shape[0] != out_f:
        raise ValueError(
            f"inconsistent QuantizedWeight: q {tuple(qw.q.shape)}, scale {tuple(qw.scale.shape)}, "
            f"zero {tuple(qw.zero.shape)}"
        )
    if in_f % 32 or out_f % 32:
        raise ValueError(f"layer [{out_f}, {in_f}] cannot be packed: in/out features must be multiples of 32")
    g = in_f if qw.group_size <= 0 else qw.group_size
    if -(-in_f // g) != qw.n_groups:
        raise ValueError(f"{qw.n_groups} groups do not fit in_features={in_f} with group_size={qw.group_size}")
    scale, zero = checkpoint_groups(qw)
    packing = packing or packing_format(qw.sym)
    if packing == PACKING_AWQ:
        if qw.bits != 4 or qw.sym:
            raise ValueError(f"{PACKING_AWQ} carries 4-bit asymmetric layers only")
        tensors = {"qweight": pack_awq(qw.q.t()), "qzeros": pack_awq(zero.t()),
                   "scales": scale.t().to(torch.float16).contiguous()}
    else:
        stored_zero = zero.to(torch.int64) - _ZERO_OFFSET[packing]
        tensors = {
            "qweight": pack_rows(qw.q.t(), qw.bits),
            "qzeros": pack_cols(stored_zero.t(), qw.bits),
            "scales": scale.t().to(torch.float16).contiguous(),
        }
    if bias is not None:
        if bias.shape != (out_f,):
            raise ValueError(f"bias shape {tuple(bias.shape)} does not match out_features={out_f}")
        tensors["bias"] = bias.detach().to(device="cpu", dtype=torch.float16).contiguous()
    return {k: v.cpu().contiguous() for k, v in tensors.items()}


def unpack_layer(
    tensors: Mapping[str, torch.Tensor],
    bits: int,
    group_size: int,
    sym: bool,
    packing_format: str,
    in_features: int,
    out_features: int,
) -> QuantizedWeight:
    """Inverse of :func:`pack_layer` (any ``bias`` entry is ignored); ``group_size`` is the layer's
    group size in the checkpoint (:func:`checkpoint_group_size`)."""
    if packing_format not in _ZERO_OFFSET:
        raise ValueError(f"unsupported packing_format {packing_format!r}; known: {sorted(_ZERO_OFFSET)}")
    scales = tensors["scales"]
    n_groups = scales.shape[0]
    if packing_format == PACKING_AWQ:
        q = unpack_awq(tensors["qweight"], out_features).t()
        zero = unpack_awq(tensors["qzeros"], out_features)
    else:
        q = unpack_rows(tensors["qweight"], bits, in_features).t()
        zero = unpack_cols(tensors["qzeros"], bits, out_features) + _ZERO_OFFSET[packing_format]
    if q.shape != (out_features, in_features) or scales.shape[1] != out_features or zero.shape[0] != n_groups:
        raise ValueError("qweight / qzeros / scales shapes do not match the given in/out features")
    expected_groups = 1 if group_size == -1 else -(-in_features // group_size)
    if n_groups != expected_groups:
        raise ValueError(f"scales hold {n_groups} groups, group_size={group_size} implies {expected_groups}")
    return QuantizedWeight(
        q=q.to(torch.uint8).contiguous(),
        scale=scales.t().to(torch.float16).contiguous(),
        zero=zero.t().to(torch.int32).contiguous(),
        bits=bits,
        group_size=group_size,
        sym=sym,
    )


def _tuning_defaults(iters: int) -> dict[str, Any]:
    lr = 1.0 / iters if iters > 0 else 5e-3
    return {**_TUNING_DEFAULTS, "lr": lr, "minmax_lr": lr}


def quantization_config(
    scheme: QuantScheme,
    block_names: Sequence[str],
    iters: int,
    extra_config: Mapping[str, Mapping[str, Any]] | None = None,
    packing: str | None = None,
    **tuning_overrides: Any,
) -> dict[str, Any]:
    """The ``quantization_config`` dict for ``config.json`` / ``quantization_config.json``.

    ``block_names`` are module-list prefixes (``model.layers``); ``extra_config`` maps a
    layer name or regex to only the keys that differ (``{"bits": 16}`` = left in full
    precision) and is written only when non-empty. ``tuning_overrides`` (``lr``,
    ``nsamples``, ``seqlen``, ...) are written only when not None and different from
    AutoRound's defaults.
    """
    if isinstance(block_names, str) or not block_names or not all(isinstance(b, str) and b for b in block_names):
        raise ValueError(f"block_names must be a non-empty list of module prefixes, got {block_names!r}")
    if any("," in b for b in block_names):
        raise ValueError(f"block names must not contain commas: {list(block_names)}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be a non-negative int, got {iters!r}")
    clash = sorted(set(tuning_overrides) & set(_CORE_KEYS))
    if clash:
        raise ValueError(f"these keys are set from the scheme, not as tuning overrides: {clash}")

    config: dict[str, Any] = {
        "quant_method": "auto-round",
        "packing_format": packing or packing_format(scheme.sym),
        "bits": scheme.bits,
        "group_size": scheme.group_size,
        "sym": scheme.sym,
        "data_type": scheme.data_type,
        "iters": iters,
    }
    defaults = _tuning_defaults(iters)
    for key, value in tuning_overrides.items():
        if value is None or (key in defaults and defaults[key] == value):
            continue
        config[key] = value
    config["autoround_version"] = AUTOROUND_FORMAT_VERSION
    config["block_name_to_quantize"] = ",".join(block_names)
    if extra_config:
        config["extra_config"] = {name: dict(copy.deepcopy(cfg)) for name, cfg in extra_config.items()}
    return config
