#!/usr/bin/env python3
"""Full `family=diffusion` runs in `memory=low`: peak RSS and wall time vs the number of transformer blocks,
next to auto-round's own diffusion quantization of the same pipelines.

Random-weight FLUX pipeline folders are built locally (nothing is downloaded): a `FluxTransformer2DModel`
(`--heads` x `--head-dim`, inner width 512 by default; blocks half double-stream, half single-stream; bfloat16,
sharded safetensors) with a tiny CLIP text encoder, a tiny T5 encoder (their tokenizers built here), a tiny VAE and
a flow-matching scheduler. Every linear width inside the blocks is a multiple of 128. Folders are cached in
`--models-dir`.

Per depth, each tool runs as its own child process, one at a time, with OMP_NUM_THREADS=1 (and MKL_NUM_THREADS=1):

- qrunner: `python -m qrunner recipe=flux_w4a16 memory=low run.on_oom=fail model.compute_dtype=float32 ...
  eval.enabled=false` on a local prompt file (the whole run: data -> capture -> quantize -> export);
- auto-round: `AutoRound(<pipeline folder>, scheme="W4A16", group_size=128, ...)` with the same prompts (a local
  TSV with `id` and `caption` columns), iterations, samples, steps, image size, guidance and text length, fp32
  (`amp=False`), `low_cpu_mem_usage=True`, `device_map="cpu"`, then `quantize_and_save(format="auto_round")`.

Peak RSS is `/usr/bin/time -v`'s maximum resident set size of each child (ram_vs_depth's `measure`). `python -m
qrunner` is a supervisor that starts the worker and waits for it; a waited-for child's peak is part of its parent's
rusage, so the figure is the larger of the supervisor's and the worker's, i.e. the worker's. The worker's own
report.json peak is recorded next to it as a check. The baseline is a process that only imports torch,
transformers, diffusers and qrunner (`BASELINE_CODE`).

    python benchmarks/diffusion_ram_vs_blocks.py                       # blocks 4 8 16 32
    python benchmarks/diffusion_ram_vs_blocks.py --blocks 2 4 --skip-autoround   # smoke run

Writes `diffusion_ram_vs_blocks.json` and `.md` into --out (default benchmarks/results), rewritten after every run.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # every measured child inherits these (and so does this process)
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Dict, List, Optional  # noqa: E402

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]  # this checkout first
import ram_vs_depth as rvd  # noqa: E402  (child measurement, report reader, machine line)

REPO = rvd.REPO
MiB = 1024 * 1024
TARGET_FLAT_PCT = 10.0
BASELINE_CODE = "import torch, transformers, diffusers, qrunner.cli, qrunner.stages"
GUIDANCE = 3.5  # FluxPipeline's default, and qrunner's data.guidance_scale=null for Flux
SEED = 42
RESULT_NAME = "diffusion_ram_vs_blocks"

# --------------------------------------------------------------------------------------------------
# pipelines: the transformer built here; tokenizers, text encoders and VAE as the tests build them
# --------------------------------------------------------------------------------------------------


def _tiny_diffusion() -> Any:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    try:
        import tiny_diffusion
    finally:
        sys.path.pop(0)
    return tiny_diffusion


def flux_config(blocks: int, heads: int, head_dim: int, text_dim: int) -> Dict[str, Any]:
    """Half double-stream, half single-stream blocks; rotary axes split as FLUX.1's (16, 56, 56) at head 128."""
    side = (head_dim - 16) // 2
    return dict(patch_size=1, in_channels=64, num_layers=blocks // 2, num_single_layers=blocks - blocks // 2,
                attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=text_dim,
                pooled_projection_dim=text_dim, guidance_embeds=True, axes_dims_rope=(16, side, head_dim - 16 - side))


def check_widths(model: Any) -> None:
    """Every linear in the blocks has in and out features that are multiples of 128."""
    import torch

    for stack in ("transformer_blocks", "single_transformer_blocks"):
        for name, m in getattr(model, stack).named_modules():
            if isinstance(m, torch.nn.Linear) and (m.in_features % 128 or m.out_features % 128):
                raise SystemExit(f"{stack}.{name}: {m.in_features} -> {m.out_features} is not a multiple of 128")


