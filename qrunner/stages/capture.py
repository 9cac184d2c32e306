"""capture: every block's inputs: block 0's hidden_states and other per-sample inputs as row files, the inputs
every sample shares once."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from qrunner.memory.activations import ADDED, ActivationFile
from qrunner.models.adapter import HIDDEN
from qrunner.models.block_io import SampleRows, same_value, save_block_inputs, tensor_parts
from qrunner.pipeline.stage import Stage, StageContext, register_stage
from qrunner.stages.data import SAMPLES, ImageInputs

SIDE = "side"  # folder of the per-sample inputs other than hidden_states (one row file per block and name)


@register_stage
class CaptureStage(Stage):
    name = "capture"
    needs = ("load", "data")
    reads = ("model.compute_dtype", "family.block_names")
    version = 4
    description = "inputs of every block"

    def estimate_bytes(self, cfg: Any, session: Any) -> int:
        return session.calibration_bytes()

    def run(self, ctx: StageContext) -> Dict[str, Any]:
        session = ctx.session
        input_ids = load_file(str(ctx.inputs["data"] / SAMPLES))["input_ids"]
        images = ImageInputs(ctx.inputs["data"], session.compute_dtype)
        with session.input_model(towers=bool(images)) as model:
            hidden, per_block, side = capture_block_inputs(session.adapter, model, session.blocks(model), input_ids,
                                                           ctx.out, "capture", ctx.cfg.run.show_progress,
                                                           images if images else None)
        save_block_inputs(per_block, ctx.out)
        return {"samples": len(hidden), "hidden_bytes": len(hidden) * hidden.row_bytes,
                "side_bytes": sum(len(r) * r.row_bytes for r in side.values()),
                "block_inputs": sorted({k for b in per_block for k in b})}


def capture_block_inputs(adapter: Any, model: torch.nn.Module, blocks: List[Tuple[str, torch.nn.Module]],
                         input_ids: torch.Tensor, folder: Path, desc: str, show: bool,
                         extra: Optional[Callable[[int], Dict[str, torch.Tensor]]] = None
                         ) -> Tuple[ActivationFile, List[Dict[str, Any]], Dict[str, ActivationFile]]:
    """Run every sample up to the blocks (which only record what they are given), one sample at a time: block
    0's hidden states go to the row file `folder/hidden_states`; the inputs every sample shares are returned once
    per block; inputs that differ between samples go to row files in `folder/side` (see `SampleInputs`).
    `extra(i)` gives sample i's further model inputs (pixel values of an image sample)."""
    modules = [m for _, m in blocks]
    rows: Optional[ActivationFile] = None
    inputs = SampleInputs(len(input_ids), folder / SIDE, adapter.per_sample_inputs, [n for n, _ in blocks])
    for i in tqdm(range(len(input_ids)), desc=desc, unit="sample", disable=not show):
        h, per_block, added = adapter.capture_block_inputs(model, modules, input_ids[i:i + 1],
                                                           extra(i) if extra else None)
        inputs.add(i, per_block, added)
        if rows is None:
            rows = ActivationFile.create(folder / HIDDEN, len(input_ids), tuple(h.shape[1:]), h.dtype)
        rows.write(i, h)
    return rows, inputs.shared, inputs.files


