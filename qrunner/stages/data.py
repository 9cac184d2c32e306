"""data: calibration samples (nsamples x seqlen token ids) from the configured text source."""
from __future__ import annotations

from typing import Any, Dict

import torch
from safetensors.torch import save_file

from qrunner.data_sources import concatenated_windows, long_document_windows, read_documents, tokenize_documents
from qrunner.errors import UserError
from qrunner.pipeline.stage import Stage, StageContext, register_stage

SAMPLES = "calibration.safetensors"


@register_stage
class DataStage(Stage):
    name = "data"
    needs = ("load",)
    reads = ("data.source", "data.format", "data.text_field", "data.nsamples", "data.seqlen",
             "data.short_samples", "data.seed")
    version = 1
    description = "calibration token windows"

    def run(self, ctx: StageContext) -> Dict[str, Any]:
        d = ctx.cfg.data
        tokenizer = ctx.session.tokenizer
        docs, origin = read_documents(d.source, d.format, d.text_field, "calibration")
        token_docs = tokenize_documents(tokenizer, docs)
        generator = torch.Generator().manual_seed(int(d.seed))
        mode = d.short_samples.value if hasattr(d.short_samples, "value") else str(d.short_samples)
        dropped = 0
        if mode == "concat":
            windows = concatenated_windows(token_docs, d.seqlen, tokenizer.eos_token_id)
        else:
            windows, dropped = long_document_windows(token_docs, d.seqlen, generator)
            if dropped:
                ctx.log.warning("data: dropped %d of %d documents shorter than seqlen=%d", dropped, len(docs), d.seqlen)
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
        save_file({"input_ids": chosen.contiguous()}, str(ctx.out / SAMPLES), metadata={"format": "pt"})
        ctx.log.info("data: %d samples x %d tokens from %s", len(chosen), d.seqlen, origin)
        return {"samples": len(chosen), "seqlen": int(d.seqlen), "documents": len(docs),
                "dropped_short_documents": dropped, "windows_available": len(windows), "origin": origin}