def pipeline_key(a: argparse.Namespace, blocks: int) -> str:
    return f"fluxpipe-h{a.heads}x{a.head_dim}-t{a.text_dim}-b{blocks}"


def build_pipeline(a: argparse.Namespace, blocks: int, seed: int = 0) -> Path:
    """A full FluxPipeline folder (cached): transformer in bf16 shards of `--shard-size`, CLIP + T5 encoders and
    their tokenizers, VAE, scheduler. Written under a temporary name and renamed when complete."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    final = Path(a.models_dir) / pipeline_key(a, blocks)
    if (final / "model_index.json").is_file():
        return final
    tmp = final.with_name(final.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**flux_config(blocks, a.heads, a.head_dim, a.text_dim)).eval()
    check_widths(model)
    with torch.no_grad():  # adaLN / output projections start at zero in diffusers: give every weight a value
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    model = model.to(torch.bfloat16)
    model.save_pretrained(tmp / "transformer", max_shard_size=a.shard_size)
    del model
    FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096,
                                    base_shift=0.5, max_shift=1.15, shift=3.0).save_pretrained(tmp / "scheduler")
    tiny = _tiny_diffusion()
    index = {"_class_name": "FluxPipeline", "_diffusers_version": "0.42.1",
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "transformer": ["diffusers", "FluxTransformer2DModel"]}
    tiny.save_components(tmp, tiny.flux_text_parts(a.text_dim, a.text_dim, seed), index)
    (tmp / "model_index.json").write_text(json.dumps(index, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def transformer_info(folder: Path) -> Dict[str, Any]:
    files = sorted((folder / "transformer").glob("*.safetensors"))
    index = folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    params = None
    if index.is_file():
        params = round(json.loads(index.read_text())["metadata"]["total_size"] / 2 / 1e6, 1)
    return {"path": str(folder), "size_mb": round(sum(f.stat().st_size for f in files) / MiB, 1),
            "shards": len(files), "params_m": params}


def write_prompts(work: Path, nsamples: int) -> Dict[str, str]:
    """Exactly `nsamples` prompts (the first of qrunner's bundled list), so that both tools calibrate on the same
    ones whatever order each draws them in: a .txt for qrunner, a TSV (`id`, `caption`) for auto-round."""
    prompts = [p.strip() for p in (REPO / "qrunner" / "assets" / "prompts.txt").read_text().splitlines()
               if p.strip()][:nsamples]
    work.mkdir(parents=True, exist_ok=True)
    txt, tsv = work / "prompts.txt", work / "prompts.tsv"
    txt.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    tsv.write_text("id\tcaption\n" + "".join(f"{i}\t{p}\n" for i, p in enumerate(prompts)), encoding="utf-8")
    return {"txt": str(txt), "tsv": str(tsv), "prompts": prompts}


# --------------------------------------------------------------------------------------------------
# the runs
# --------------------------------------------------------------------------------------------------

def qrunner_command(a: argparse.Namespace, folder: Path, run_root: Path, prompts_txt: str) -> List[str]:
    return [sys.executable, "-m", "qrunner", "recipe=flux_w4a16", f"model.path={folder}", "memory=low",
            f"run.root={run_root}", "run.fresh=true", "run.show_progress=false", "run.on_oom=fail",
            "model.compute_dtype=float32", f"quant.iters={a.iters}", f"data.nsamples={a.nsamples}",
            f"data.num_inference_steps={a.steps}", f"data.height={a.size}", f"data.width={a.size}",
            f"data.max_sequence_length={a.max_sequence_length}", f"data.seed={SEED}", "eval.enabled=false",
            f"data.source={prompts_txt}"]


def measure(cmd: List[str], log: Path, cwd: Path, timeout: float) -> Dict[str, Any]:
    """ram_vs_depth's measurement (peak RSS from /usr/bin/time -v, wall), with the 1-minute load average before and
    after the child (the machine is shared: the times depend on it)."""
    before = round(os.getloadavg()[0], 2)
    result = rvd.measure(cmd, log, cwd, timeout)
    result.update(load_before=before, load_after=round(os.getloadavg()[0], 2))
    return result


def run_qrunner(a: argparse.Namespace, folder: Path, blocks: int, prompts_txt: str) -> Dict[str, Any]:
    work = Path(a.work_dir)
    run_root = work / "runs" / f"qrunner-b{blocks}"
    shutil.rmtree(run_root, ignore_errors=True)
    run_root.mkdir(parents=True)
    result = measure(qrunner_command(a, folder, run_root, prompts_txt), work / "logs" / f"qrunner-b{blocks}.log",
                     run_root, a.timeout)
    result.update(tool="qrunner", blocks=blocks)
    result.update(rvd.read_report(run_root) or {})
    if not a.keep_runs:
        shutil.rmtree(run_root, ignore_errors=True)
    return result


def autoround_child(a: argparse.Namespace) -> int:
    """Inside the measured child: auto-round's diffusion path on the pipeline folder, saved in auto_round format."""
    import torch

    import auto_round
    from auto_round import AutoRound

    torch.manual_seed(SEED)
    t0 = time.monotonic()
    ar = AutoRound(a.autoround_child, scheme="W4A16", bits=4, group_size=128, sym=True, iters=a.iters,
                   nsamples=a.nsamples, batch_size=8, dataset=a.tsv, seed=SEED, guidance_scale=GUIDANCE,
                   num_inference_steps=a.steps, calib_num_inference_steps=a.steps, generator_seed=SEED,
                   pipeline_call_kwargs={"height": a.size, "width": a.size,
                                         "max_sequence_length": a.max_sequence_length},
                   amp=False, enable_torch_compile=False, low_cpu_mem_usage=True, device_map="cpu")
    t1 = time.monotonic()
    ar.quantize_and_save(a.autoround_out, format="auto_round")
    t2 = time.monotonic()
    print("AUTOROUND_RESULT " + json.dumps({"version": auto_round.__version__, "init_s": round(t1 - t0, 2),
                                            "quantize_and_save_s": round(t2 - t1, 2)}), flush=True)
    return 0


def run_autoround(a: argparse.Namespace, folder: Path, blocks: int, prompts_tsv: str) -> Dict[str, Any]:
    work = Path(a.work_dir)
    out_dir = work / "runs" / f"autoround-b{blocks}"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--autoround-child", str(folder), "--tsv", prompts_tsv,
           "--autoround-out", str(out_dir / "model"), "--iters", str(a.iters), "--nsamples", str(a.nsamples),
           "--steps", str(a.steps), "--size", str(a.size), "--max-sequence-length", str(a.max_sequence_length)]
    log = work / "logs" / f"autoround-b{blocks}.log"
    result = measure(cmd, log, out_dir, a.timeout)
    result.update(tool="auto-round", blocks=blocks)
    for line in Path(log).read_text(errors="replace").splitlines():
        if line.startswith("AUTOROUND_RESULT "):
            result.update(json.loads(line.split(" ", 1)[1]))
    if result["returncode"]:
        result["error"] = last_error(Path(log))
    if not a.keep_runs:
        shutil.rmtree(out_dir, ignore_errors=True)
    return result


