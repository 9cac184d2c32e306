"""What `ram_vs_depth.py --shape NAME` checks besides the depth series: the issue's targets for a real model's
shape (peak RSS against a figure in GB, flatness in depth, memory=auto's prediction), and that the export
holds the source weights within the scheme's error.

The export check reads a few layers of the exported AutoRound checkpoint (qweight / qzeros / scales, lazily
with safe_open), unpacks them (`qrunner.export.auto_round.unpack_layer`, the layout transformers' AutoRound
loader reads: tests/test_export_loads_in_transformers.py checks that on small models), dequantizes, and
compares with the source checkpoint's bf16 weights group by group: every element within one quantization
step of the source clipped to its group's grid (|w - w_q| <= |scale| + the distance of w outside the grid: the
rounding offsets move a weight by at most half a step beyond rounding's half step, and min/max tuning may
narrow a group's range, clipping the weights beyond it), and the relative RMS error.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

# the targets per shape: peak RSS of memory=low at the largest depth (GB), flatness in depth (%)
SHAPE_TARGETS: Dict[str, Dict[str, float]] = {
    "llama-3.1-8b": {"low_peak_gb": 4.0, "low_peak_vs_ckpt": 0.25, "depth_spread_pct": 10.0},
    "qwen2.5-14b": {"low_peak_gb": 6.0},
}
PREDICTION_TOLERANCE_PCT = 15.0
GiB = 1024.0  # MiB per GiB


def _shards(folder: Path) -> Dict[str, Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    out: Dict[str, Path] = {}
    from safetensors import safe_open

    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            out.update({k: shard for k in f.keys()})
    return out


def _tensor(shards: Dict[str, Path], key: str):
    from safetensors import safe_open

    with safe_open(str(shards[key]), framework="pt") as f:
        return f.get_tensor(key)


def check_export(source: Path, export: Path, depth: int,
                 projections: Sequence[str] = ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj")
                 ) -> Dict[str, Any]:
    """Dequantize `projections` of the first, middle and last block of the AutoRound export in `export` and
    compare them with the source checkpoint's weights."""
    import torch

    from qrunner.export.auto_round import checkpoint_group_size, unpack_layer

    qc = json.loads((export / "config.json").read_text())["quantization_config"]
    src, out = _shards(source), _shards(export)
    rows: List[Dict[str, Any]] = []
    for block in sorted({0, depth // 2, depth - 1}):
        for proj in projections:
            name = f"model.layers.{block}.{proj}"
            w = _tensor(src, f"{name}.weight").float()
            out_f, in_f = w.shape
            group = checkpoint_group_size(in_f, int(qc["group_size"]))
            packed = {k: _tensor(out, f"{name}.{k}") for k in ("qweight", "qzeros", "scales")}
            qw = unpack_layer(packed, int(qc["bits"]), group, bool(qc["sym"]), qc["packing_format"], in_f, out_f)
            wq = qw.dequantize(torch.float32)
            err = (wq - w).abs()
            scale = qw.scale.float().repeat_interleave(group, dim=1)[:, :in_f]
            zero = qw.zero.float().repeat_interleave(group, dim=1)[:, :in_f]
            step = scale.abs()
            # the group's grid [scale * (0 - zero), scale * (maxq - zero)]: AutoRound's min/max tuning may narrow
            # it, and a weight outside it is clipped to its end; the error beyond that distance is rounding's
            ends = torch.stack([scale * (0 - zero), scale * ((2 ** int(qc["bits"]) - 1) - zero)])
            outside = (ends.amin(0) - w).clamp_min(0) + (w - ends.amax(0)).clamp_min(0)
            worst = float(((err - outside) / step.clamp_min(1e-12)).max())
            rows.append({"layer": name, "shape": [out_f, in_f],
                         "max_error_in_steps": round(worst, 4),
                         "rel_rms_error": round(float(err.pow(2).mean().sqrt() / w.pow(2).mean().sqrt()), 4)})
    ok = all(r["max_error_in_steps"] <= 1.0 + 1e-3 for r in rows)
    return {"export": str(export), "format": qc["packing_format"], "bits": qc["bits"],
            "group_size": qc["group_size"], "layers": rows, "within_one_step": ok}


def find_export(run_root: Path) -> Optional[Path]:
    """The AutoRound export folder of the run under `run_root` (`<root>/<recipe>/<hash>/model`)."""
    found = sorted(run_root.glob("*/*/model/config.json"))
    return found[0].parent if found else None


def shape_targets(data: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The --shape run's targets, each with its measured value and pass (None when the runs are missing)."""
    shape = data["args"].get("shape")
    goal = SHAPE_TARGETS.get(shape or "", {})
    runs = [r for r in data["runs"] if r.get("tool") == "qrunner" and r["returncode"] == 0]
    low = {r["depth"]: r for r in runs if r["mode"] == "low"}
    ckpts = {int(k): v for k, v in data["checkpoints"].items()}
    top = max(data["args"]["depths"])
    out: List[Dict[str, Any]] = []
    if "low_peak_gb" in goal:
        peak = low.get(top, {}).get("peak_rss_mb")
        out.append({"target": f"low: peak RSS at depth {top} <= {goal['low_peak_gb']:.1f} GB",
                    "value": None if peak is None else f"{peak / GiB:.2f} GB",
                    "pass": None if peak is None else peak / GiB <= goal["low_peak_gb"]})
    if "low_peak_vs_ckpt" in goal:
        peak, size = low.get(top, {}).get("peak_rss_mb"), ckpts.get(top, {}).get("size_mb")
        out.append({"target": f"low: peak at depth {top} <= {goal['low_peak_vs_ckpt']:.2f} x the bf16 checkpoint",
                    "value": None if peak is None or not size else f"{peak / size:.3f} x ({size / GiB:.1f} GB)",
                    "pass": None if peak is None or not size else peak / size <= goal["low_peak_vs_ckpt"]})
    if "depth_spread_pct" in goal and len(low) >= 2:
        p = {d: r["peak_rss_mb"] for d, r in low.items()}
        spread = 100.0 * (max(p.values()) - min(p.values())) / min(p.values())
        out.append({"target": f"low: peaks at depths {', '.join(map(str, sorted(p)))} within "
                              f"{goal['depth_spread_pct']:.0f} % of each other",
                    "value": f"{spread:.1f} %", "pass": spread <= goal["depth_spread_pct"]})
    for r in runs:
        predicted = ((r.get("memory") or {}).get("predicted_peak_mb") or {}).get(r["mode"])
        if predicted and r.get("peak_rss_mb"):
            off = 100.0 * (predicted - r["peak_rss_mb"]) / r["peak_rss_mb"]
            out.append({"target": f"memory=auto's prediction for {r['mode']} d{r['depth']} within "
                                  f"{PREDICTION_TOLERANCE_PCT:.0f} % of the measured peak",
                        "value": f"{predicted:.0f} vs {r['peak_rss_mb']:.0f} MiB ({off:+.1f} %)",
                        "pass": abs(off) <= PREDICTION_TOLERANCE_PCT})
    for r in runs:
        check = r.get("export_check")
        if check:
            worst = max(x["max_error_in_steps"] for x in check["layers"])
            rms = max(x["rel_rms_error"] for x in check["layers"])
            out.append({"target": f"{r['mode']} d{r['depth']}: export's dequantized weights within one step of "
                                  f"the source ({len(check['layers'])} layers)",
                        "value": f"max {worst:.3f} steps, rel. RMS error <= {rms:.3f}",
                        "pass": check["within_one_step"]})
    return out


def predicted_peaks(overrides: Sequence[str]) -> Dict[str, float]:
    """memory=auto's predicted peak (MiB) per mode for the run `qrunner OVERRIDES...`, computed in this process on
    the meta skeleton (nothing is loaded)."""
    import logging

    from hydra import compose, initialize_config_dir

    from qrunner._paths import conf_dir
    from qrunner.cli import _register
    from qrunner.memory.predict import predict_peaks_mb
    from qrunner.models.registry import get_family
    from qrunner.session import ModelSession

    _register()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    session = ModelSession(cfg, get_family(cfg.family.name), logging.getLogger("qrunner"))
    return {mode: round(value) for mode, value in predict_peaks_mb(cfg, session).items()}


def repredict(data: Dict[str, Any]) -> None:
    """Replace each qrunner run's recorded predictions by the current model's (the run's own are kept as
    `predicted_at_run_mb`)."""
    import shlex

    for run in data["runs"]:
        if run.get("tool") != "qrunner" or not run.get("memory"):
            continue
        argv = shlex.split(run["cmd"])
        overrides = argv[argv.index("qrunner") + 1:]
        memory = run["memory"]
        memory.setdefault("predicted_at_run_mb", memory.get("predicted_peak_mb"))
        memory["predicted_peak_mb"] = predicted_peaks(overrides)
        memory["repredicted"] = True