class SampleInputs:
    """Sorts the inputs each sample gives each block into values every sample shares (kept once, from the
    first sample) and per-sample rows, without knowing the model: an input becomes per-sample rows when the
    adapter names it (`per_sample_inputs`, e.g. Gemma 4's per-layer input) or as soon as a sample gives a value
    that differs from the first sample's (positions and masks of image samples). Blocks that receive the very
    same object (one rotary table for all layers of a type) share one row file, so a per-sample value costs
    one row per sample, not one per block. What the model adds to the hidden states between blocks becomes the
    rows `added.<block>` (zero for samples that add nothing)."""

    def __init__(self, n: int, folder: Path, forced: Sequence[str], block_names: Sequence[str]) -> None:
        self.n, self.folder, self.forced, self.block_names = n, folder, tuple(forced), list(block_names)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shared: List[Dict[str, Any]] = []
        self.files: Dict[str, ActivationFile] = {}
        self.members: Dict[Tuple[int, str], List[Tuple[int, str]]] = {}  # leader -> blocks given the same object
        self.leader: Dict[Tuple[int, str], Tuple[int, str]] = {}

    def add(self, i: int, per_block: List[Dict[str, Any]], added: Sequence[Optional[torch.Tensor]]) -> None:
        if i == 0:
            self.shared = [dict(values) for values in per_block]
            self._group(per_block)
            for (b, key) in list(self.members):
                if key in self.forced and per_block[b].get(key) is not None:
                    self._to_rows((b, key), 0, per_block)
        else:
            for b, values in enumerate(per_block):
                for key in sorted(set(self.shared[b]) | set(values)):
                    first = self.shared[b].get(key)
                    if not isinstance(first, SampleRows) and not same_value(first, values.get(key)):
                        self._to_rows(self.leader.get((b, key), (b, key)), i, per_block)
        for (b, key), group in self.members.items():
            if isinstance(self.shared[b].get(key), SampleRows):
                self._write((b, key), group, i, per_block)
        for b, value in enumerate(added):
            if value is None:
                continue  # a new row file reads zeros where nothing was written
            name = f"added.{b}"
            if name not in self.files:
                self.files[name] = ActivationFile.create(self.folder / name, self.n, tuple(value.shape[1:]),
                                                         value.dtype)
                self.shared[b][ADDED] = SampleRows(name)
            self.files[name].write(i, value)

    def _group(self, per_block: List[Dict[str, Any]]) -> None:
        """Group the (block, input) pairs of the first sample that hold the very same tensors."""
        seen: Dict[Tuple[int, ...], Tuple[int, str]] = {}
        for b, values in enumerate(per_block):
            for key, value in sorted(values.items()):
                tensors = tensor_parts(value)
                if tensors is None:
                    continue
                lead = seen.setdefault(tuple(id(t) for t in tensors), (b, key))
                self.members.setdefault(lead, []).append((b, key))
                self.leader[(b, key)] = lead

    def _to_rows(self, lead: Tuple[int, str], i: int, per_block: List[Dict[str, Any]]) -> None:
        """Make the input `lead` (and every block given the same object) per-sample rows from sample i on;
        rows 0..i-1 get the first sample's value."""
        b, key = lead
        first, value = self.shared[b].get(key), per_block[b].get(key)
        if lead not in self.members or tensor_parts(value) is None:
            raise RuntimeError(f"input {key!r} of block {self.block_names[b]} differs between calibration samples "
                               f"and is not a tensor or tuple of tensors; the family adapter must rebuild it in "
                               f"run_block or drop it")
        parts = tensor_parts(value)
        dims = {next((d for d, s in enumerate(t.shape) if s == 1), None) for t in parts}
        if len(dims) != 1 or None in dims:
            raise RuntimeError(f"input {key!r} of block {self.block_names[b]} differs between calibration samples "
                               f"but has no batch dimension of size 1 to store it by sample")
        dim = dims.pop()
        spec = SampleRows(f"{key}.{b}", len(parts) if isinstance(value, (tuple, list)) else 0, dim)
        for name, t in zip(spec.files(), parts):
            self.files[name] = ActivationFile.create(self.folder / name, self.n,
                                                     tuple(t.movedim(dim, 0).shape[1:]), t.dtype)
        if i:
            old = tensor_parts(first)
            if old is None or [t.shape for t in old] != [t.shape for t in parts]:
                raise RuntimeError(f"input {key!r} of block {self.block_names[b]} changes its shape between "
                                   "calibration samples; use samples of one length (data.seqlen)")
            for name, t in zip(spec.files(), old):
                for row in range(i):
                    self.files[name].write(row, t.movedim(dim, 0))
        for mb, mkey in self.members[lead]:
            self.shared[mb][mkey] = spec

    def _write(self, lead: Tuple[int, str], group: List[Tuple[int, str]], i: int,
               per_block: List[Dict[str, Any]]) -> None:
        b, key = lead
        spec: SampleRows = self.shared[b][key]
        value = per_block[b].get(key)
        for mb, mkey in group[1:]:
            if not same_value(per_block[mb].get(mkey), value):
                raise RuntimeError(f"blocks {self.block_names[b]} and {self.block_names[mb]} were given one "
                                   f"{key!r} for the first calibration sample but differ for sample {i}")
        for name, t in zip(spec.files(), tensor_parts(value)):
            self.files[name].write(i, t.movedim(spec.dim, 0))


def open_side_rows(folder: Path, sub: str = SIDE) -> Dict[str, ActivationFile]:
    """The per-sample side rows in `folder/sub` by name (none when the folder does not exist)."""
    side = folder / sub
    if not side.is_dir():
        return {}
    return {p.name[:-len(".json")]: ActivationFile.open(side / p.name[:-len(".json")])
            for p in sorted(side.glob("*.json"))}
