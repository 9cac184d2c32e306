"""Stream single modules of a meta-device model from its safetensors shards, and send them back to meta.

`CheckpointReader` maps every tensor name to its shard (through `model.safetensors.index.json` or the
shards' headers) and reads exactly the tensors asked for, opening the shard for each read so that no
memory-mapped pages stay resident afterwards. `materialize_tensors(model, names, reader, dtype)` fills
named tensors of a skeleton built under `accelerate.init_empty_weights` (parameters and persistent buffers;
tied weights are read from their source tensor), and `release_tensors(model, names)` returns them to the
meta device.
Non-persistent buffers (rotary `inv_freq`) are never read: the skeleton builds them on the CPU.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
import math
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from accelerate.utils import set_module_tensor_to_device
from safetensors import SafetensorError, safe_open
from torch import nn

from qrunner.errors import UserError

INDEX = "model.safetensors.index.json"
INDEXES = (INDEX, "diffusion_pytorch_model.safetensors.index.json")  # transformers', diffusers' sharded checkpoints
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                       "F8_E5M2": torch.float8_e5m2}


class CheckpointReader:
    """Tensor name -> shard file of a Hugging Face safetensors checkpoint; reads one tensor at a time."""

    def __init__(self, model_dir: Path, tied: Optional[Dict[str, str]] = None) -> None:
        self.model_dir = Path(model_dir)
        self.tied = dict(tied or {})
        self.renamed: Dict[str, str] = {}  # model tensor name -> checkpoint key, where they differ
        self.model_name_of: Dict[str, str] = {}
        # fused model tensor -> its checkpoint keys, [part][expert] (see `assemble`)
        self.assembled: Dict[str, List[List[str]]] = {}
        self.assembled_parts: set = set()
        self.shard_of: Dict[str, Path] = {}
        index = next((self.model_dir / name for name in INDEXES if (self.model_dir / name).is_file()),
                     self.model_dir / INDEX)
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as err:
                raise UserError(f"{index} is not a valid safetensors index ({err}); re-download the checkpoint") from None
            self.shard_of = {k: self.model_dir / v for k, v in weight_map.items()}
        else:
            for shard in sorted(self.model_dir.glob("*.safetensors")):
                for key in self._keys(shard):
                    self.shard_of[key] = shard
        if not self.shard_of:
            raise UserError(f"{self.model_dir} holds no safetensors weights; memory=medium/low stream blocks "
                            "from safetensors shards (convert the checkpoint, or use memory=high)")

    @staticmethod
    def _keys(shard: Path) -> List[str]:
        try:
            with safe_open(str(shard), framework="pt") as f:
                return list(f.keys())
        except (SafetensorError, OSError) as err:
            raise UserError(f"cannot read the safetensors shard {shard} ({err}); the file is damaged or "
                            "incomplete: re-download it") from None

    def rename(self, renamed: Dict[str, str]) -> None:
        """Model tensor names stored under other checkpoint keys ({model name: checkpoint key})."""
        self.renamed = dict(renamed)
        self.model_name_of = {stored: name for name, stored in self.renamed.items()}

    def assemble(self, assembled: Dict[str, List[List[str]]], part_names: Dict[str, str]) -> None:
        """Model tensors stored in pieces: `assembled[name][p][e]` is the checkpoint key of expert e's part p of
        the fused tensor `name` [E, rows, in], built by stacking each part's experts and concatenating the parts
        along the rows (transformers' MergeModulelist(dim=0) + Concatenate(dim=1)). `part_names` names each
        piece as a tensor of the model's per-expert view ({checkpoint key: model name})."""
        self.assembled = dict(assembled)
        self.assembled_parts = {key for parts in assembled.values() for keys in parts for key in keys}
        for stored, name in part_names.items():
            self.renamed[name] = stored
            self.model_name_of[stored] = name

    def is_assembled_part(self, stored_key: str) -> bool:
        """The checkpoint key is one piece of a fused model tensor (a per-expert weight)."""
        return stored_key in self.assembled_parts

    def model_name(self, stored_key: str) -> str:
        """The model tensor a checkpoint key fills."""
        return self.model_name_of.get(stored_key, stored_key)

    def source_key(self, key: str) -> Optional[str]:
        """The checkpoint key that holds model tensor `key` (its own, renamed, or a tied weight's source)."""
        for name in (key, self.tied.get(key)):
            if name is None:
                continue
            if name in self.renamed:
                return self.renamed[name]
            if name in self.shard_of and name not in self.model_name_of:
                return name
        return None

    def read(self, key: str) -> torch.Tensor:
        """Model tensor `key`, read from the checkpoint key that holds it (or assembled from its pieces: one
        piece in RAM besides the result)."""
        if key in self.assembled:
            return self._read_assembled(self.assembled[key])
        source = self.source_key(key)
        if source is None:
            raise KeyError(key)
        return self.read_stored(source)

    def _read_assembled(self, parts: List[List[str]]) -> torch.Tensor:
        metas = [self.stored_meta(keys[0]) for keys in parts]
        dtype, (_, cols) = metas[0]
        out = torch.empty(len(parts[0]), sum(shape[0] for _, shape in metas), cols, dtype=dtype)
        row = 0
        for keys, (_, (rows, _)) in zip(parts, metas):
            for e, key in enumerate(keys):
                out[e, row:row + rows] = self.read_stored(key)
            row += rows
        return out

    def stored_meta(self, source: str) -> Tuple[torch.dtype, List[int]]:
        """dtype and shape of checkpoint key `source`, from the shard's header (nothing read)."""
        with self._open(source) as f:
            table = f.get_slice(source)
            return _SAFETENSORS_DTYPES[table.get_dtype()], list(table.get_shape())

    def stored_row_parts(self, source: str, part_bytes: int) -> Iterator[torch.Tensor]:
        """Checkpoint key `source` as consecutive row blocks of about `part_bytes` each (one read per block)."""
        dtype, shape = self.stored_meta(source)
        row_bytes = max(1, math.prod(shape[1:]) * torch.empty((), dtype=dtype).element_size())
        step = max(1, part_bytes // row_bytes)
        for start in range(0, shape[0], step):
            with self._open(source) as f:
                yield f.get_slice(source)[start:start + step]

    def _open(self, source: str):
        shard = self.shard_of[source]
        try:
            return safe_open(str(shard), framework="pt")
        except (SafetensorError, OSError) as err:
            raise UserError(f"cannot read tensor {source} from {shard} ({err}); the shard is damaged or "
                            "incomplete: re-download it") from None

    def read_rows(self, key: str, rows: Sequence[int]) -> torch.Tensor:
        """Rows `rows` (ascending) of the 2-D model tensor `key`, read slice by slice (one per run of
        consecutive rows) without reading the rest of the tensor."""
        source = self.source_key(key)
        if source is None:
            raise KeyError(key)
        runs, start = [], 0
        for i in range(1, len(rows) + 1):
            if i == len(rows) or rows[i] != rows[i - 1] + 1:
                runs.append((rows[start], rows[i - 1] + 1))
                start = i
        shard = self.shard_of[source]
        try:
            with safe_open(str(shard), framework="pt") as f:
                table = f.get_slice(source)
                parts = [table[a:b] for a, b in runs]
        except (SafetensorError, OSError) as err:
            raise UserError(f"cannot read tensor {source} from {shard} ({err}); the shard is damaged or "
                            "incomplete: re-download it") from None
        return torch.cat(parts) if len(parts) != 1 else parts[0]

    def read_row_range(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop-1 of model tensor `key`, one slice read."""
        source = self.source_key(key)
        if source is None:
            raise KeyError(key)
        with self._open(source) as f:
            return f.get_slice(source)[start:stop]

    def read_stored(self, source: str) -> torch.Tensor:
        """The tensor stored under checkpoint key `source`."""
        shard = self.shard_of[source]
        try:
            with safe_open(str(shard), framework="pt") as f:
                return f.get_tensor(source)
        except (SafetensorError, OSError) as err:
            raise UserError(f"cannot read tensor {source} from {shard} ({err}); the shard is damaged or "
                            "incomplete: re-download it") from None


def module_tensor_names(module: nn.Module) -> List[str]:
    """Names of the parameters and persistent buffers of `module` (relative to it); tied ones once each."""
    non_persistent = set()
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        for buf in getattr(mod, "_non_persistent_buffers_set", ()):
            non_persistent.add(f"{mod_name}.{buf}" if mod_name else buf)
    names = [name for name, _ in module.named_parameters(remove_duplicate=False)]
    names += [name for name, _ in module.named_buffers(remove_duplicate=False) if name not in non_persistent]
    return names


def materialize_tensors(model: nn.Module, names: Sequence[str], reader: CheckpointReader,
                        dtype: torch.dtype) -> None:
    """Read the named tensors of `model` from the checkpoint onto the CPU (floating ones cast to `dtype`)."""
    missing = [name for name in names if reader.source_key(name) is None and name not in reader.assembled]
    if missing:
        raise UserError(f"the checkpoint in {reader.model_dir} has no tensor for {len(missing)} weight(s) "
                        f"(e.g. {', '.join(missing[:3])}); the checkpoint does not match its config.json")
    for name in names:
        value = reader.read(name)
        if value.is_floating_point():
            value = value.to(dtype)
            set_module_tensor_to_device(model, name, "cpu", value=value, dtype=dtype)
        else:
            set_module_tensor_to_device(model, name, "cpu", value=value)


def release_tensors(model: nn.Module, names: Sequence[str]) -> None:
    """Put the named tensors of `model` back on the meta device, freeing their memory."""
    for name in names:
        set_module_tensor_to_device(model, name, "meta")


@contextmanager
def materialized(model: nn.Module, names: Sequence[str], reader: CheckpointReader, dtype: torch.dtype
                 ) -> Iterator[nn.Module]:
    """`model` with the named tensors read from the checkpoint while the block runs, back on meta after it."""
    materialize_tensors(model, names, reader, dtype)
    try:
        yield model
    finally:
        release_tensors(model, names)


def materialized_parameter_count(model: nn.Module) -> int:
    """Elements of all parameters not on the meta device (shared parameters counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen and p.device.type != "meta":
            seen.add(id(p))
            total += p.numel()
    return total
