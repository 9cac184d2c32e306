#!/usr/bin/env python3
"""Block-major denoising streamed from the shards: peak RSS vs the number of transformer blocks.

The memory property the diffusion path is built on (issue 14), measured on the pieces that exist so far
(`family=diffusion` is not wired into the CLI yet): random-weight Flux transformers of growing depth are saved as
pipeline folders (bf16 shards); in a child process per depth and mode, `qrunner.denoise.denoise_block_major` runs
`--steps` steps for `--samples` prompts (random prompt embeddings) over the transformer:

- `stream`: `DiffusionSession` in `memory=low`, a meta skeleton, the outer modules and one block read from the
  shards at a time (what `memory=medium/low` will do);
- `whole`: the transformer loaded whole (`memory=high`), for contrast.

Peak RSS is the child's (`/usr/bin/time -v`, as ram_vs_depth); the criterion is ram_vs_depth's: (peak - baseline)
may grow by at most 10 % from the shallowest to the deepest transformer in `stream`, the baseline being a process
that imports torch, diffusers and qrunner.

    python3 benchmarks/diffusion_stream_depth.py                       # depths 4,16,32 (a few minutes)
    python3 benchmarks/diffusion_stream_depth.py --depths 4,8 --dim 256

Writes `diffusion_stream_depth.json` and `.md` into --out (default benchmarks/results).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]  # this checkout first
import ram_vs_depth as rvd  # noqa: E402  (child measurement and baseline)

REPO = rvd.REPO
TARGET_GROWTH_PCT = rvd.TARGET_LOW_GROWTH_PCT
BASELINE_CODE = "import torch, diffusers, qrunner.denoise, qrunner.diffusion_session"


def flux_config(dim: int, depth: int) -> Dict[str, Any]:
    head = 64
    return dict(patch_size=1, in_channels=64, num_layers=depth // 2, num_single_layers=depth - depth // 2,
                attention_head_dim=head, num_attention_heads=dim // head, joint_attention_dim=dim,
                pooled_projection_dim=dim, guidance_embeds=True, axes_dims_rope=(16, 24, 24))


def build_pipeline(models_dir: Path, dim: int, depth: int) -> Path:
    """A pipeline folder (transformer in bf16 shards of 100 MB, scheduler), cached by shape."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    folder = models_dir / f"flux-d{dim}-b{depth}"
    if (folder / "model_index.json").is_file():
        return folder
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**flux_config(dim, depth)).to(torch.bfloat16)
    model.save_pretrained(folder / "transformer", max_shard_size="100MB")
    FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "FluxPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    return folder


def child(folder: str, mode: str, samples: int, steps: int, size: int, text_tokens: int) -> int:
    """One denoising run (the measured process)."""

    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    from qrunner.denoise import denoise_block_major
    from qrunner.diffusion_session import DiffusionSession
    from qrunner.memory.trim import freeze_long_lived_objects
    from qrunner.models.diffusion_sampling import PromptEmbeds

    session = DiffusionSession.open(folder, "low" if mode == "stream" else "high")
    sampling = session.sampling
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(session.folder.path / "scheduler"))
    _ = session.skeleton
    freeze_long_lived_objects()  # as a qrunner job does: the per-block collections then skip the imports
    g = torch.Generator().manual_seed(0)
    with session.outer() as model:
        cfg = model.config
        embeds = PromptEmbeds(torch.randn(samples, text_tokens, cfg.joint_attention_dim, generator=g),
                              torch.randn(samples, cfg.pooled_projection_dim, generator=g))

        latents = sampling.initial_latents(cfg, samples, size, size, 8, g)
        out = denoise_block_major(session.spec, sampling, model, session.block_at, scheduler, embeds, latents, steps, 3.5,
                                  size, size, 8, batch=samples)
    print(json.dumps({"latent_abs_mean": float(out.abs().mean())}))
    return 0


def run_child(a: argparse.Namespace, folder: Path, mode: str, depth: int) -> Dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(folder), "--child-mode", mode,
           "--samples", str(a.samples), "--steps", str(a.steps), "--size", str(a.size),
           "--text-tokens", str(a.text_tokens)]
    result = rvd.measure(cmd, Path(a.work_dir) / "logs" / f"{mode}-b{depth}.log", Path(a.work_dir), a.timeout)
    result.update(mode=mode, depth=depth)
    print(f"[bench] {mode} depth {depth}: exit {result['returncode']}, peak {result['peak_rss_mb']} MiB, "
          f"wall {result['wall_s']} s", flush=True)
    return result


