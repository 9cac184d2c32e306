"""The denoiser of a diffusers pipeline folder for the stages of one run: whole in RAM, or a meta skeleton whose
blocks are read from the safetensors shards one at a time.

`high` loads the transformer once (`from_pretrained`). `medium`/`low` build it on the meta device from its
config.json; `outer()` reads only the modules outside the blocks (the prologue's embedders, the epilogue's norm and
projection) and `block(i)` reads one block, releasing it on exit, so the denoising loop run block-major
(`qrunner.denoise`) never holds more than one block. The text encoders are never part of this: prompts are
encoded before (`qrunner.models.diffusion_sampling.encode_prompts`).
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import cached_property
from typing import Iterator, List, Optional, Tuple

import torch
from torch import nn

from qrunner.memory.streaming import CheckpointReader, materialized, module_tensor_names
from qrunner.memory.trim import release_freed_memory
from qrunner.models.diffusion import DenoiserSpec, PipelineFolder, denoiser_skeleton, dtype_argument


class DenoiserSession:
    def __init__(self, folder: PipelineFolder, compute_dtype: torch.dtype = torch.float32,
                 streams_blocks: bool = True) -> None:
        self.folder, self.compute_dtype, self.streams_blocks = folder, compute_dtype, streams_blocks
        self.spec: DenoiserSpec = folder.spec()
        self._model: Optional[nn.Module] = None

    @cached_property
    def skeleton(self) -> nn.Module:
        return denoiser_skeleton(self.folder, self.compute_dtype)

    @cached_property
    def reader(self) -> CheckpointReader:
        return CheckpointReader(self.folder.denoiser_dir)

    def model(self) -> nn.Module:
        """The whole transformer in RAM (memory=high), loaded once."""
        if self._model is None:
            cls = self.spec.model_class()
            self._model = cls.from_pretrained(str(self.folder.denoiser_dir),
                                              **dtype_argument(self.compute_dtype)).eval()
            self._model.requires_grad_(False)
        return self._model

    def outer_tensor_names(self) -> List[str]:
        """Every tensor of the transformer outside its blocks."""
        skip = tuple(f"{name}." for name in self.spec.block_lists)
        return [n for n in module_tensor_names(self.skeleton) if not n.startswith(skip)]

    @contextmanager
    def outer(self) -> Iterator[nn.Module]:
        """The transformer able to run its prologue and epilogue; in medium/low its blocks stay on meta."""
        if not self.streams_blocks:
            yield self.model()
            return
        with materialized(self.skeleton, self.outer_tensor_names(), self.reader, self.compute_dtype) as model:
            yield model

    @contextmanager
    def block(self, index: int) -> Iterator[Tuple[str, nn.Module]]:
        """Block `index` with real weights: from the loaded transformer (high) or read from the shards."""
        if not self.streams_blocks:
            yield self.spec.blocks(self.model())[index]
            return
        name, block = self.spec.blocks(self.skeleton)[index]
        try:
            with materialized(self.skeleton, [f"{name}.{t}" for t in module_tensor_names(block)], self.reader,
                              self.compute_dtype):
                yield name, block
        finally:
            release_freed_memory()
