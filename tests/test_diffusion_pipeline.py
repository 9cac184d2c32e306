"""family=diffusion end to end on tiny random pipelines: `high` and `low` give byte-identical exports, a run killed
in capture or in quantize resumes to the same export, the export reloads in diffusers (AutoRound quantizer) and
gives what qrunner's fake-quantized transformer gives, and bad input is refused with the fix."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from conftest import compose, run_cli, run_inprocess, stage_status, tree_bytes  # noqa: E402
from qrunner.errors import UserError  # noqa: E402
from tiny_diffusion import make_tiny_pipeline, tiny_inputs  # noqa: E402

TEXT_ONLY = ("attn.to_add_out", "ff_context.net.0.proj", "ff_context.net.2")


def _args(folder: Path, root: Path, *extra: str, kind: str = "flux") -> list:
    return [f"recipe={'flux' if kind == 'flux' else 'sd3'}_w4a16", f"model.path={folder}", f"run.root={root}",
            "model.compute_dtype=float32", "quant.iters=4", "data.nsamples=2", "data.num_inference_steps=2",
            "data.height=64", "data.width=64", "data.max_sequence_length=16", "eval.nsamples=2", *extra]


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {kind: make_tiny_pipeline(kind, root / kind, full=True) for kind in ("flux", "sd35")}


@pytest.fixture(scope="module")
def high_runs(pipelines, tmp_path_factory):
    """One memory=high run of each pipeline (the reference for the other tests)."""
    return {kind: run_inprocess(_args(folder, tmp_path_factory.mktemp(f"high-{kind}"), "memory=high", kind=kind))
            for kind, folder in pipelines.items()}


@pytest.mark.parametrize("kind", ["flux", "sd35"])
def test_high_and_low_give_byte_identical_pipeline_exports(kind, pipelines, high_runs, tmp_path):
    high = high_runs[kind]
    low = run_inprocess(_args(pipelines[kind], tmp_path, "memory=low", kind=kind))
    assert low["memory"]["mode"] == "low"
    exported = tree_bytes(Path(low["export_dir"]))
    assert exported == tree_bytes(Path(high["export_dir"]))
    source = tree_bytes(pipelines[kind])
    for rel, data in exported.items():  # every component but the transformer's weights and config: the source's
        if not rel.startswith("transformer/"):
            assert data == source[rel], rel
    config = json.loads(exported["transformer/config.json"])
    assert config["quantization_config"]["quant_method"] == "auto-round"
    assert config["quantization_config"]["block_name_to_quantize"] == (
        "transformer_blocks,single_transformer_blocks" if kind == "flux" else "transformer_blocks")

    q = low["quality"]
    assert 0 < q["latent_mse"] < 1e-2 and q["psnr_db"] > 20 and 0.5 < q["ssim"] <= 1
    assert (Path(low["run_dir"]) / "images.png").is_file() and "![images](images.png)" in (
        Path(low["run_dir"]) / "report.md").read_text()
    parts = low["block_loss_parts"]
    assert all(v is not None and v >= 0 for v in parts["hidden_states"]["tuned"])
    text = parts["encoder_hidden_states"]["tuned"]
    if kind == "flux":  # every Flux block returns both streams
        assert all(v is not None for v in text)
    else:  # SD3's last block is context_pre_only: it returns no text stream
        assert all(v is not None for v in text[:-1]) and text[-1] is None


def test_the_rows_are_every_step_of_every_sample(high_runs):
    report = high_runs["sd35"]  # SD3 with guidance: each sample has a negative-prompt row
    capture = next(s for s in report["stages"] if s["name"] == "capture")["metrics"]
    assert capture["rows_per_step"] == 4 and capture["rows"] == 8
    assert capture["tokens"] == capture["text_tokens"] + (64 // 8 // 2) ** 2
    flux = next(s for s in high_runs["flux"]["stages"] if s["name"] == "capture")["metrics"]
    assert flux["rows"] == 4 and flux["text_tokens"] == 16


@pytest.mark.parametrize("fault", ["capture.step:1", "quantize.block_committed:1"])
def test_killed_in_capture_or_quantize_resumes_to_the_same_export(fault, pipelines, high_runs, tmp_path):
    args = _args(pipelines["flux"], tmp_path, "memory=low", "run.on_oom=fail")
    killed = run_cli(args, env={"QRUNNER_FAULT": fault, "OMP_NUM_THREADS": "1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = run_cli(args, env={"OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr
    (run_dir,) = [p for p in (tmp_path / "flux_w4a16").iterdir() if p.is_dir()]
    report = json.loads((run_dir / "report.json").read_text())
    status = stage_status(report)
    if fault.startswith("quantize"):
        assert status["capture"] == "reused"
        assert next(s for s in report["stages"] if s["name"] == "quantize")["metrics"]["resumed_at_block"] == 2
    assert tree_bytes(run_dir / "model") == tree_bytes(Path(high_runs["flux"]["export_dir"]))


def test_export_reloads_in_diffusers_and_matches_the_fake_quantized_transformer(pipelines, high_runs):
    pytest.importorskip("auto_round")
    from diffusers import DiffusionPipeline, FluxTransformer2DModel

    from qrunner.stages.quantize import quantized_layers

    report = high_runs["flux"]
    layers = quantized_layers(Path(report["run_dir"]) / "stages" / "quantize")
    assert len(layers) == 40  # every linear of the 4 blocks
    reference = FluxTransformer2DModel.from_pretrained(str(pipelines["flux"] / "transformer")).eval()
    with torch.no_grad():
        for name in layers:
            reference.get_submodule(name).weight.data = layers[name].dequantize(torch.float32)
    pipe = DiffusionPipeline.from_pretrained(report["export_dir"], dtype=torch.bfloat16)
    assert type(pipe.transformer.get_submodule(next(iter(layers)))).__name__ == "QuantLinear"
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() and not k.endswith("_ids") else v
              for k, v in tiny_inputs("flux").items()}
    with torch.no_grad():
        want = reference.to(torch.bfloat16)(**inputs).sample.float()
        got = pipe.transformer(**inputs).sample.float()
    assert (got - want).abs().max() <= 0.01 * want.abs().max()
    image = pipe(prompt="a red cat", height=64, width=64, num_inference_steps=2, max_sequence_length=16,
                 generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


def test_image_stream_only_loss_leaves_the_text_layers_at_round_to_nearest(pipelines, high_runs, tmp_path):
    from safetensors import safe_open

    from qrunner.quant.rtn import quantize
    from qrunner.quant.scheme import QuantScheme
    from qrunner.stages.quantize import quantized_layers

    report = run_inprocess(_args(pipelines["flux"], tmp_path, "memory=high", "family.loss_streams=image",
                                 "quant.iters=20"))
    stages = stage_status(report)
    assert stages["capture"] == "reused" or stages["capture"] == "ran"
    layers = quantized_layers(Path(report["run_dir"]) / "stages" / "quantize")
    with safe_open(str(pipelines["flux"] / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        for rel in TEXT_ONLY:
            name = f"transformer_blocks.0.{rel}"
            rtn = quantize(f.get_tensor(f"{name}.weight").float(), QuantScheme(bits=4, group_size=128, sym=True))
            assert torch.equal(layers[name].dequantize(torch.float32), rtn.dequantize(torch.float32)), name


def test_bad_diffusion_input_is_refused_with_the_fix(pipelines, tmp_path):
    from qrunner.cli import execute

    def run(*overrides):
        cfg, choices = compose(list(overrides))
        return execute(cfg, choices.get("recipe") or "custom", choices, list(overrides))

    with pytest.raises(UserError, match="diffusers pipeline folder .*use family=diffusion"):
        run(f"model.path={pipelines['flux']}", f"run.root={tmp_path}")
    with pytest.raises(UserError, match="family.loss_streams"):
        run(*_args(pipelines["flux"], tmp_path, "family.loss_streams=text"))
    with pytest.raises(UserError, match="AutoScheme.*not supported for family=diffusion"):
        run(*_args(pipelines["flux"], tmp_path, "scheme=auto"))
    with pytest.raises(UserError, match="no model_index.json"):
        run(*_args(pipelines["flux"] / "transformer", tmp_path))
