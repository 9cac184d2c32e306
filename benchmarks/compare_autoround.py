"""Quantize the bundled demo model with qrunner and with the auto-round package, on CPU, and compare them.

For every configuration (e.g. ``w4a16`` and ``w2a16g64``):

1. qrunner runs in a child process (``python -m qrunner recipe=demo ...``, ``memory=high``).
2. auto-round runs in a second child process on the *same* calibration token windows (read from
   qrunner's ``stages/data/calibration.safetensors``), with the same bits / group size / sym / iters /
   nsamples / seqlen / batch size / seed, fp32 compute (``amp=False``), no ``torch.compile``, CPU. It
   saves its result in the ``auto_round`` format.
3. Both exported checkpoints are loaded with ``transformers`` and scored with qrunner's own perplexity
   function on every window of the bundled held-out text.

Peak RSS is each child's own ``ru_maxrss`` (from ``os.wait4``); the quantize time is qrunner's
``quantize`` stage time and the duration of auto-round's ``quantize()`` call.

    python benchmarks/compare_autoround.py --iters 200 --nsamples 32,128 --seqlen 256 --schemes w4a16,w2a16g64

Every scheme runs at every sample count (``--nsamples 32,128``: four configurations), the tools alternating
(qrunner, auto-round, qrunner, ...). ``--qrunner-variants default,compile`` adds a second qrunner run per
configuration with ``quant.compile=true`` (its time and perplexity in their own columns).

Writes ``compare_autoround.json`` and ``compare_autoround.md`` in ``--out``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List

REPO = Path(__file__).resolve().parents[1]
CHILD_FLAG = "--autoround-child"
SEED = 42
BATCH_SIZE = 8
EVAL_BATCH_SIZE = 4


@dataclass(frozen=True)
class Config:
    """One quantization configuration, applied identically to both tools."""

    bits: int
    group_size: int
    iters: int
    nsamples: int
    seqlen: int
    device: str = "cpu"  # where both tools tune: cpu, or cuda (qrunner device=cuda, auto-round device_map="cuda")

    @property
    def label(self) -> str:
        return f"W{self.bits}A16 g{self.group_size}, {self.nsamples} samples"

    @property
    def slug(self) -> str:
        return f"w{self.bits}a16g{self.group_size}n{self.nsamples}"


@dataclass
class ChildRun:
    """Exit code, wall time, peak RSS, machine load (1-minute average at start and end) and logs of a child."""

    returncode: int
    wall_seconds: float
    peak_rss_mb: float
    load_avg: List[float]
    stdout: Path
    stderr: Path

    def check(self, what: str) -> None:
        if self.returncode != 0:
            tail = self.stderr.read_text(errors="replace")[-3000:]
            raise SystemExit(f"compare_autoround: {what} failed (exit {self.returncode}); log {self.stderr}:\n{tail}")


def parse_schemes(text: str, default_group_size: int) -> List[tuple]:
    """``"w4a16,w2a16g64"`` -> ``[(4, default_group_size), (2, 64)]``."""
    out = []
    for item in filter(None, (s.strip().lower() for s in text.split(","))):
        match = re.fullmatch(r"w(\d+)a16(?:g(\d+))?", item)
        if not match:
            raise SystemExit(f"compare_autoround: bad scheme {item!r}; use e.g. w4a16 or w2a16g64")
        out.append((int(match.group(1)), int(match.group(2) or default_group_size)))
    return out


def run_measured(cmd: List[str], log_prefix: Path) -> ChildRun:
    """Run ``cmd`` to completion; peak RSS is the child's own ``ru_maxrss`` (os.wait4), not this process's."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    out, err = log_prefix.with_suffix(".stdout.log"), log_prefix.with_suffix(".stderr.log")
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    with open(out, "w") as so, open(err, "w") as se:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=so, stderr=se)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return ChildRun(proc.returncode, time.perf_counter() - started, usage.ru_maxrss / 1024.0,
                    [load_before, os.getloadavg()[0]], out, err)


VARIANTS = {"default": [], "compile": ["quant.compile=true"]}


