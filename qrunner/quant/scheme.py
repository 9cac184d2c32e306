"""Weight-only integer quantization scheme: a small immutable value object."""

from __future__ import annotations

import math
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
