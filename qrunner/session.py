"""In-process objects shared by the stages of one run: config, tokenizer, loaded model. Never on disk."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from qrunner.errors import UserError
from qrunner.memory.embedding_rows import rows_on_demand
from qrunner.memory.sliced_head import SlicedHead
from qrunner.memory.streaming import CheckpointReader, materialized, module_tensor_names
from qrunner.memory.trim import release_freed_memory
from qrunner.models.adapter import FamilyAdapter, LayerPlan, config_error


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class ModelSession:
    def __init__(self, cfg: DictConfig, adapter: FamilyAdapter, log: logging.Logger) -> None:
        self.cfg = cfg
        self.adapter = adapter
        self.log = log
        self.model_dir = Path(cfg.model.path).expanduser()
        self.compute_dtype = torch_dtype(cfg.model.compute_dtype)
        self._model: Optional[nn.Module] = None
        # the memory mode in force (memory=auto resolved); never part of a fingerprint
        self.memory_mode = "high"
        # where block forwards run (device= resolved); rows stay on the host
        self.device = torch.device("cpu")

    @property
    def streams_blocks(self) -> bool:
        """medium/low: the model stays a meta skeleton; modules are read from the shards when needed."""
        return self.memory_mode in ("medium", "low")

    @property
    def activations_on_disk(self) -> bool:
        """low: block inputs and targets live in row files and are read per mini-batch."""
        return self.memory_mode == "low"

    @cached_property
    def hf_config(self) -> Any:
        from transformers import AutoConfig

        trusted = bool(self.cfg.model.trust_remote_code)
        try:
            return AutoConfig.from_pretrained(self.model_dir, trust_remote_code=trusted)
        except (ValueError, KeyError) as e:
            raise UserError(config_error(self.model_dir, trusted, e)) from None

    @cached_property
    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_dir, trust_remote_code=self.cfg.model.trust_remote_code)

    @cached_property
    def skeleton(self) -> nn.Module:
        self.adapter.check_config(self.hf_config, str(self.model_dir))
        return self.adapter.build_skeleton(self.hf_config, self.cfg.model.trust_remote_code, self.compute_dtype)

    @cached_property
    def block_lists(self) -> List[str]:
        return self.adapter.block_lists(self.skeleton, list(self.cfg.family.block_names))

    @cached_property
    def layer_plan(self) -> List[LayerPlan]:
        q, s = self.cfg.quant, self.cfg.scheme
        overrides = [(rx, dict(OmegaConf.to_container(o))) for rx, o in q.layer_overrides.items()]
        return self.adapter.plan_layers(self.skeleton, self.block_lists, int(s.bits), int(s.group_size), bool(s.sym),
                                        list(q.ignore_layers), overrides)

    @property
    def hidden_size(self) -> int:
        text = getattr(self.hf_config, "text_config", None) or self.hf_config
        return int(text.hidden_size)

    def activation_bytes(self, samples: int, seqlen: int) -> int:
        """Bytes of one set of block activations (samples x seqlen x hidden) in the compute dtype."""
        return samples * seqlen * self.hidden_size * torch.empty((), dtype=self.compute_dtype).element_size()

    def calibration_shape(self) -> Tuple[int, int, int, int]:
        """(rows, tokens a row, hidden size, MLP width) of the calibration activations between blocks."""
        text = getattr(self.hf_config, "text_config", None) or self.hf_config
        return (int(self.cfg.data.nsamples), int(self.cfg.data.seqlen), self.hidden_size,
                int(getattr(text, "intermediate_size", 4 * self.hidden_size)))

    def calibration_bytes(self) -> int:
        """Bytes of one set of calibration activations between blocks."""
        rows, tokens, _, _ = self.calibration_shape()
        return self.activation_bytes(rows, tokens)

    def checkpoint_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.model_dir.glob("*.safetensors"))

    def identity(self) -> str:
        """What identifies the checkpoint in the stage fingerprints (its structure, not its bytes)."""
        from qrunner.pipeline.fingerprint import model_identity

        return model_identity(self.model_dir)

    def model_info(self) -> Dict[str, Any]:
        """What the load stage records of the model (the tokenizer is loaded too: broken files fail here)."""
        config = self.hf_config
        _ = self.tokenizer
        return {"model_type": config.model_type, "architecture": type(self.skeleton).__name__,
                "source_dtype": str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None))}

    def preflight(self) -> None:
        """Architecture, block names and layer shapes against the config, on the meta skeleton."""
        _ = self.layer_plan

    def model(self) -> nn.Module:
        """The whole model in RAM (memory=high), loaded once and shared by the stages that need it."""
        if self._model is None:
            self.log.info("loading %s into RAM (%s)", self.model_dir, self.cfg.model.compute_dtype)
            model_cls = self.adapter.model_class(self.hf_config)
            self._model = model_cls.from_pretrained(
                self.model_dir, dtype=self.compute_dtype, trust_remote_code=self.cfg.model.trust_remote_code)
            self._model.eval()
            self._model.requires_grad_(False)
        return self._model

    def take_model(self) -> nn.Module:
        """Hand the loaded model over to a stage that will modify it; the session forgets it."""
        model = self.model()
        self._model = None
        return model

    def blocks(self, model: nn.Module):
        return self.adapter.blocks(model, self.block_lists)

    # ---- access by memory mode ----------------------------------------------------------------
    @cached_property
    def reader(self) -> CheckpointReader:
        from qrunner.models.checkpoint_names import checkpoint_key_map

        tied = self.skeleton.get_expanded_tied_weights_keys(all_submodels=True)
        reader = CheckpointReader(self.model_dir, tied)
        renamed, assembled, part_names = checkpoint_key_map(self.skeleton, reader.shard_of)
        reader.rename(renamed)
        reader.assemble(assembled, part_names)
        return reader

    def block_names(self) -> List[str]:
        return [name for name, _ in self.blocks(self.skeleton)]

    @contextmanager
    def block(self, index: int) -> Iterator[Tuple[str, nn.Module]]:
        """Block `index` with real weights: from the loaded model (high) or streamed from the shards."""
        if not self.streams_blocks:
            name, block = self.blocks(self.model())[index]
            with self.adapter.block_view(block) as view:
                yield name, view
            return
        name, block = self.blocks(self.skeleton)[index]
        try:
            with materialized(self.skeleton, [f"{name}.{t}" for t in module_tensor_names(block)], self.reader,
                              self.compute_dtype), self.adapter.block_view(block) as view:
                yield name, view
        finally:
            release_freed_memory()

    @contextmanager
    def input_model(self, towers: bool = False) -> Iterator[nn.Module]:
        """The model able to run up to its first block (capture): in medium/low, only the modules before
        the blocks (embeddings; the vision tower too with `towers`, for image samples) are read; blocks and the
        output head stay on the meta device."""
        if not self.streams_blocks:
            yield self.model()
            return
        names = self.adapter.input_tensor_names(self.skeleton, self.block_lists, towers)
        # embedding tables are read by rows, only those of the ids looked up (see memory/embedding_rows.py)
        tables = [n for n, m in self.skeleton.named_modules()
                  if isinstance(m, nn.Embedding) and f"{n}.weight" in names]
        names = [n for n in names if n not in {f"{t}.weight" for t in tables}]
        with materialized(self.skeleton, names, self.reader, self.compute_dtype), \
                rows_on_demand(self.skeleton, tables, self.reader, self.compute_dtype):
            yield self.skeleton

    @contextmanager
    def sliced_head(self) -> Iterator[SlicedHead]:
        """The output head: its final norms read from the shards, its projection (lm_head) read in row slices
        as it is applied, never whole (memory/sliced_head.py)."""
        names = self.adapter.heads(self.skeleton)
        norms = [f"{p}.{t}" for p in names[:-1] for t in module_tensor_names(self.skeleton.get_submodule(p))]
        with materialized(self.skeleton, norms, self.reader, self.compute_dtype) as model:
            yield SlicedHead(model, names, self.reader, self.compute_dtype, self.adapter.logit_softcap(self.hf_config),
                             scale=self.adapter.logit_scale(self.hf_config))