def run_qrunner(cfg: Config, root: Path, extra: List[str] = ()) -> Dict[str, Any]:
    """qrunner in its own process; returns its report's figures and where its samples and export are."""
    from qrunner.stages.data import SAMPLES

    cmd = [sys.executable, "-m", "qrunner", "recipe=demo", f"run.root={root}", "run.fresh=true",
           "run.show_progress=false", "memory=high", "scheme=w4a16", f"scheme.name={cfg.slug}",
           f"scheme.bits={cfg.bits}", f"scheme.group_size={cfg.group_size}", "scheme.sym=true",
           f"quant.iters={cfg.iters}", f"quant.batch_size={BATCH_SIZE}", f"quant.seed={SEED}",
           "quant.amp_bf16=false", "quant.compile=false", "quant.rtn_loss=false", "model.compute_dtype=float32",
           f"data.nsamples={cfg.nsamples}", f"data.seqlen={cfg.seqlen}", f"data.seed={SEED}",
           f"eval.seqlen={cfg.seqlen}", "eval.nsamples=0", f"device={cfg.device}", *extra]
    child = run_measured(cmd, root / "qrunner")
    child.check(f"qrunner ({cfg.label})")
    reports = sorted(root.glob("demo/*/report.json"))
    if len(reports) != 1:
        raise SystemExit(f"compare_autoround: expected one qrunner report under {root}, found {len(reports)}")
    report = json.loads(reports[0].read_text())
    stages = {s["name"]: s for s in report["stages"]}
    if stages["quantize"]["status"] != "ran":
        raise SystemExit(f"compare_autoround: qrunner's quantize stage was {stages['quantize']['status']!r}, not run")
    return {"run_dir": report["run_dir"], "export_dir": report["export_dir"],
            "samples": str(Path(report["run_dir"]) / "stages" / "data" / SAMPLES),
            "quantize_seconds": stages["quantize"]["seconds"], "capture_seconds": stages["capture"]["seconds"],
            "process_wall_seconds": round(child.wall_seconds, 2), "peak_rss_mb": round(child.peak_rss_mb, 1),
            "load_avg_1min": child.load_avg, "ppl_original_own": report["quality"].get("ppl_original"),
            "ppl_quantized_own": report["quality"].get("ppl_quantized"),
            "peak_vram_mb": (stages["quantize"].get("peak_vram_mb") or {}).get("allocated_mb"),
            "phase_seconds": stages["quantize"].get("metrics", {}).get("phase_seconds")}


def run_autoround(cfg: Config, model: Path, samples: Path, work: Path) -> Dict[str, Any]:
    """auto-round in its own process (this file with CHILD_FLAG); returns its timing, RSS and export dir."""
    export = work / "autoround-model"
    spec = {**asdict(cfg), "model": str(model), "samples": str(samples), "export_dir": str(export)}
    child = run_measured([sys.executable, str(Path(__file__).resolve()), CHILD_FLAG, json.dumps(spec)],
                         work / "autoround")
    child.check(f"auto-round ({cfg.label})")
    lines = [ln for ln in child.stdout.read_text().splitlines() if ln.strip()]
    result = json.loads(lines[-1])
    return {"export_dir": result["export_dir"], "quantize_seconds": round(result["quantize_seconds"], 2),
            "peak_vram_mb": result.get("peak_vram_mb"),
            "process_wall_seconds": round(child.wall_seconds, 2), "peak_rss_mb": round(child.peak_rss_mb, 1),
            "load_avg_1min": child.load_avg}


def autoround_child(spec: Dict[str, Any]) -> None:
    """Child process: quantize with auto-round on the given token windows, save, print timing JSON."""
    from auto_round import AutoRound, SignRoundConfig
    from auto_round.schemes import QuantizationScheme
    from safetensors.torch import load_file

    ids = load_file(spec["samples"])["input_ids"]
    scheme = QuantizationScheme.from_dict({"bits": spec["bits"], "group_size": spec["group_size"], "sym": True,
                                           "data_type": "int", "act_bits": 16})
    tuning = SignRoundConfig(iters=spec["iters"], lr=None, minmax_lr=None, enable_minmax_tuning=True,
                             enable_quanted_input=True, gradient_accumulate_steps=1, nblocks=1)
    ar = AutoRound(spec["model"], scheme=scheme, alg_configs=tuning, dataset=[row.unsqueeze(0) for row in ids],
                   nsamples=len(ids), seqlen=int(ids.shape[1]), batch_size=BATCH_SIZE, seed=SEED, amp=False,
                   enable_torch_compile=False, low_gpu_mem_usage=False, low_cpu_mem_usage=False,
                   device_map=spec.get("device", "cpu"))
    import torch

    on_gpu = spec.get("device", "cpu") != "cpu"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    ar.quantize()
    seconds = time.perf_counter() - started
    vram = round(torch.cuda.max_memory_allocated() / 2**20, 1) if on_gpu else None
    ar.save_quantized(spec["export_dir"], format="auto_round", inplace=True)
    print(json.dumps({"quantize_seconds": seconds, "export_dir": spec["export_dir"], "peak_vram_mb": vram}))


def heldout_windows(tokenizer: Any, seqlen: int) -> Any:
    """Every ``seqlen``-token window of the bundled held-out text, cut exactly as qrunner's evaluate stage."""
    from omegaconf import OmegaConf

    from qrunner.config.schema import EvalConfig
    from qrunner.stages.evaluate import evaluation_windows

    cfg = OmegaConf.create({"eval": OmegaConf.structured(EvalConfig(seqlen=seqlen, nsamples=0))})  # the defaults
    return evaluation_windows(cfg, tokenizer)


