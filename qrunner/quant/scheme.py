"""Weight-only integer quantization scheme: a small immutable value object."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

SUPPORTED_BITS: tuple[int, ...] = (2, 3, 4, 8)
SUPPORTED_DATA_TYPES: tuple[str, ...] = ("int",)


@dataclass(frozen=True)
class QuantScheme:
    """How one linear layer's weight is quantized.

    ``group_size`` counts input channels sharing one scale/zero point;
    ``-1`` means one group per output row (per-channel).
    """

    bits: int
    group_size: int
    sym: bool
    data_type: str = "int"

    def __post_init__(self) -> None:
        validate_scheme(self)

    def n_groups(self, in_features: int) -> int:
        """Number of groups along the input dimension (ceil division)."""
        if in_features <= 0:
            raise ValueError(f"in_features must be positive, got {in_features}")
        if self.group_size == -1:
            return 1
        return math.ceil(in_features / self.group_size)

    def effective_group_size(self, in_features: int) -> int:
        """Group size with ``-1`` resolved to ``in_features``."""
        return in_features if self.group_size == -1 else self.group_size


def validate_scheme(scheme: QuantScheme) -> None:
    """Raise ValueError naming the bad field and the allowed values."""
    if isinstance(scheme.bits, bool) or scheme.bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={scheme.bits!r} is not supported; allowed: {list(SUPPORTED_BITS)}")
    if isinstance(scheme.group_size, bool) or not isinstance(scheme.group_size, int):
        raise ValueError(f"group_size must be an int, got {scheme.group_size!r}")
    if scheme.group_size != -1 and scheme.group_size <= 0:
        raise ValueError(f"group_size={scheme.group_size} is not allowed; use -1 (per-channel) or a positive integer")
    if not isinstance(scheme.sym, bool):
        raise ValueError(f"sym must be a bool, got {scheme.sym!r}")
    if scheme.data_type not in SUPPORTED_DATA_TYPES:
        raise ValueError(f"data_type={scheme.data_type!r} is not supported; allowed: {list(SUPPORTED_DATA_TYPES)}")


FULL_PRECISION_NAMES: tuple[str, ...] = ("bf16", "fp16")
_NAME = re.compile(r"w(\d+)a16(?:g(-1|\d+))?(_asym)?")


def parse_scheme_name(name: str) -> QuantScheme | None:
    """A scheme from its short name: ``w<bits>a16`` with an optional ``g<group size>`` (default 128, ``g-1`` one
    group per row) and ``_asym``; e.g. ``w4a16``, ``w2a16g64``. ``bf16``/``fp16`` (full precision) give None.
    Raises ValueError naming the accepted forms."""
    text = str(name).strip().lower()
    if text in FULL_PRECISION_NAMES:
        return None
    match = _NAME.fullmatch(text)
    if not match:
        raise ValueError(f"{name!r} is not a scheme name; use w<bits>a16[g<group size>][_asym] (e.g. w4a16, "
                         f"w2a16g64) or bf16")
    group = int(match.group(2)) if match.group(2) is not None else 128
    return QuantScheme(bits=int(match.group(1)), group_size=group, sym=match.group(3) is None)
