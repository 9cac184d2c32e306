"""The session of a family=diffusion run: the denoiser of a diffusers pipeline folder, whole in RAM or a meta
skeleton whose blocks are read from the safetensors shards one at a time.

`high` loads the transformer once (`from_pretrained`). `medium`/`low` build it on the meta device from its
config.json; `outer()` reads only the modules outside the blocks (the prologue's embedders, the epilogue's norm and
projection) and `block(i)` (the generic session's) reads one block, releasing it on exit, so the denoising loop run
block-major (`qrunner.denoise`) never holds more than one block. The text encoders and the VAE are never part of
this: prompts are encoded before (`encode_prompts`) and latents decoded after (`decode_latents`), each loaded
alone and released.
"""
from __future__ import annotations

import hashlib
import json
import logging
from contextlib import contextmanager
from functools import cached_property
from typing import Any, Dict, Iterator, List, Tuple

from omegaconf import DictConfig, OmegaConf
from torch import nn

from qrunner.memory.streaming import CheckpointReader, materialized, module_tensor_names
from qrunner.models.diffusion import PipelineFolder, denoiser_skeleton, dtype_argument, read_pipeline_folder
from qrunner.models.diffusion_sampling import SAMPLINGS, Sampling
from qrunner.session import ModelSession


class DiffusionSession(ModelSession):
    @classmethod
    def open(cls, path: Any, memory_mode: str = "low", compute_dtype: str = "float32",
             **overrides: Any) -> "DiffusionSession":
        """A session on a pipeline folder with the default config (for tools and benchmarks)."""
        from qrunner.config.schema import QrunnerConfig
        from qrunner.models.registry import get_family

        cfg: DictConfig = OmegaConf.structured(QrunnerConfig)
        cfg.model.path, cfg.model.compute_dtype, cfg.family.name = str(path), compute_dtype, "diffusion"
        for key, value in overrides.items():
            OmegaConf.update(cfg, key, value, merge=False)
        session = cls(cfg, get_family("diffusion"), logging.getLogger("qrunner"))
        session.memory_mode = memory_mode
        return session

    @cached_property
    def folder(self) -> PipelineFolder:
        return read_pipeline_folder(self.model_dir)

    @property
    def spec(self) -> Any:
        return self.folder.spec()

    @property
    def sampling(self) -> Sampling:
        return SAMPLINGS[self.folder.denoiser_class]

    @cached_property
    def skeleton(self) -> nn.Module:
        return denoiser_skeleton(self.folder, self.compute_dtype)

    @cached_property
    def hf_config(self) -> Any:
        return self.skeleton.config

    @property
    def tokenizer(self) -> Any:
        raise TypeError("a diffusion pipeline's prompts go through its own text encoders (encode_prompts)")

    @cached_property
    def reader(self) -> CheckpointReader:
        return CheckpointReader(self.folder.denoiser_dir)

    @property
    def hidden_size(self) -> int:
        c = self.hf_config
        return int(c.num_attention_heads) * int(c.attention_head_dim)

    def calibration_shape(self) -> Tuple[int, int, int, int]:
        """(rows, tokens a row, hidden, MLP width): a row is one sample of the model batch at one step (twice the
        prompts with classifier-free guidance), its tokens the text stream's then the image's."""
        d = self.cfg.data
        rows = int(d.nsamples) * int(d.num_inference_steps) * (2 if self.sampling.uses_cfg(self.guidance_scale) else 1)
        return rows, self.text_tokens + self.image_tokens, self.hidden_size, 4 * self.hidden_size

    @property
    def guidance_scale(self) -> float:
        g = self.cfg.data.guidance_scale
        return float(self.sampling.default_guidance if g is None else g)

    @cached_property
    def vae_scale(self) -> int:
        """The VAE's spatial downsampling (diffusers' `vae_scale_factor`; 8 when the folder has no VAE)."""
        config = self.folder.path / "vae" / "config.json"
        if not config.is_file():
            return 8
        return 2 ** (len(json.loads(config.read_text())["block_out_channels"]) - 1)

    @property
    def image_tokens(self) -> int:
        return self.sampling.image_tokens(self.hf_config, int(self.cfg.data.height), int(self.cfg.data.width),
                                          self.vae_scale)

    @property
    def text_tokens(self) -> int:
        return self.sampling.text_tokens(int(self.cfg.data.max_sequence_length))

    def checkpoint_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.denoiser_dir.glob("*.safetensors"))

    def identity(self) -> str:
        """model_index.json and the denoiser's structure (config, index, shard headers); the other components'
        files by name and size."""
        from qrunner.pipeline.fingerprint import model_identity

        h = hashlib.sha256((self.folder.path / "model_index.json").read_bytes())
        h.update(model_identity(self.folder.denoiser_dir).encode())
        for file in sorted(self.folder.path.rglob("*")):
            rel = file.relative_to(self.folder.path)
            if file.is_file() and rel.parts[0] != self.folder.denoiser and not rel.parts[0].startswith("."):
                h.update(f"{rel}:{file.stat().st_size}".encode())
        return h.hexdigest()

    def model_info(self) -> Dict[str, Any]:
        c = self.hf_config
        return {"model_type": "diffusers", "architecture": self.folder.denoiser_class,
                "pipeline": self.folder.pipeline_class, "denoiser": self.folder.denoiser,
                "source_dtype": str(self.reader.stored_meta(next(iter(self.reader.shard_of)))[0]),
                "config": {k: v for k, v in dict(c).items() if not k.startswith("_")}}

    def model(self) -> nn.Module:
        """The whole transformer in RAM (memory=high), loaded once."""
        if self._model is None:
            self.log.info("loading %s into RAM (%s)", self.folder.denoiser_dir, self.cfg.model.compute_dtype)
            cls = self.spec.model_class()
            self._model = cls.from_pretrained(str(self.folder.denoiser_dir), **dtype_argument(self.compute_dtype))
            self._model.eval()
            self._model.requires_grad_(False)
        return self._model

    def outer_tensor_names(self) -> List[str]:
        """Every tensor of the transformer outside its blocks."""
        skip = tuple(f"{name}." for name in self.block_lists)
        return [n for n in module_tensor_names(self.skeleton) if not n.startswith(skip)]

    @contextmanager
    def outer(self) -> Iterator[nn.Module]:
        """The transformer able to run its prologue and epilogue; in medium/low its blocks stay on meta."""
        if not self.streams_blocks:
            yield self.model()
            return
        with materialized(self.skeleton, self.outer_tensor_names(), self.reader, self.compute_dtype) as model:
            yield model

    def block_at(self, index: int) -> Any:
        """Block `index` as the denoising loop takes it (a context manager yielding the block)."""
        @contextmanager
        def fetch() -> Iterator[nn.Module]:
            with self.block(index) as (_, block):
                yield block

        return fetch()