def folder_mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in (folder / "transformer").glob("*.safetensors")) / 2 ** 20, 1)


def markdown(data: Dict[str, Any]) -> str:
    a = data["args"]
    lines = ["# Block-major denoising streamed from the shards: peak RSS vs transformer blocks", "",
             f"- command: `{data['command']}`", f"- machine: {data['machine']}; finished {data['finished']}", "",
             f"Random-weight Flux transformers, width {a['dim']}, blocks split double/single half and half, bf16 "
             f"shards; {a['samples']} samples x {a['steps']} steps at {a['size']} x {a['size']} px "
             f"({(a['size'] // 16) ** 2} image tokens, {a['text_tokens']} text tokens), fp32 compute. Peak RSS: the "
             f"child's /usr/bin/time -v; baseline (imports only) **{data['baseline_mb']:.0f} MiB**.", "",
             "| blocks | transformer (MiB) | stream: peak RSS (MiB) | stream: peak - baseline | stream: wall (s) "
             "| whole: peak RSS (MiB) | whole: wall (s) |", "|---:|---:|---:|---:|---:|---:|---:|"]
    by = {(r["mode"], r["depth"]): r for r in data["runs"]}
    for d in a["depths"]:
        s, w = by.get(("stream", d), {}), by.get(("whole", d), {})
        above = None if s.get("peak_rss_mb") is None else s["peak_rss_mb"] - data["baseline_mb"]
        lines.append(f"| {d} | {data['sizes_mb'][str(d)]} | {s.get('peak_rss_mb')} | "
                     f"{'' if above is None else f'{above:.0f}'} | {s.get('wall_s')} | {w.get('peak_rss_mb')} | "
                     f"{w.get('wall_s')} |")
    g = data.get("growth_pct")
    lines += ["", f"**{'n/a' if g is None else ('PASS' if g <= TARGET_GROWTH_PCT else 'FAIL')}**: stream, "
              f"(peak - baseline) grows <= {TARGET_GROWTH_PCT:.0f} % from {min(a['depths'])} to "
              f"{max(a['depths'])} blocks: measured {'n/a' if g is None else f'{g:+.1f} %'}.", ""]
    return "\n".join(lines)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depths", type=rvd.int_list, default=[4, 16, 32])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--modes", default="stream,whole")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--models-dir", default="/tmp/qrunner-bench-models")
    p.add_argument("--work-dir", default="/tmp/qrunner-bench-diffusion")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-mode", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    a = parse_args(argv)
    if a.child:
        return child(a.child, a.child_mode, a.samples, a.steps, a.size, a.text_tokens)
    Path(a.work_dir).mkdir(parents=True, exist_ok=True)
    folders = {d: build_pipeline(Path(a.models_dir), a.dim, d) for d in a.depths}
    baseline = rvd.measure([sys.executable, "-c", BASELINE_CODE], Path(a.work_dir) / "logs" / "baseline.log",
                           Path(a.work_dir), a.timeout)
    print(f"[bench] baseline peak RSS {baseline['peak_rss_mb']} MiB", flush=True)
    runs = [run_child(a, folders[d], mode, d) for d in a.depths for mode in a.modes.split(",")]
    stream = {r["depth"]: r["peak_rss_mb"] - baseline["peak_rss_mb"] for r in runs
              if r["mode"] == "stream" and r["returncode"] == 0 and r["peak_rss_mb"] is not None}
    lo, hi = min(a.depths), max(a.depths)
    growth = round(100 * (stream[hi] - stream[lo]) / stream[lo], 1) if lo in stream and hi in stream else None
    data = {"command": " ".join(["python3", "benchmarks/diffusion_stream_depth.py", *(argv or sys.argv[1:])]),
            "machine": rvd.machine(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "args": vars(a), "baseline_mb": baseline["peak_rss_mb"],
            "sizes_mb": {str(d): folder_mb(f) for d, f in folders.items()}, "runs": runs, "growth_pct": growth}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diffusion_stream_depth.json").write_text(json.dumps(data, indent=1, default=str))
    (out / "diffusion_stream_depth.md").write_text(markdown(data))
    print(markdown(data))
    return 0 if growth is not None and growth <= TARGET_GROWTH_PCT else 1


if __name__ == "__main__":
    sys.exit(main())
