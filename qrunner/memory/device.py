"""Where the block forwards run (`device=auto|cpu|cuda|cuda:N`) and how tensors get there and back.

Only the block being processed and the mini-batch in flight live on the device: rows (calibration inputs,
targets, chain outputs) stay where the memory mode keeps them (host RAM or row files) and travel one mini-batch at
a time; what a block produces comes back to the host before it is written. So the host holds no mirror of what is
on the device, and host RSS in each memory mode does not grow with a GPU.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, Optional

import torch

from qrunner.errors import UserError

HOST = torch.device("cpu")


def resolve_device(spec: str) -> torch.device:
    """`auto`: the first CUDA device when there is one, else the CPU; `cpu`; `cuda` (= cuda:0); `cuda:N`."""
    spec = str(spec).strip().lower()
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else HOST
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"device={spec}: not a device; use device=auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return HOST
    if device.type != "cuda":
        raise UserError(f"device={spec}: qrunner runs blocks on cpu or cuda devices; use device=auto, cpu, cuda or "
                        "cuda:N")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise UserError(f"device={spec}: this machine has no CUDA device torch can use (torch {torch.__version__}, "
                        f"CUDA build {torch.version.cuda or 'none'}); use device=cpu or device=auto")
    index = device.index or 0
    if index >= count:
        raise UserError(f"device={spec}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def to_device(value: Any, device: torch.device) -> Any:
    """`value` (a tensor, or dicts / tuples / lists of them) on `device`; other values as they are."""
    if isinstance(value, torch.Tensor):
        return value if value.device == device else value.to(device, non_blocking=device.type == "cuda")
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    return value


def to_host(value: Any) -> Any:
    return to_device(value, HOST)


class DeviceRows:
    """Rows read onto `device` one mini-batch at a time (the rows themselves stay where they are)."""

    def __init__(self, rows: Any, device: torch.device) -> None:
        self.rows, self.device = rows, device

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, indices: Any) -> Any:
        return to_device(self.rows.read(indices), self.device)


def on_device(rows: Any, device: torch.device) -> Any:
    """`rows` read onto `device` (the rows themselves on the CPU)."""
    return rows if device.type == "cpu" else DeviceRows(rows, device)


@contextmanager
def placed(module: torch.nn.Module, device: torch.device) -> Iterator[torch.nn.Module]:
    """`module` moved to `device` for the duration, and back to the host after (its parameters are the host's
    again: the device copies go with the context)."""
    if device.type == "cpu":
        yield module
        return
    try:
        module.to(device)  # inside: a move that runs out of device memory half-way is undone too
        yield module
    finally:
        module.to(HOST)
        release_device(device)


def release_device(device: torch.device) -> None:
    """Give the device's cached blocks back (so the next block, and other processes, find them free)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def device_total_mb(device: torch.device) -> Optional[float]:
    """The device's memory in MiB (None on the CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory / 2**20


def vram_probe(device: torch.device) -> Optional[Callable[[], float]]:
    """A function giving the device memory allocated now, in MiB (None on the CPU)."""
    if device.type != "cuda":
        return None
    return lambda: torch.cuda.memory_allocated(device) / 2**20


_folded: Dict[str, Dict[str, float]] = {}  # device -> the highest peak before the last per-block reset


def _since_reset(device: torch.device) -> Dict[str, float]:
    return {"allocated_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
            "reserved_mb": round(torch.cuda.max_memory_reserved(device) / 2**20, 1)}


def _higher(a: Optional[Dict[str, float]], b: Dict[str, float]) -> Dict[str, float]:
    return b if a is None or b["allocated_mb"] > a["allocated_mb"] else a


def begin_peak(device: torch.device) -> None:
    """Start measuring a stage's peak device memory (`peak_vram_mb`)."""
    if device.type == "cuda":
        _folded.pop(str(device), None)
        torch.cuda.reset_peak_memory_stats(device)


def begin_block_peak(device: torch.device) -> None:
    """Start measuring one block's peak (`block_peak_vram_mb`); the stage's peak keeps what came before."""
    if device.type == "cuda":
        _folded[str(device)] = _higher(_folded.get(str(device)), _since_reset(device))
        torch.cuda.reset_peak_memory_stats(device)


def block_peak_vram_mb(device: torch.device) -> Optional[Dict[str, float]]:
    """The device's peak allocated and reserved memory since `begin_block_peak` (None on the CPU)."""
    return _since_reset(device) if device.type == "cuda" else None


def peak_vram_mb(device: torch.device) -> Optional[Dict[str, float]]:
    """The device's peak allocated and reserved memory since `begin_peak` (None on the CPU)."""
    if device.type != "cuda":
        return None
    return _higher(_folded.get(str(device)), _since_reset(device))
