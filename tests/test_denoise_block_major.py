"""The block-major denoising loop (qrunner.denoise) reproduces diffusers' own pipelines: same noise, same
timesteps, same final latents, for Flux and for SD3 / SD3.5 with classifier-free guidance; and it fetches each
block exactly once per step."""
from __future__ import annotations

from contextlib import contextmanager
from typing import List, Tuple

import pytest
import torch

pytest.importorskip("diffusers")

from qrunner.denoise import denoise_block_major  # noqa: E402
from qrunner.models.diffusion import CONTEXT, HIDDEN, SPECS  # noqa: E402
from qrunner.models.diffusion_sampling import SAMPLINGS, PromptEmbeds  # noqa: E402
from tiny_diffusion import DIFFUSION_KINDS, make_tiny_transformer  # noqa: E402

SIZE, STEPS, VAE_SCALE = 64, 3, 8  # no VAE in these pipelines: diffusers then takes a scale of 8


def _embeds(kind: str, model, n: int = 3, tokens: int = 6) -> PromptEmbeds:
    g = torch.Generator().manual_seed(5)
    cfg = model.config
    make = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return PromptEmbeds(make(n, tokens, cfg.joint_attention_dim), make(n, cfg.pooled_projection_dim),
                        make(n, tokens, cfg.joint_attention_dim), make(n, cfg.pooled_projection_dim))


def _diffusers_latents(kind: str, model, embeds: PromptEmbeds, guidance: float) -> torch.Tensor:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    scheduler = FlowMatchEulerDiscreteScheduler()
    common = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="latent",
                  generator=torch.Generator().manual_seed(0), prompt_embeds=embeds.text,
                  pooled_prompt_embeds=embeds.pooled, guidance_scale=guidance)
    if kind == "flux":
        pipe = FluxPipeline(scheduler, None, None, None, None, None, model)
        return pipe(**common).images
    pipe = StableDiffusion3Pipeline(model, scheduler, None, None, None, None, None, None, None)
    return pipe(**common, negative_prompt_embeds=embeds.negative_text,
                negative_pooled_prompt_embeds=embeds.negative_pooled).images


@pytest.mark.parametrize("kind", DIFFUSION_KINDS)
def test_block_major_loop_gives_the_pipelines_latents(kind):
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = make_tiny_transformer(kind)
    spec, sampling = SPECS[type(model).__name__], SAMPLINGS[type(model).__name__]
    embeds = _embeds(kind, model)
    guidance = 3.5
    expected = _diffusers_latents(kind, model, embeds, guidance)

    blocks = [b for _, b in spec.blocks(model)]
    fetched: List[int] = []
    seen: List[Tuple[int, int, int]] = []

    @contextmanager
    def block_at(i):
        fetched.append(i)
        yield blocks[i]

    def on_input(step, index, values):
        rows = values.temb.shape[0]
        assert values.streams[HIDDEN].shape[0] == rows
        assert values.streams[CONTEXT] is not None  # every block's input has its text stream
        seen.append((step, index, rows))

    latents = sampling.initial_latents(model.config, len(embeds), SIZE, SIZE, VAE_SCALE,
                                       torch.Generator().manual_seed(0))
    got = denoise_block_major(spec, sampling, model, block_at, FlowMatchEulerDiscreteScheduler(), embeds, latents,
                              STEPS, guidance, SIZE, SIZE, VAE_SCALE, batch=2, on_block_input=on_input)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (got - latents).abs().max() > 1e-3  # the loop really moved the latents
    assert fetched == list(range(len(blocks))) * STEPS
    rows = len(embeds) * (1 if kind == "flux" else 2)  # SD3 with guidance: negative and positive rows
    assert seen == [(s, i, rows) for s in range(STEPS) for i in range(len(blocks))]


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_from_prompts_to_latents_as_the_whole_pipeline_does(kind, tmp_path):
    """Prompts encoded with the text encoders alone (no denoiser, no VAE loaded), then the block-major loop over
    the transformer read from the folder: the latents diffusers' full pipeline gives for the same prompts."""
    from diffusers import DiffusionPipeline

    from qrunner.models.diffusion import read_pipeline_folder
    from qrunner.models.diffusion_sampling import encode_prompts
    from tiny_diffusion import make_tiny_pipeline

    folder = read_pipeline_folder(make_tiny_pipeline(kind, tmp_path / kind, full=True))
    prompts, guidance, length = ["a red cat on a mat", "a lighthouse at dawn"], 4.0, 16
    embeds = encode_prompts(folder, prompts, "", guidance, length)
    assert embeds.text.shape[:2] == (2, length if kind == "flux" else 77 + length)
    assert (embeds.negative_text is None) == (kind == "flux")

    pipe = DiffusionPipeline.from_pretrained(str(folder.path))
    expected = pipe(prompt=prompts, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=guidance,
                    max_sequence_length=length, generator=torch.Generator().manual_seed(0),
                    output_type="latent").images
    model = pipe.transformer
    spec, sampling = SPECS[type(model).__name__], SAMPLINGS[type(model).__name__]
    blocks = [b for _, b in spec.blocks(model)]

    @contextmanager
    def block_at(i):
        yield blocks[i]

    latents = sampling.initial_latents(model.config, 2, SIZE, SIZE, pipe.vae_scale_factor,
                                       torch.Generator().manual_seed(0))
    got = denoise_block_major(spec, sampling, model, block_at, type(pipe.scheduler).from_config(pipe.scheduler.config),
                              embeds, latents, STEPS, guidance, SIZE, SIZE, pipe.vae_scale_factor, batch=1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", DIFFUSION_KINDS)
def test_streamed_from_the_shards_one_block_at_a_time_equals_the_transformer_in_ram(kind, tmp_path):
    """memory=medium/low: a meta skeleton, the outer modules and one block read from sharded safetensors at a
    time; the latents equal those of the whole transformer in RAM (memory=high), bit for bit."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from qrunner.diffusion_session import DiffusionSession
    from tiny_diffusion import make_tiny_pipeline

    root = make_tiny_pipeline(kind, tmp_path / kind)
    make_tiny_transformer(kind).save_pretrained(root / "transformer", max_shard_size="150KB")  # several shards
    assert (root / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    embeds = _embeds(kind, make_tiny_transformer(kind))
    results, most_blocks = {}, 0
    for streams in (False, True):
        session = DiffusionSession.open(root, "low" if streams else "high")
        spec, sampling = session.spec, session.sampling
        resident: List[int] = []

        @contextmanager
        def block_at(i):
            with session.block_at(i) as block:
                if streams:  # how many blocks hold real weights right now
                    resident.append(sum(not next(b.parameters()).is_meta for _, b in spec.blocks(session.skeleton)))
                yield block

        with session.outer() as model:
            latents = sampling.initial_latents(model.config, len(embeds), SIZE, SIZE, VAE_SCALE,
                                               torch.Generator().manual_seed(0))
            results[streams] = denoise_block_major(spec, sampling, model, block_at, FlowMatchEulerDiscreteScheduler(),
                                                   embeds, latents, STEPS, 3.5, SIZE, SIZE, VAE_SCALE)
        if streams:
            most_blocks = max(resident)
            assert all(p.is_meta for p in session.skeleton.parameters())  # everything went back
    assert most_blocks == 1
    assert torch.equal(results[True], results[False])