def load_fp32(export_dir: str) -> Any:
    """An exported checkpoint loaded with transformers, computing in fp32.

    auto-round's CPU kernels make transformers cast the loaded model to fp16; it is cast back to fp32 and
    every floating tensor of the checkpoint (scales, unquantized weights) is reloaded, so no value keeps
    an fp16 rounding it does not have on disk.
    """
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    torch.nn.Module.to(model, torch.float32)  # transformers' own .float() refuses quantized models
    state = {}
    for shard in sorted(Path(export_dir).glob("*.safetensors")):
        state.update({k: v for k, v in load_file(str(shard)).items() if v.is_floating_point()})
    unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise SystemExit(f"compare_autoround: {export_dir} holds tensors the loaded model lacks: {unexpected[:5]}")
    return model


def checkpoint_perplexity(export_dir: str, windows: Any) -> float:
    """Perplexity of an exported checkpoint (fp32) with qrunner's own perplexity function."""
    from qrunner.stages.evaluate import perplexity

    return perplexity(load_fp32(export_dir), windows, EVAL_BATCH_SIZE, export_dir, False)


def ratio(a: float, b: float) -> float:
    return round(a / b, 4)


def compare(cfg: Config, model: Path, work: Path, windows: Any, variants: List[str] = ("default",)
            ) -> Dict[str, Any]:
    """Both tools on one configuration (qrunner first, in each of `variants`), then every checkpoint scored on the
    same windows."""
    adir = work / f"{cfg.slug}-autoround"
    adir.mkdir(parents=True)
    runs: Dict[str, Dict[str, Any]] = {}
    for variant in variants:
        qdir = work / f"{cfg.slug}-qrunner" / variant
        qdir.mkdir(parents=True)
        print(f"[{cfg.label}] qrunner ({variant}) ...", flush=True)
        runs[variant] = run_qrunner(cfg, qdir, VARIANTS[variant])
    q = runs[variants[0]]
    print(f"[{cfg.label}] auto-round ...", flush=True)
    a = run_autoround(cfg, model, Path(q["samples"]), adir)
    print(f"[{cfg.label}] perplexity of the checkpoints ...", flush=True)
    for run in runs.values():
        run["ppl"] = checkpoint_perplexity(run["export_dir"], windows)
    a["ppl"] = checkpoint_perplexity(a["export_dir"], windows)
    return {"config": asdict(cfg), "label": cfg.label, "qrunner": q, "autoround": a,
            "qrunner_variants": {v: r for v, r in runs.items() if v != variants[0]},
            "ratio_qrunner_over_autoround": {"ppl": ratio(q["ppl"], a["ppl"]),
                                             "quantize_seconds": ratio(q["quantize_seconds"], a["quantize_seconds"]),
                                             "peak_rss_mb": ratio(q["peak_rss_mb"], a["peak_rss_mb"])}}