def last_error(log: Path) -> Optional[str]:
    """The last line of a child's log that looks like an exception (`SomethingError: ...`), else its last line."""
    lines = [ln.rstrip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if head and " " not in head and (head.endswith(("Error", "Exception")) or "Error" in head):
            return ln[:2000]
    return lines[-1][:2000] if lines else None


# --------------------------------------------------------------------------------------------------
# summary and outputs
# --------------------------------------------------------------------------------------------------

def pct(lo: Optional[float], hi: Optional[float]) -> Optional[float]:
    return None if lo is None or hi is None or lo <= 0 else round(100.0 * (hi - lo) / lo, 1)


def summarize(data: Dict[str, Any]) -> Dict[str, Any]:
    base = data["baseline"]["peak_rss_mb"]
    ok = {(r["tool"], r["blocks"]): r for r in data["runs"]
          if r["returncode"] == 0 and r.get("peak_rss_mb") is not None}
    depths = data["args"]["blocks"]
    lo, hi = min(depths), max(depths)
    out: Dict[str, Any] = {"smallest": lo, "largest": hi}
    for tool in ("qrunner", "auto-round"):
        p_lo, p_hi = ok.get((tool, lo), {}).get("peak_rss_mb"), ok.get((tool, hi), {}).get("peak_rss_mb")
        out[tool] = {"peak_change_pct": pct(p_lo, p_hi),
                     "above_baseline_change_pct": None if p_lo is None or p_hi is None or base is None
                     else pct(p_lo - base, p_hi - base)}
    q = out["qrunner"]
    out["qrunner"]["flat"] = (None if q["peak_change_pct"] is None else
                              abs(q["peak_change_pct"]) <= TARGET_FLAT_PCT)
    out["qrunner"]["flat_above_baseline"] = (None if q["above_baseline_change_pct"] is None else
                                             abs(q["above_baseline_change_pct"]) <= TARGET_FLAT_PCT)
    return out


def fmt(v: Optional[float], spec: str = ".0f") -> str:
    return "—" if v is None else f"{v:{spec}}"


def verdict(ok: Optional[bool]) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def markdown(data: Dict[str, Any]) -> str:
    a = data["args"]
    base = data["baseline"]["peak_rss_mb"]
    s = data.get("summary") or {}
    by = {(r["tool"], r["blocks"]): r for r in data["runs"]}
    lines = [
        "# Full diffusion runs in `memory=low`: peak RSS vs transformer blocks, next to auto-round", "",
        f"- command: `{data['command']}`",
        f"- machine: {data['machine']}; every measured child with OMP_NUM_THREADS=1 (MKL_NUM_THREADS=1), one at a "
        f"time; started {data['started']}, finished {data.get('finished', '(running)')}, total "
        f"{fmt(data.get('total_s'), '.0f')} s",
        f"- commit: {data['commit']}" + (" (+ uncommitted changes under qrunner/ or conf/)" if data["dirty"] else ""),
        f"- pipelines: random-weight FluxPipeline folders; transformer {a['heads']} heads x {a['head_dim']} (inner "
        f"{a['heads'] * a['head_dim']}), text width {a['text_dim']}, blocks half double-stream / half single-stream, "
        f"bf16 shards of {a['shard_size']}; tiny CLIP + T5 encoders, tiny VAE",
        f"- both tools: W4A16 group 128 (sym), {a['iters']} iterations, {a['nsamples']} prompts x {a['steps']} steps at "
        f"{a['size']} x {a['size']} px, guidance {GUIDANCE}, max_sequence_length {a['max_sequence_length']}, fp32 "
        "compute, CPU, saved in the auto_round format",
        "- qrunner: `python -m qrunner recipe=flux_w4a16 memory=low run.on_oom=fail model.compute_dtype=float32 "
        "eval.enabled=false ...` (data, capture, quantize, export)",
        f"- auto-round {data.get('autoround_version') or ''}: `AutoRound(<folder>, scheme='W4A16', group_size=128, "
        f"amp=False, enable_torch_compile=False, low_cpu_mem_usage=True, device_map='cpu', batch_size=8, ...)` + "
        "`quantize_and_save`"
        + (" (skipped)" if a.get("skip_autoround") else ""),
        f"- peak RSS: each child's maximum resident set size from {data.get('rss_method') or '/usr/bin/time -v'} "
        f"(qrunner: the supervisor and its worker; the worker dominates); MiB. Baseline (`python -c "
        f"\"{BASELINE_CODE}\"`): **{fmt(base)} MiB**", "",
        "| blocks | transformer on disk (MiB) | qrunner low: peak RSS (MiB) | qrunner: peak − baseline | "
        "qrunner: wall (s) | auto-round: peak RSS (MiB) | auto-round: wall (s) | 1-min load before / after "
        "(qrunner; auto-round) |",
        "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for d in a["blocks"]:
        q, r = by.get(("qrunner", d)), by.get(("auto-round", d))
        info = data["pipelines"].get(str(d), {})

        def peak(run: Optional[Dict[str, Any]]) -> str:
            if run is None:
                return "—"
            return f"failed (exit {run['returncode']})" if run["returncode"] else fmt(run.get("peak_rss_mb"))

        def load(run: Optional[Dict[str, Any]]) -> str:
            return "—" if run is None else f"{run.get('load_before')} / {run.get('load_after')}"

        above = (q["peak_rss_mb"] - base if q and not q["returncode"] and q.get("peak_rss_mb") is not None
                 and base is not None else None)
        lines.append(f"| {d} | {fmt(info.get('size_mb'), '.1f')} | {peak(q)} | {fmt(above)} | "
                     f"{fmt(q and q.get('wall_s'), '.1f')} | {peak(r)} | {fmt(r and r.get('wall_s'), '.1f')} | "
                     f"{load(q)}; {load(r)} |")
    if s:
        q = s["qrunner"]
        lines += ["",
                  f"**qrunner `memory=low`, {s['smallest']} → {s['largest']} blocks: peak RSS "
                  f"{fmt(q['peak_change_pct'], '+.1f')} %** ({verdict(q['flat'])}, target flat within "
                  f"±{TARGET_FLAT_PCT:.0f} %); peak − baseline {fmt(q['above_baseline_change_pct'], '+.1f')} % "
                  f"({verdict(q['flat_above_baseline'])} by the same ±{TARGET_FLAT_PCT:.0f} %, ram_vs_depth's "
                  "criterion)."]
        r = s["auto-round"]
        if r["peak_change_pct"] is not None:
            lines.append(f"auto-round, {s['smallest']} → {s['largest']} blocks: peak RSS "
                         f"{fmt(r['peak_change_pct'], '+.1f')} %, peak − baseline "
                         f"{fmt(r['above_baseline_change_pct'], '+.1f')} %.")
    stages: List[str] = []
    for run in data["runs"]:
        for name in (run.get("stages") or {}):
            if name not in stages:
                stages.append(name)
    if stages:
        lines += ["", "qrunner per stage (seconds / peak RSS MiB, from each run's report.json; the worker's own "
                  "figures):", "", "| blocks | " + " | ".join(stages) + " | report peak |",
                  "|---:|" + "---:|" * (len(stages) + 1)]
        for run in data["runs"]:
            if run["tool"] != "qrunner":
                continue
            st = run.get("stages") or {}
            cells = [f"{st[n]['seconds']:.1f} / {fmt(st[n].get('peak_rss_mb'))}" if n in st else "—" for n in stages]
            lines.append(f"| {run['blocks']} | " + " | ".join(cells) + f" | {fmt(run.get('report_peak_rss_mb'))} |")
    ar_runs = [r for r in data["runs"] if r["tool"] == "auto-round" and not r["returncode"]]
    if ar_runs:
        lines += ["", "auto-round inside its child: `AutoRound(...)` (loads the pipeline) / `quantize_and_save` "
                  "seconds: " + ", ".join(f"{r['blocks']} blocks {fmt(r.get('init_s'), '.1f')} / "
                                          f"{fmt(r.get('quantize_and_save_s'), '.1f')}" for r in ar_runs) + "."]
    failed = [r for r in data["runs"] if r["returncode"]]
    if failed:
        lines += ["", "## Failed runs", ""]
        for r in failed:
            lines += [f"- {r['tool']}, {r['blocks']} blocks, exit {r['returncode']}: "
                      f"`{r.get('error') or last_error(Path(r['log']))}` (log: `{r['log']}`)"]
    if data.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in data["notes"]]
    return "\n".join(lines) + "\n"


def write_outputs(data: Dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data["summary"] = summarize(data)
    (out / f"{RESULT_NAME}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    (out / f"{RESULT_NAME}.md").write_text(markdown(data))


def git_state() -> Dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "--short", "HEAD") or "unknown",
            "dirty": bool(git("status", "--porcelain", "--", "qrunner", "conf"))}


def autoround_version() -> Optional[str]:
    try:
        from importlib.metadata import version

        return version("auto-round")
    except Exception:  # noqa: BLE001
        return None


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, nargs="+", default=[4, 8, 16, 32], help="transformer depths (total blocks)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--text-dim", type=int, default=256, help="T5 width (joint_attention_dim) and CLIP width")
    p.add_argument("--shard-size", default="50MB")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--nsamples", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--max-sequence-length", type=int, default=32)
    p.add_argument("--skip-autoround", action="store_true")
    p.add_argument("--models-dir", default="/tmp/qrunner-bench-models")
    p.add_argument("--work-dir", default="/tmp/qrunner-bench-diffusion-ram")
    p.add_argument("--keep-runs", action="store_true", help="keep run directories and auto-round exports")
    p.add_argument("--timeout", type=float, default=1800, help="per child, seconds")
    p.add_argument("--autoround-child", help=argparse.SUPPRESS)
    p.add_argument("--autoround-out", help=argparse.SUPPRESS)
    p.add_argument("--tsv", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.blocks = sorted(set(a.blocks))
    if any(b < 2 for b in a.blocks):
        p.error("--blocks: at least 2 (one double-stream and one single-stream block)")
    return a


def main(argv: Optional[List[str]] = None) -> int:
    a = parse_args(argv)
    if a.autoround_child:
        return autoround_child(a)
    started = time.monotonic()
    work, out = Path(a.work_dir), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    data: Dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/diffusion_ram_vs_blocks.py", *(argv or sys.argv[1:])]),
        "machine": rvd.machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}, **git_state(),
        "args": {k: v for k, v in vars(a).items() if not k.startswith(("autoround_", "tsv"))},
        "autoround_version": None if a.skip_autoround else autoround_version(),
        "pipelines": {}, "runs": [], "notes": []}
    print(f"[bench] building pipelines {a.blocks} in {a.models_dir}", flush=True)
    folders = {}
    for d in a.blocks:
        t0 = time.monotonic()
        folders[d] = build_pipeline(a, d)
        data["pipelines"][str(d)] = transformer_info(folders[d])
        print(f"[bench] {folders[d]} ({data['pipelines'][str(d)]['size_mb']} MiB transformer, "
              f"{time.monotonic() - t0:.1f} s)", flush=True)
    prompts = write_prompts(work, a.nsamples)
    data["prompts"] = prompts["prompts"]
    baseline = measure([sys.executable, "-c", BASELINE_CODE], work / "logs" / "baseline.log", work, a.timeout)
    data["baseline"] = baseline
    data["rss_method"] = baseline["rss_method"]
    print(f"[bench] baseline peak RSS {baseline['peak_rss_mb']} MiB", flush=True)
    write_outputs(data, out)
    for d in a.blocks:
        r = run_qrunner(a, folders[d], d, prompts["txt"])
        data["runs"].append(r)
        print(f"[bench] qrunner {d} blocks: exit {r['returncode']}, peak {r['peak_rss_mb']} MiB "
              f"(report {r.get('report_peak_rss_mb')}), wall {r['wall_s']} s", flush=True)
        write_outputs(data, out)
        if not a.skip_autoround:
            r = run_autoround(a, folders[d], d, prompts["tsv"])
            data["runs"].append(r)
            print(f"[bench] auto-round {d} blocks: exit {r['returncode']}, peak {r['peak_rss_mb']} MiB, "
                  f"wall {r['wall_s']} s" + (f", error: {r.get('error')}" if r["returncode"] else ""), flush=True)
            write_outputs(data, out)
    data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    data["total_s"] = round(time.monotonic() - started, 1)
    write_outputs(data, out)
    print(markdown(data))
    return 0 if all(r["returncode"] == 0 for r in data["runs"] if r["tool"] == "qrunner") else 1


if __name__ == "__main__":
    sys.exit(main())
