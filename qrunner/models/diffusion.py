"""Diffusion transformers: the denoiser of a local diffusers pipeline folder, run as prologue -> blocks -> epilogue.

A pipeline folder (`model_index.json` plus one sub-folder per component) names its denoiser under `transformer`
(or `unet` in older pipelines). qrunner supports the two transformer classes whose blocks it knows:

- `FluxTransformer2DModel`: `transformer_blocks` (double-stream: image and text streams with their own layers,
  joint attention) then `single_transformer_blocks` (one stream over text + image tokens, kept as two tensors
  between blocks). Rotary position table shared by every block and sample.
- `SD3Transformer2DModel` (SD3, SD3.5): `transformer_blocks` (`JointTransformerBlock`), including SD3.5's
  dual-attention (`attn2`) and qk-norm blocks, and the last block with `context_pre_only`, which returns no text
  stream (`(None, hidden_states)`).

Between blocks a sample is two streams (`hidden_states`: image tokens, `encoder_hidden_states`: text tokens) plus
`temb`, its timestep/pooled-text embedding (one vector per sample and step). `DenoiserSpec.prologue` is the
transformer's forward up to its first block, `run_block` one block, `epilogue` the rest: chained they are the
transformer's own forward, which is what lets qrunner hold one block at a time.
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional, Tuple

import torch
from torch import nn

from qrunner.errors import UserError

HIDDEN = "hidden_states"  # image stream
CONTEXT = "encoder_hidden_states"  # text stream
TEMB = "temb"  # per sample and step
ROTARY = "image_rotary_emb"  # shared by all samples (Flux)
DENOISER_COMPONENTS = ("transformer", "unet", "prior")  # where pipelines keep their denoiser, in that order


@dataclass
class BlockValues:
    """What flows between blocks for a mini-batch of samples: the streams and temb (per sample) and values every
    sample shares (the rotary table)."""

    streams: Dict[str, Optional[torch.Tensor]]
    temb: torch.Tensor
    shared: Dict[str, Any] = field(default_factory=dict)


class DenoiserSpec(ABC):
    """What qrunner knows of one denoiser class."""

    class_name: ClassVar[str]
    block_lists: ClassVar[Tuple[str, ...]]

    def model_class(self) -> Any:
        import diffusers

        return getattr(diffusers, self.class_name)

    def blocks(self, model: nn.Module) -> List[Tuple[str, nn.Module]]:
        """Every block in execution order, with its module name."""
        return [(f"{name}.{i}", block) for name in self.block_lists for i, block in enumerate(getattr(model, name))]

    @abstractmethod
    def prologue(self, model: nn.Module, **inputs: Any) -> Tuple[BlockValues, Dict[str, Any]]:
        """The forward up to the first block: the first block's values, and what the epilogue needs."""
        ...

    @abstractmethod
    def run_block(self, block: nn.Module, values: BlockValues) -> Dict[str, Optional[torch.Tensor]]:
        """One block on `values`: its output streams (the text stream is None after a `context_pre_only` block)."""
        ...

    @abstractmethod
    def epilogue(self, model: nn.Module, hidden_states: torch.Tensor, temb: torch.Tensor,
                 context: Dict[str, Any]) -> torch.Tensor:
        """The forward after the last block: the denoiser's prediction."""
        ...


class FluxSpec(DenoiserSpec):
    class_name = "FluxTransformer2DModel"
    block_lists = ("transformer_blocks", "single_transformer_blocks")

    def prologue(self, model: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 pooled_projections: torch.Tensor, timestep: torch.Tensor, img_ids: torch.Tensor,
                 txt_ids: torch.Tensor, guidance: Optional[torch.Tensor] = None, **_: Any
                 ) -> Tuple[BlockValues, Dict[str, Any]]:
        h = model.x_embedder(hidden_states)
        t = timestep.to(h.dtype) * 1000
        if guidance is None:
            temb = model.time_text_embed(t, pooled_projections)
        else:
            temb = model.time_text_embed(t, guidance.to(h.dtype) * 1000, pooled_projections)
        context = model.context_embedder(encoder_hidden_states)
        ids = torch.cat((txt_ids[0] if txt_ids.ndim == 3 else txt_ids, img_ids[0] if img_ids.ndim == 3 else img_ids))
        return BlockValues({HIDDEN: h, CONTEXT: context}, temb, {ROTARY: model.pos_embed(ids)}), {}

    def run_block(self, block: nn.Module, values: BlockValues) -> Dict[str, Optional[torch.Tensor]]:
        context, hidden = block(hidden_states=values.streams[HIDDEN], encoder_hidden_states=values.streams[CONTEXT],
                                temb=values.temb, image_rotary_emb=values.shared[ROTARY])
        return {HIDDEN: hidden, CONTEXT: context}

    def epilogue(self, model: nn.Module, hidden_states: torch.Tensor, temb: torch.Tensor,
                 context: Dict[str, Any]) -> torch.Tensor:
        return model.proj_out(model.norm_out(hidden_states, temb))


