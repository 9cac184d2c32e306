"""Every block run in isolation on the inputs qrunner prepares gives what it gives inside the full model.

The inputs go through the same code the stages use: `capture_block_inputs` (recording blocks, per-sample row
files), `save_block_inputs`/`load_block_inputs` (each distinct shared value stored once), `block_inputs`
(captured rows plus side values handed on by earlier blocks, e.g. Gemma 4's shared keys/values) and
`forward_rows`. Each block's output is compared with the output the full model's own forward gave that block.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import pytest
import torch

from qrunner.memory.activations import BlockRows, TensorRows
from qrunner.models.block_io import load_block_inputs, save_block_inputs
from qrunner.models.registry import get_family
from qrunner.stages.capture import capture_block_inputs
from qrunner.stages.quantize import block_inputs, forward_rows
from tiny_models import GEMMA4_KINDS, VLM_KINDS, make_tiny_gemma4, make_tiny_vlm

SEQ = 40  # longer than the tiny models' sliding window (16): sliding and full masks differ


class _Session:
    """What `block_inputs` needs of a session."""

    def __init__(self, adapter, config) -> None:
        self.adapter, self.hf_config = adapter, config


def _reference_outputs(model: torch.nn.Module, blocks: List[torch.nn.Module], input_ids: torch.Tensor
                       ) -> List[torch.Tensor]:
    outputs: List[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, a, o: outputs.append((o[0] if isinstance(o, tuple) else o).clone()))
             for b in blocks]
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return outputs


def _check_blocks(family: str, model_dir: Path, tmp_path: Path) -> Dict[str, float]:
    import transformers

    adapter = get_family(family)
    model = adapter.model_class(None).from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    names = adapter.block_lists(model, [])
    blocks = [b for _, b in adapter.blocks(model, names)]
    torch.manual_seed(0)
    input_ids = torch.randint(1, 300, (3, SEQ))
    reference = [_reference_outputs(model, blocks, input_ids[i:i + 1]) for i in range(len(input_ids))]

    hidden, per_block, captured = capture_block_inputs(adapter, model, adapter.blocks(model, names), input_ids,
                                                       tmp_path, "capture", False)
    save_block_inputs(per_block, tmp_path)
    per_block = load_block_inputs(tmp_path, torch.float32)
    session = _Session(adapter, model.config)
    x: TensorRows = TensorRows(hidden.read_all())
    side = {k: TensorRows(r.read_all()) for k, r in captured.items()}
    worst = {}
    for index, block in enumerate(blocks):
        shared, reads = block_inputs(session, per_block, index)
        writes = adapter.side_io(model.config, index)[1]
        out = TensorRows.empty(len(x), x.row_shape, x.dtype)
        side.update(forward_rows(adapter, block, BlockRows(x, {k: side[g] for k, g in reads.items()}), shared, out,
                                 writes, lambda n, count, shape, dtype: TensorRows.empty(count, shape, dtype)))
        expected = torch.cat([reference[i][index] for i in range(len(input_ids))])
        torch.testing.assert_close(out.tensor, expected, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"block {index} of {model_dir.name}: {m}")
        worst[f"block {index}"] = float((out.tensor - expected).abs().max())
        x = out
    del transformers
    return worst


@pytest.mark.parametrize("multimodal", [False, True], ids=["causal", "multimodal"])
@pytest.mark.parametrize("kind", GEMMA4_KINDS)
def test_gemma4_blocks_in_isolation_match_the_full_forward(kind, multimodal, tmp_path):
    layers = 6 if kind == "ple_kv" else 4
    model_dir = make_tiny_gemma4(tmp_path / "model", kind, layers=layers, multimodal=multimodal)
    worst = _check_blocks("gemma4", model_dir, tmp_path / "capture")
    assert len(worst) == layers


@pytest.mark.parametrize("kind", VLM_KINDS)
def test_vlm_blocks_in_isolation_match_the_full_forward(kind, tmp_path):
    model_dir = make_tiny_vlm(tmp_path / "model", kind, layers=4)
    worst = _check_blocks("vlm", model_dir, tmp_path / "capture")
    assert len(worst) == 4