def markdown(rows: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    """The results as a Markdown table, one row per configuration."""
    lines = [
        f"# qrunner vs auto-round ({meta.get('device', 'cpu')})",
        "",
        f"Model: bundled demo-llama; {meta['iters']} iters, {meta['nsamples']} x {meta['seqlen']} calibration tokens "
        f"(identical windows for both), batch size {BATCH_SIZE}, seed {SEED}, fp32, sym int weights; perplexity on "
        f"{meta['eval_windows']} held-out windows of {meta['seqlen']} tokens, both checkpoints loaded with "
        f"transformers. auto-round {meta['autoround_version']}, torch {meta['torch_version']}, "
        f"{meta['cpu_count']} CPUs.",
        "",
        "| config | ppl FP | ppl qrunner | ppl auto-round | ppl q/a | quantize s qrunner | quantize s auto-round "
        "| time q/a | peak RSS MB qrunner | peak RSS MB auto-round | RSS q/a |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        q, a, x = r["qrunner"], r["autoround"], r["ratio_qrunner_over_autoround"]
        lines.append(f"| {r['label']} | {q['ppl_original_own']:.3f} | {q['ppl']:.3f} | {a['ppl']:.3f} | {x['ppl']:.4f} "
                     f"| {q['quantize_seconds']:.1f} | {a['quantize_seconds']:.1f} | {x['quantize_seconds']:.2f} "
                     f"| {q['peak_rss_mb']:.0f} | {a['peak_rss_mb']:.0f} | {x['peak_rss_mb']:.2f} |")
    extra = sorted({v for r in rows for v in r.get("qrunner_variants", {})})
    if extra:
        lines += ["", "Other qrunner variants (same windows, the same auto-round run):", "",
                  "| config | variant | ppl | ppl / auto-round | quantize s | time / auto-round | peak RSS MB |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            for variant, v in r.get("qrunner_variants", {}).items():
                a = r["autoround"]
                lines.append(f"| {r['label']} | {variant} | {v['ppl']:.3f} | {ratio(v['ppl'], a['ppl']):.4f} "
                             f"| {v['quantize_seconds']:.1f} | {ratio(v['quantize_seconds'], a['quantize_seconds']):.2f} "
                             f"| {v['peak_rss_mb']:.0f} |")
    lines += ["", "ppl FP: the unquantized model, from qrunner's own evaluation. q/a: qrunner divided by auto-round "
              "(below 1 favours qrunner). Quantize time: qrunner's `quantize` stage (block tuning; the `capture` "
              "stage is in the JSON) vs auto-round's `quantize()` call (input caching included). Peak RSS: each "
              "whole child process (imports, load, quantize, export; qrunner's also runs its evaluate stage).",
              *(["", "Peak VRAM (MB allocated during quantization), qrunner / auto-round: " + ", ".join(
                  f"{r['label']} {r['qrunner']['peak_vram_mb']} / {r['autoround']['peak_vram_mb']}" for r in rows)]
                if meta.get("device", "cpu") != "cpu" else []),
              "", f"Highest 1-minute load average seen at a child's start or end: {max_load(rows):.1f} on "
              f"{meta['cpu_count']} CPUs (above the CPU count, other processes competed and timings are noisy).", ""]
    return "\n".join(lines)


def max_load(rows: List[Dict[str, Any]]) -> float:
    runs = [r[side] for r in rows for side in ("qrunner", "autoround")]
    runs += [v for r in rows for v in r.get("qrunner_variants", {}).values()]
    return max(v for run in runs for v in run["load_avg_1min"])


def environment() -> Dict[str, Any]:
    import auto_round
    import torch
    import transformers

    return {"autoround_version": auto_round.__version__, "torch_version": torch.__version__,
            "transformers_version": transformers.__version__, "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def parse_args(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--schemes", default="w4a16,w2a16g64",
                   help="comma-separated wBa16[gG] configurations (G defaults to --group-size)")
    p.add_argument("--bits", type=int, help="run the single configuration w{bits}a16 g{group-size} instead")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--nsamples", default="32", help="comma-separated sample counts, e.g. 32,128")
    p.add_argument("--qrunner-variants", default="default",
                   help=f"comma-separated qrunner runs per configuration: {', '.join(VARIANTS)} (the first is compared)")
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--work", type=Path, help="keep run dirs, exports and child logs here (default: a temp dir)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda: both tools tune on the GPU (results go to "
                   "compare_autoround_cuda.json/.md)")
    return p.parse_args(argv)


def main(argv: List[str]) -> None:
    if argv[:1] == [CHILD_FLAG]:
        autoround_child(json.loads(argv[1]))
        return
    args = parse_args(argv)
    if importlib.util.find_spec("auto_round") is None:
        raise SystemExit("compare_autoround: the auto-round package is not installed; pip install -e .[bench]")
    from transformers import AutoTokenizer

    from qrunner._paths import asset

    pairs = [(args.bits, args.group_size)] if args.bits else parse_schemes(args.schemes, args.group_size)
    counts = [int(n) for n in str(args.nsamples).split(",") if n.strip()]
    variants = [v.strip() for v in args.qrunner_variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise SystemExit(f"compare_autoround: unknown qrunner variant(s) {unknown}; choose from {sorted(VARIANTS)}")
    configs = [Config(b, g, args.iters, n, args.seqlen, args.device) for n in counts for b, g in pairs]
    model = asset("demo-llama")
    windows = heldout_windows(AutoTokenizer.from_pretrained(str(model)), args.seqlen)
    meta = {**environment(), "iters": args.iters, "nsamples": args.nsamples, "seqlen": args.seqlen,
            "batch_size": BATCH_SIZE, "seed": SEED, "eval_windows": len(windows), "model": str(model),
            "device": args.device}
    with tempfile.TemporaryDirectory(prefix="compare_autoround-") as tmp:
        work = args.work.resolve() if args.work else Path(tmp)
        rows = [compare(cfg, model, work, windows, variants) for cfg in configs]
    args.out.mkdir(parents=True, exist_ok=True)
    name = "compare_autoround" if args.device == "cpu" else f"compare_autoround_{args.device.split(':')[0]}"
    (args.out / f"{name}.json").write_text(json.dumps({"settings": meta, "results": rows}, indent=2) + "\n")
    table = markdown(rows, meta)
    (args.out / f"{name}.md").write_text(table)
    print(table)
    print(f"wrote {args.out / (name + '.json')} and {args.out / (name + '.md')}")


if __name__ == "__main__":
    main(sys.argv[1:])
