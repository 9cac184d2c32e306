"""data: calibration samples (nsamples x seqlen token ids) from the configured text source, and with
`data.images` image–text samples first (their image inputs in `image_inputs.safetensors`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from qrunner.data_sources import long_document_windows, read_documents, text_windows, tokenize_documents
from qrunner.errors import UserError
from qrunner.image_pairs import open_image, read_image_pairs
from qrunner.pipeline.stage import Stage, StageContext, register_stage

SAMPLES = "calibration.safetensors"
IMAGE_INPUTS = "image_inputs.safetensors"  # "<sample>.<input name>" -> tensor, for the image samples


@register_stage
class DataStage(Stage):
    name = "data"
    needs = ("load",)
    reads = ("data.source", "data.format", "data.text_field", "data.separator", "data.split_paragraphs",
             "data.nsamples", "data.seqlen", "data.short_samples", "data.seed", "data.images", "data.image_prompt")
    version = 3
    description = "calibration token windows"

    def run(self, ctx: StageContext) -> Dict[str, Any]:
        d = ctx.cfg.data
        tokenizer = ctx.session.tokenizer
        generator = torch.Generator().manual_seed(int(d.seed))
        mode = d.short_samples.value if hasattr(d.short_samples, "value") else str(d.short_samples)
        dropped = 0
        if mode == "concat":
            windows, documents, origin = text_windows(tokenizer, d, "calibration")
        else:
            docs, origin = read_documents(d.source, d.format, d.text_field, "calibration", bool(d.split_paragraphs))
            documents = len(docs)
            windows, dropped = long_document_windows(tokenize_documents(tokenizer, docs), d.seqlen, generator)
            if dropped:
                ctx.log.warning("data: dropped %d of %d documents shorter than seqlen=%d", dropped, documents,
                                d.seqlen)
        if len(windows) == 0:
            raise UserError(f"data.source={d.source!r} gives no sample of data.seqlen={d.seqlen} tokens "
                            f"(short_samples={mode}); lower data.seqlen or use data.short_samples=concat.")
        if len(windows) < d.nsamples:
            ctx.log.warning("data: only %d samples of %d tokens are available (data.nsamples=%d); using %d",
                            len(windows), d.seqlen, d.nsamples, len(windows))
            chosen = windows
        else:
            order = torch.randperm(len(windows), generator=generator)[: d.nsamples]
            chosen = windows[order]
        images = 0
        if d.images:
            chosen, images = self._with_images(ctx, chosen, int(d.nsamples))
        save_file({"input_ids": chosen.contiguous()}, str(ctx.out / SAMPLES), metadata={"format": "pt"})
        ctx.log.info("data: %d samples x %d tokens from %s%s", len(chosen), d.seqlen, origin,
                     f" ({images} image samples from {d.images})" if images else "")
        return {"samples": len(chosen), "seqlen": int(d.seqlen), "documents": documents,
                "dropped_short_documents": dropped, "windows_available": len(windows), "origin": origin,
                "image_samples": images}

    def _with_images(self, ctx: StageContext, text: torch.Tensor, nsamples: int) -> Tuple[torch.Tensor, int]:
        """Image samples first (an image and its prompt through the model's processor, then the tokens of a text
        window up to seqlen, so every sample is seqlen tokens with no padding), then text windows."""
        d, session = ctx.cfg.data, ctx.session
        pairs = read_image_pairs(d.images, d.image_prompt, d.text_field)[:nsamples]
        encode = session.adapter.image_text_encoder(session.model_dir, session.tokenizer, session.hf_config,
                                                    bool(ctx.cfg.model.trust_remote_code))
        seqlen = int(d.seqlen)
        rows, extras = [], {}
        show = bool(ctx.cfg.run.show_progress)
        for i, pair in enumerate(tqdm(pairs, desc="image samples", unit="image", disable=not show)):
            inputs = encode(open_image(pair), pair.prompt)
            if inputs["input_ids"].shape[1] > seqlen:
                raise UserError(f"data.images: {pair.image} with its prompt is {inputs['input_ids'].shape[1]} tokens "
                                f"(image tokens included), more than data.seqlen={seqlen}; raise data.seqlen or use "
                                "smaller images.")
            ids, inputs = filled_to_seqlen(inputs, text[i % len(text)], seqlen)
            rows.append(ids[0])
            extras.update({f"{i}.{name}": value for name, value in inputs.items()})
        samples = torch.cat([torch.stack(rows), text[len(rows):]])
        extras.update(text_sample_inputs(extras, range(len(rows), len(samples)), seqlen))
        save_file(extras, str(ctx.out / IMAGE_INPUTS), metadata={"format": "pt", "samples": str(len(rows))})
        return samples, len(rows)


def filled_to_seqlen(inputs: Dict[str, torch.Tensor], filler: torch.Tensor, seqlen: int
                     ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """One encoded image sample made `seqlen` tokens long: its `input_ids` followed by the first tokens of
    `filler` (text), its per-token inputs (token types) padded with 0 (text); the other inputs as they are."""
    ids = inputs["input_ids"]
    length = ids.shape[1]
    out = {}
    for name, value in inputs.items():
        if name != "input_ids":
            per_token = value.dim() == 2 and value.shape == (1, length)
            out[name] = (torch.nn.functional.pad(value, (0, seqlen - length)) if per_token else value).contiguous()
    return torch.cat([ids, filler[None, : seqlen - length].to(ids.dtype)], dim=1), out


def text_sample_inputs(image_inputs: Dict[str, torch.Tensor], samples: Sequence[int], seqlen: int
                       ) -> Dict[str, torch.Tensor]:
    """The per-token inputs of the image samples (token types, "<sample>.<name>" of shape 1 x seqlen) for the
    text samples too, all 0 (text). The model then builds the same kind of inputs for every sample (Gemma 3: an
    explicit attention mask rather than none), so image and text samples share mini-batches."""
    per_token = {name.split(".", 1)[1]: value for name, value in image_inputs.items() if value.shape == (1, seqlen)}
    return {f"{i}.{name}": torch.zeros_like(value) for i in samples for name, value in per_token.items()}


class ImageInputs:
    """The image inputs of the calibration samples that have them (`extra(i)` for the capture stage)."""

    def __init__(self, data_dir: Path, dtype: Optional[torch.dtype] = None) -> None:
        self.path, self.dtype = data_dir / IMAGE_INPUTS, dtype

    def __bool__(self) -> bool:
        return self.path.is_file()

    def __call__(self, sample: int) -> Dict[str, torch.Tensor]:
        if not self:
            return {}
        with safe_open(str(self.path), framework="pt") as f:
            prefix = f"{sample}."
            out = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        # pixel values in the model's compute dtype, as from_pretrained(dtype=...) users pass them
        return {k: v.to(self.dtype) if self.dtype is not None and v.is_floating_point() else v
                for k, v in out.items()}
