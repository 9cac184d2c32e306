"""family=diffusion: the denoiser of a diffusers pipeline folder (Flux, SD3 / SD3.5) seen as the generic stages
see a decoder: a list of blocks, each run on per-sample rows plus values every sample shares.

A calibration row is one sample of the model batch at one denoising step. Between blocks the row is the two
streams joined along the token axis, text tokens first (`joined_streams`), so that one row file carries both and
the generic quantize stage's loss, `mse(block(x), target)`, covers every linear of a double-stream block, the
text-stream ones (`attn.to_add_out`, `ff_context.*`) included. `temb` (timestep and pooled text, per row) is a side
row every block reads; the rotary table (Flux) and the text token count are shared values. A block with
`context_pre_only` (SD3's last) returns no text stream: its text slot holds zeros, in the target as in the
output. The last block's text output is read by nothing after it (Flux drops the text tokens there), so its loss is
the image stream's (`tuning_compared`).
"""
from __future__ import annotations

from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from qrunner.models.adapter import HIDDEN, FamilyAdapter
from qrunner.models.diffusion import CONTEXT, ROTARY, SPECS, TEMB, BlockValues

DENOISER = "denoiser"  # shared value: the denoiser's class name (which DenoiserSpec runs the block)
TEXT_TOKENS = "text_tokens"  # shared value: how many of a row's tokens are the text stream's
TEXT_OUTPUT_READ = "text_output_read"  # shared value: does the denoiser read this block's text output (not the last)
LOSS_STREAMS = ("both", "image")  # family.loss_streams: what the tuning loss compares


def split_row(joined: torch.Tensor, text_tokens: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(text stream, image stream) of joined rows."""
    return joined[:, :text_tokens], joined[:, text_tokens:]


class DiffusionAdapter(FamilyAdapter):
    name = "diffusion"
    stages = ("load", "diffusion_data", "diffusion_capture", "quantize", "diffusion_export", "diffusion_evaluate")
    model_types = ()
    block_list_candidates = ("transformer_blocks", "single_transformer_blocks")
    pipeline_folder: ClassVar[bool] = True

    def check_config(self, config: Any, model_path: str) -> None:
        """Nothing to check here: `read_pipeline_folder` has named an unsupported denoiser already."""

    def block_lists(self, model: nn.Module, requested: Sequence[str]) -> List[str]:
        if requested:
            return super().block_lists(model, requested)
        return [n for n in self.block_list_candidates if isinstance(getattr(model, n, None), nn.ModuleList)]

    def run_block(self, block: nn.Module, inputs: Dict[str, torch.Tensor], shared: Dict[str, Any],
                  writes: Sequence[str] = ()) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        text, image = split_row(inputs[HIDDEN], int(shared[TEXT_TOKENS]))
        extra = {ROTARY: shared[ROTARY]} if ROTARY in shared else {}
        out = SPECS[shared[DENOISER]].run_block(block, BlockValues({HIDDEN: image, CONTEXT: text}, inputs[TEMB], extra))
        text_out = out[CONTEXT] if out[CONTEXT] is not None else torch.zeros_like(text)
        return torch.cat([text_out, out[HIDDEN]], dim=1), {}

    def tuning_compared(self, block: nn.Module, shared: Dict[str, Any], cfg: Any) -> Optional[slice]:
        """The streams the denoiser reads afterwards. `family.loss_streams=both` (default): both, except in the
        last block, whose text output the denoiser drops (Flux keeps the image tokens of the last single block's
        output; SD3's last block returns no text stream). `image`: the image stream in every block (the
        reference tool's loss), so the text-stream layers of a double-stream block keep their round-to-nearest
        values. The stream left out is left out of the loss, not zeroed: the tuner picks its best step by the
        loss of what it compares."""
        if str(cfg.family.loss_streams) == "both" and shared.get(TEXT_OUTPUT_READ, True):
            return None
        return slice(int(shared[TEXT_TOKENS]), None)

    def output_parts(self, block: nn.Module, shared: Dict[str, Any]) -> Dict[str, slice]:
        tokens = int(shared[TEXT_TOKENS])
        parts = {HIDDEN: slice(tokens, None)}
        if tokens and not getattr(block, "context_pre_only", False):
            parts[CONTEXT] = slice(0, tokens)
        return parts