class SD3Spec(DenoiserSpec):
    class_name = "SD3Transformer2DModel"
    block_lists = ("transformer_blocks",)

    def prologue(self, model: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 pooled_projections: torch.Tensor, timestep: torch.Tensor, **_: Any
                 ) -> Tuple[BlockValues, Dict[str, Any]]:
        height, width = hidden_states.shape[-2:]
        h = model.pos_embed(hidden_states).contiguous()
        temb = model.time_text_embed(timestep, pooled_projections)
        context = model.context_embedder(encoder_hidden_states)
        return BlockValues({HIDDEN: h, CONTEXT: context}, temb), {"height": int(height), "width": int(width)}

    def run_block(self, block: nn.Module, values: BlockValues) -> Dict[str, Optional[torch.Tensor]]:
        context, hidden = block(hidden_states=values.streams[HIDDEN], encoder_hidden_states=values.streams[CONTEXT],
                                temb=values.temb)
        return {HIDDEN: hidden, CONTEXT: context}

    def epilogue(self, model: nn.Module, hidden_states: torch.Tensor, temb: torch.Tensor,
                 context: Dict[str, Any]) -> torch.Tensor:
        h = model.proj_out(model.norm_out(hidden_states, temb))
        p, channels = model.config.patch_size, model.out_channels
        rows, cols = context["height"] // p, context["width"] // p
        h = h.reshape(h.shape[0], rows, cols, p, p, channels)
        return torch.einsum("nhwpqc->nchpwq", h).reshape(h.shape[0], channels, rows * p, cols * p)


SPECS: Dict[str, DenoiserSpec] = {s.class_name: s for s in (FluxSpec(), SD3Spec())}

@dataclass(frozen=True)
class PipelineFolder:
    """A local diffusers pipeline folder as its model_index.json describes it."""

    path: Path
    pipeline_class: str
    components: Dict[str, Tuple[str, str]]  # component -> (library, class)
    denoiser: str  # the denoiser's component (sub-folder) name

    @property
    def denoiser_class(self) -> str:
        return self.components[self.denoiser][1]

    @property
    def denoiser_dir(self) -> Path:
        return self.path / self.denoiser

    def spec(self) -> DenoiserSpec:
        return SPECS[self.denoiser_class]


def read_pipeline_folder(path: Any) -> PipelineFolder:
    """Read `path/model_index.json`; stop with what is wrong and how to fix it when the folder is not a local
    diffusers pipeline whose denoiser qrunner supports."""
    root = Path(path)
    index = root / "model_index.json"
    if not root.is_dir():
        raise UserError(f"model.path={str(path)!r} does not exist. Point model.path at a local diffusers pipeline "
                        "folder (model_index.json plus one folder per component).")
    if not index.is_file():
        hint = (" It holds a config.json: a single model, not a pipeline; use family=llm (or vlm/gemma4) for it."
                if (root / "config.json").is_file() else "")
        raise UserError(f"{root} has no model_index.json, so it is not a diffusers pipeline folder.{hint} "
                        "Save one with DiffusionPipeline.save_pretrained(folder).")
    try:
        data = json.loads(index.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{index} is not valid JSON ({err}); re-save the pipeline.") from err
    components = {k: (v[0], v[1]) for k, v in data.items()
                  if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[1] is not None}
    denoiser = next((c for c in DENOISER_COMPONENTS if c in components), None)
    supported = ", ".join(sorted(SPECS))
    if denoiser is None:
        raise UserError(f"{index} names no denoiser (none of {', '.join(DENOISER_COMPONENTS)}); "
                        f"qrunner quantizes pipelines whose transformer is one of: {supported}.")
    folder = PipelineFolder(root, str(data.get("_class_name", "?")), components, denoiser)
    if folder.denoiser_class not in SPECS:
        raise UserError(f"unsupported denoiser {folder.denoiser_class} ({index}: {denoiser!r} of a "
                        f"{folder.pipeline_class}); supported: {supported}.")
    if not (folder.denoiser_dir / "config.json").is_file():
        raise UserError(f"{folder.denoiser_dir}/config.json is missing: the pipeline folder is incomplete "
                        f"(its {denoiser} was not saved); re-save the pipeline.")
    return folder


def dtype_argument(dtype: torch.dtype) -> Dict[str, torch.dtype]:
    """diffusers' `from_pretrained` dtype keyword: `dtype` from 0.42 on (`torch_dtype` is deprecated there)."""
    import diffusers
    from packaging.version import Version

    return {"dtype" if Version(diffusers.__version__) >= Version("0.42") else "torch_dtype": dtype}


def denoiser_skeleton(folder: PipelineFolder, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """The denoiser with every parameter on the meta device, built from its config.json."""
    from accelerate import init_empty_weights

    cls = folder.spec().model_class()
    config = cls.load_config(folder.denoiser_dir)
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(config)
    if dtype is not None:  # nn.Module's own `to`: diffusers' warns about fp32 modules even where there are none
        nn.Module.to(model, dtype)
    return model.eval()
