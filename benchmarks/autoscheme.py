#!/usr/bin/env python3
"""scheme=auto (AutoScheme) benchmark: peak RSS vs depth in memory=low, and qrunner next to auto-round's AutoScheme.

Part 1, peak RSS flat in depth: random-weight Llama checkpoints of growing depth are built with
`ram_vs_depth.py`'s builder (bf16, written tensor by tensor, cached in `--models-dir`); on each,
`python -m qrunner scheme=auto memory=low quant.iters=0 eval.enabled=false` runs as a child process. Recorded
per depth: the child's peak RSS (`/usr/bin/time -v`, as in ram_vs_depth), its wall time, and the
`autoscheme_scores` stage's seconds and peak RSS from its report.json. The criterion is ram_vs_depth's, computed
by its own `summarize`: (peak - baseline) may grow by at most TARGET_LOW_GROWTH_PCT (10 %) from the shallowest to
the deepest checkpoint, relative to the shallowest's (peak - baseline); the baseline is a process that only imports
torch, transformers and qrunner.

Part 2, next to auto-round (skipped with `--skip-autoround`; without `auto_round` only qrunner's side runs): on the
bundled demo model, same options (W2 g64, W4 g128, W8 g128), same average-bits target, same scoring samples
(qrunner's own scoring windows, `scoring_windows()` of its run config: auto-round's AutoScheme only takes a dataset
*name or file*, so they go to it as a JSON list of decoded texts that re-tokenize to the same ids; the match is
checked and recorded) and RTN for both (`quant.iters=0`; auto-round `iters=0, disable_opt_rtn=True`), so only the
scheme choice differs. Each tool runs in its own child; peak RSS is the child's ru_maxrss (`/usr/bin/time -v`).
Scheme-search time: qrunner's `autoscheme_scores` + `autoscheme` stages; auto-round's `post_init()` (where
AutoScheme runs). Average bits: each tool's own figure and qrunner's accounting (`layer_cost_bits`) of both choices.
Perplexity: both exported checkpoints (and the unquantized model) loaded in fp32 with transformers and scored with
qrunner's `perplexity()` on the windows qrunner evaluates (compare_autoround.py's loader).

    python3 benchmarks/autoscheme.py                    # both parts, the defaults below (15-20 min on 2 cores)
    python3 benchmarks/autoscheme.py --skip-autoround --hidden 768 --intermediate 2048 --vocab 32000 --depths 4,8,16,32

Options: --depths 2,4,8,16 --hidden 512 --intermediate 1408 --vocab 4096 (part 1 checkpoints);
--nsamples 8 --seqlen 128 (part 1: calibration and scoring samples); --avg-bits 3 --options w2a16g64,w4a16,w8a16
--score-nsamples 16 --score-seqlen 256 (part 2); --skip-depth, --skip-autoround; --out benchmarks/results;
--models-dir, --work-dir (kept: run dirs, exports and logs), --timeout (seconds per child).
Writes `autoscheme.json` and `autoscheme.md` into --out, rewritten after every run.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]  # this checkout first
import compare_autoround as ca  # noqa: E402  (loader and perplexity of exported checkpoints)
import ram_vs_depth as rvd  # noqa: E402  (checkpoints, child measurement, baseline, growth criterion)

REPO = rvd.REPO
DEMO = REPO / "qrunner" / "assets" / "demo-llama"


def qrunner_cmd(model: Path, root: Path, a: argparse.Namespace, nsamples: int, seqlen: int,
                extra: List[str]) -> List[str]:
    return [sys.executable, "-m", "qrunner", f"model.path={model}", "scheme=auto",
            f"scheme.auto.avg_bits={a.avg_bits}", f"scheme.auto.options=[{','.join(a.options)}]",
            f"scheme.auto.nsamples={nsamples}", f"scheme.auto.seqlen={seqlen}", "memory=low", "quant.iters=0",
            "eval.enabled=false", f"run.root={root}", "run.fresh=true", "run.show_progress=false", *extra]


def run_child(cmd: List[str], log: Path, cwd: Path, timeout: float) -> Dict[str, Any]:
    """ram_vs_depth's measure() (peak RSS via /usr/bin/time -v), plus the 1-minute load average before/after."""
    load = os.getloadavg()[0]
    result = rvd.measure(cmd, log, cwd, timeout)
    result["load_avg_1min"] = [round(load, 2), round(os.getloadavg()[0], 2)]
    return result


def git_state() -> Dict[str, Any]:
    """The checkout's commit and its uncommitted changes under qrunner/ and conf/ (what the children ran)."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"),
            "uncommitted": [ln.strip() for ln in git("status", "--porcelain", "--", "qrunner", "conf").splitlines()]}


def full_report(root: Path) -> Optional[Dict[str, Any]]:
    found = sorted(root.glob("**/report.json"))
    return json.loads(found[0].read_text()) if found else None


# ---------------------------------------------------------------------------------------------- part 1
def depth_run(ckpt: Path, depth: int, a: argparse.Namespace) -> Dict[str, Any]:
    root = Path(a.work_dir) / "depth" / f"d{depth}"
    cmd = qrunner_cmd(ckpt, root, a, a.nsamples, a.seqlen,
                      [f"data.nsamples={a.nsamples}", f"data.seqlen={a.seqlen}"])
    result = run_child(cmd, Path(a.work_dir) / "logs" / f"depth-d{depth}.log", REPO, a.timeout)
    result.update(mode="low", depth=depth, **(rvd.read_report(root) or {}))
    rep = full_report(root) or {}
    result["autoscheme"] = {k: v for k, v in (rep.get("autoscheme") or {}).items() if k != "option_of_layer"}
    return result


def depth_summary(part: Dict[str, Any], depths: List[int]) -> None:
    ckpts = {int(k): v for k, v in part["checkpoints"].items()}
    s = rvd.summarize(part["runs"], part["baseline"]["peak_rss_mb"], ckpts, ["low"], depths)
    part["summary"] = s["per_mode"]["low"]
    g = part["summary"].get("growth_above_baseline_pct")
    part["target"] = {"text": f"memory=low, scheme=auto: (peak - baseline) grows <= {rvd.TARGET_LOW_GROWTH_PCT:g} % "
                              f"from depth {min(depths)} to {max(depths)} (ram_vs_depth's definition)",
                      "value_pct": g, "pass": None if g is None else g <= rvd.TARGET_LOW_GROWTH_PCT}


# ---------------------------------------------------------------------------------------------- part 2
def ar_option(name: str) -> Any:
    from auto_round.schemes import QuantizationScheme
    from qrunner.quant.scheme import parse_scheme_name

    s = parse_scheme_name(name)
    return "BF16" if s is None else QuantizationScheme.from_dict(
        {"bits": s.bits, "group_size": s.group_size, "sym": s.sym, "data_type": "int", "act_bits": 16})


def autoround_child(spec_file: str) -> int:
    """In the child: AutoScheme + RTN with auto-round on the demo model, saved in the auto_round format."""
    spec = json.loads(Path(spec_file).read_text())
    out: Dict[str, Any] = {}
    try:
        import auto_round
        from auto_round import AutoRound, AutoScheme
        from auto_round.auto_scheme.utils import compute_avg_bits_for_model

        out["version"] = auto_round.__version__
        n, L = spec["nsamples"], spec["seqlen"]
        scheme = AutoScheme(avg_bits=spec["avg_bits"], options=[ar_option(o) for o in spec["options"]], nsamples=n,
                            seqlen=L, dataset=spec["dataset"], device_map="cpu", ignore_scale_zp_bits=False,
                            enable_torch_compile=False)
        t0 = time.perf_counter()
        ar = AutoRound(spec["model"], scheme=scheme, iters=0, disable_opt_rtn=True, disable_model_free=True,
                       dataset=spec["dataset"], nsamples=n, seqlen=L, device_map="cpu", enable_torch_compile=False,
                       low_cpu_mem_usage=True)
        t1 = time.perf_counter()
        ar.post_init()  # AutoScheme: scores every option, then picks the per-layer schemes
        t2 = time.perf_counter()
        ar.quantize()
        t3 = time.perf_counter()
        out.update(init_s=round(t1 - t0, 2), scheme_search_s=round(t2 - t1, 2), quantize_s=round(t3 - t2, 2))
        out["layer_config"] = {k: {f: v.get(f) for f in ("bits", "group_size", "sym")}
                               for k, v in ar.layer_config.items() if v.get("bits", 16) < 16}
        out["avg_bits_own"] = compute_avg_bits_for_model(ar.model)[0]
        t = time.perf_counter()
        ar.save_quantized(spec["export_dir"], format="auto_round", inplace=True)
        out["save_s"] = round(time.perf_counter() - t, 2)
        rc = 0
    except Exception:  # recorded in the results instead of a number
        out["error"] = traceback.format_exc()
        rc = 1
    Path(spec["result"]).write_text(json.dumps(out, indent=1))
    return rc


def layer_shapes(model_dir: Path) -> Dict[str, tuple]:
    """(out, in) of every 2-D `*.weight` of a checkpoint, from the safetensors headers."""
    from safetensors import safe_open

    shapes = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            shapes.update({k[:-7]: tuple(st.get_slice(k).get_shape()) for k in st.keys() if k.endswith(".weight")})
    return {k: v for k, v in shapes.items() if len(v) == 2}


def qrunner_avg_bits(choice: Dict[str, str], shapes: Dict[str, tuple]) -> float:
    """Average bits of a layer -> option map with qrunner's accounting (scales and zero points included)."""
    from qrunner.quant.bit_budget import layer_cost_bits
    from qrunner.quant.scheme import parse_scheme_name

    bits = weights = 0
    for name, option in choice.items():
        (o, i), s = shapes[name], parse_scheme_name(option)
        bits += layer_cost_bits(i, o, s.bits if s else 16, s.group_size if s else -1, s.sym if s else True)
        weights += i * o
    return bits / weights


def option_counts(choice: Dict[str, str], options: List[str]) -> Dict[str, int]:
    return {o: sum(v == o for v in choice.values()) for o in options}


def compare(a: argparse.Namespace, data: Dict[str, Any], out: Path) -> None:
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from qrunner.quant.scheme import parse_scheme_name
    from qrunner.stages.autoscheme_scores import scoring_windows
    from qrunner.stages.evaluate import evaluation_windows

    work = Path(a.work_dir) / "compare"
    part = data["compare"] = {"model": str(DEMO), "avg_bits_target": a.avg_bits, "options": a.options,
                              "score_nsamples": a.score_nsamples, "score_seqlen": a.score_seqlen}
    print("[bench] compare: qrunner scheme=auto on the demo model ...", flush=True)
    qroot = work / "qrunner"
    q = run_child(qrunner_cmd(DEMO, qroot, a, a.score_nsamples, a.score_seqlen, []), work / "qrunner.log", REPO,
                  a.timeout)
    rep = full_report(qroot)
    if q["returncode"] or rep is None:
        part["qrunner"] = {**q, "error": "qrunner failed; see output_tail"}
        return
    st = {s["name"]: s for s in rep["stages"]}
    auto = rep["autoscheme"]
    q.update(scheme_search_s=round(st["autoscheme_scores"]["seconds"] + st["autoscheme"]["seconds"], 2),
             stage_seconds={k: round(v["seconds"], 2) for k, v in st.items()}, avg_bits_own=auto["avg_bits"],
             choice=auto["option_of_layer"], export_dir=rep["export_dir"])
    part["qrunner"] = q
    cfg = OmegaConf.load(Path(rep["run_dir"]) / "config.yaml")
    tok = AutoTokenizer.from_pretrained(str(DEMO))
    windows = scoring_windows(cfg, tok)
    # auto-round's local-file dataset rstrip()s every text; the EOS marker keeps trailing whitespace tokens
    # (it is cut again by truncation to seqlen)
    texts = [tok.decode(w) + (tok.eos_token or ".") for w in windows]
    same = sum(tok(t, truncation=True, max_length=a.score_seqlen)["input_ids"] == w.tolist()
               for t, w in zip(texts, windows))
    part["scoring_windows_reproduced"] = f"{same}/{len(windows)}"
    (work / "scoring.json").write_text(json.dumps(texts))
    data["notes"].append(f"auto-round scored on qrunner's {len(windows)} scoring windows, passed as decoded text "
                         f"(a JSON file; AutoScheme accepts no tensors); {same}/{len(windows)} re-tokenize to the "
                         "identical ids.")
    write(data, out)
    if not rvd.autoround_available():
        part["autoround"] = {"error": "auto_round is not importable (pip install -e .[bench])"}
    else:
        print("[bench] compare: auto-round AutoScheme on the demo model ...", flush=True)
        spec = {"model": str(DEMO), "options": a.options, "avg_bits": a.avg_bits, "nsamples": a.score_nsamples,
                "seqlen": a.score_seqlen, "dataset": str(work / "scoring.json"),
                "export_dir": str(work / "autoround-model"), "result": str(work / "autoround-result.json")}
        (work / "autoround-spec.json").write_text(json.dumps(spec))
        data["notes"].append("auto-round: AutoRound(iters=0, disable_opt_rtn=True, disable_model_free=True, "
                             "low_cpu_mem_usage=True, device_map='cpu', enable_torch_compile=False) with AutoScheme("
                             "ignore_scale_zp_bits=False, its defaults: batch_size 8, low_gpu_mem_usage=True, "
                             "low_cpu_mem_usage=True); "
                             "scheme search = its post_init() call (AutoScheme scoring + selection).")
        os.environ["AR_AUTO_SCHEME_CACHE"] = str(work / "ar-scheme-cache")  # fresh: no scores reused across runs
        cmd = [sys.executable, str(Path(__file__).resolve()), "--autoround-child", str(work / "autoround-spec.json")]
        r = run_child(cmd, work / "autoround.log", REPO, a.timeout)
        res = Path(spec["result"])
        r.update(json.loads(res.read_text()) if res.is_file() else {"error": "the child wrote no result"})
        if not r.get("error"):
            label = {(s.bits, s.group_size): o for o in a.options if (s := parse_scheme_name(o))}
            r["choice"] = {k: label.get((v["bits"], v["group_size"]), f"w{v['bits']}g{v['group_size']}")
                           for k, v in r.pop("layer_config").items()}
            r["export_dir"] = spec["export_dir"]
        part["autoround"] = r
    write(data, out)
    shapes = layer_shapes(DEMO)
    evalw = evaluation_windows(cfg, tok)
    part["eval_windows"] = len(evalw)
    print(f"[bench] compare: perplexity on {len(evalw)} windows ...", flush=True)
    part["ppl_unquantized"] = ca.checkpoint_perplexity(str(DEMO), evalw)
    for side in ("qrunner", "autoround"):
        r = part[side]
        if r.get("error"):
            continue
        r["avg_bits_qrunner_accounting"] = qrunner_avg_bits(r["choice"], shapes)
        r["layers_per_option"] = option_counts(r["choice"], a.options)
        try:
            r["ppl"] = ca.checkpoint_perplexity(r["export_dir"], evalw)
        except BaseException as e:  # noqa: BLE001 (SystemExit from the loader included)
            r["ppl_error"] = repr(e)
            data["notes"].append(f"{side}: its checkpoint could not be scored: {e!r}")
        write(data, out)
    if not part["autoround"].get("error"):
        qc, rc = part["qrunner"]["choice"], part["autoround"]["choice"]
        part["same_option_layers"] = f"{sum(qc[k] == rc.get(k) for k in qc)}/{len(qc)}"


# ---------------------------------------------------------------------------------------------- outputs
def f(v: Any, spec: str = ".1f") -> str:
    return "—" if v is None else f"{v:{spec}}"


def markdown(data: Dict[str, Any]) -> str:
    a = data["args"]
    lines = ["# scheme=auto (AutoScheme) benchmark", "", f"- command: `{data['command']}`",
             f"- machine: {data['machine']}; finished {data['finished_at']}",
             f"- checkout: {data['git']['commit']}" + (f", uncommitted: {'; '.join(data['git']['uncommitted'])}"
                                                       if data["git"]["uncommitted"] else ""), ""]
    p = data.get("depth")
    if p:
        base = p["baseline"]["peak_rss_mb"]
        lines += ["## Peak RSS vs depth, memory=low", "",
                  f"Random-weight Llama, hidden {a['hidden']}, intermediate {a['intermediate']}, vocab {a['vocab']}; "
                  f"`scheme=auto` ({', '.join(a['options'])}, {a['avg_bits']:g} bits), quant.iters=0, eval off, "
                  f"{a['nsamples']} x {a['seqlen']} calibration and scoring tokens. Peak RSS: the child's "
                  f"{p['baseline']['rss_method']}; baseline (imports only) **{f(base, '.0f')} MiB**.", "",
                  "| depth | params (M) | bf16 ckpt (MiB) | peak RSS (MiB) | peak − baseline | wall (s) "
                  "| autoscheme_scores s / peak MiB | avg bits | load (1 min) |", "|---:" * 9 + "|"]
        for r in p["runs"]:
            c = p["checkpoints"].get(r["depth"]) or p["checkpoints"].get(str(r["depth"]), {})
            sc = (r.get("stages") or {}).get("autoscheme_scores", {})
            above = r["peak_rss_mb"] - base if r["peak_rss_mb"] else None
            lines.append(f"| {r['depth']} | {f(c.get('params_m'))} | {f(c.get('size_mb'), '.0f')} | "
                         + ("crashed" if r["returncode"] else f(r["peak_rss_mb"], '.0f'))
                         + f" | {f(above, '.0f')} | {f(r['wall_s'])} | "
                         f"{f(sc.get('seconds'))} / {f(sc.get('peak_rss_mb'), '.0f')} | "
                         f"{f(r.get('autoscheme', {}).get('avg_bits'), '.3f')} | "
                         f"{'→'.join(map(str, r['load_avg_1min']))} |")
        t = p.get("target") or {}
        verdict = "n/a" if t.get("pass") is None else ("PASS" if t["pass"] else "FAIL")
        lines += ["", f"**{verdict}**: {t.get('text')}: measured {f(t.get('value_pct'), '+.1f')} %.", ""]
    c = data.get("compare")
    if c:
        lines += ["## Next to auto-round's AutoScheme (demo model, RTN)", "",
                  f"Options {', '.join(c['options'])}; target {c['avg_bits_target']:g} bits; {c['score_nsamples']} x "
                  f"{c['score_seqlen']} scoring tokens (qrunner's windows, "
                  f"{c.get('scoring_windows_reproduced', '—')} reproduced exactly for auto-round); perplexity on "
                  f"{c.get('eval_windows', '—')} held-out windows "
                  f"(unquantized: {f(c.get('ppl_unquantized'), '.3f')}).", "",
                  "| tool | scheme search (s) | child wall (s) | peak RSS (MiB) | avg bits (own) | avg bits (qrunner "
                  "accounting) | layers per option | ppl | load (1 min) |", "|---|" + "---:|" * 5 + "---|---:|---:|"]
        version = (c.get("autoround") or {}).get("version", "")
        names = {"qrunner": "qrunner (memory=low)", "autoround": f"auto-round {version}"}
        for side, name in names.items():
            r = c.get(side)
            if not r:
                continue
            if r.get("error"):
                lines.append(f"| {name} | failed: see below | | | | | | | |")
                continue
            lines.append(f"| {name} | {f(r.get('scheme_search_s'))} | {f(r['wall_s'])} | "
                         f"{f(r['peak_rss_mb'], '.0f')} | "
                         f"{f(r.get('avg_bits_own'), '.4f')} | {f(r.get('avg_bits_qrunner_accounting'), '.4f')} | "
                         f"{', '.join(f'{k} {v}' for k, v in (r.get('layers_per_option') or {}).items())} | "
                         f"{f(r.get('ppl'), '.3f')} | {'→'.join(map(str, r['load_avg_1min']))} |")
        if c.get("same_option_layers"):
            lines += ["", f"Layers given the same option by both tools: {c['same_option_layers']}."]
        for side in ("qrunner", "autoround"):
            err = (c.get(side) or {}).get("error")
            if err:
                lines += ["", f"### {side} failed", "", "```", str(err)[-3000:],
                          *(c[side].get("output_tail") or []), "```"]
    if data["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in data["notes"]]
    return "\n".join(lines) + "\n"


def write(data: Dict[str, Any], out: Path) -> None:
    data["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    out.mkdir(parents=True, exist_ok=True)
    (out / "autoscheme.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    (out / "autoscheme.md").write_text(markdown(data))


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--depths", type=rvd.int_list, default=[2, 4, 8, 16])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--nsamples", type=int, default=8, help="part 1: data.nsamples and scheme.auto.nsamples")
    p.add_argument("--seqlen", type=int, default=128, help="part 1: data.seqlen and scheme.auto.seqlen")
    p.add_argument("--avg-bits", type=float, default=3.0)
    p.add_argument("--options", type=lambda s: [o.strip() for o in s.split(",") if o.strip()],
                   default=["w2a16g64", "w4a16", "w8a16"])
    p.add_argument("--score-nsamples", type=int, default=16, help="part 2: scoring samples (both tools)")
    p.add_argument("--score-seqlen", type=int, default=256, help="part 2: scoring seqlen (both tools)")
    p.add_argument("--skip-depth", action="store_true")
    p.add_argument("--skip-autoround", action="store_true")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--models-dir", default="/tmp/qrunner-bench-models")
    p.add_argument("--work-dir", default="/tmp/qrunner-bench-autoscheme")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--autoround-child", metavar="SPEC", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    a = parse_args(argv)
    if a.autoround_child:
        return autoround_child(a.autoround_child)
    out, work = Path(a.out), Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    given = sys.argv[1:] if argv is None else argv
    data: Dict[str, Any] = {"command": shlex.join(["python3", "benchmarks/autoscheme.py", *given]),
                            "args": {k: v for k, v in vars(a).items() if k != "autoround_child"},
                            "machine": rvd.machine(), "git": git_state(), "notes": []}
    ok = True
    if not a.skip_depth:
        part = data["depth"] = {"baseline": rvd.measure_baseline(work, a.timeout), "checkpoints": {}, "runs": []}
        print(f"[bench] baseline peak RSS {part['baseline']['peak_rss_mb']} MiB", flush=True)
        for d in a.depths:
            ckpt = rvd.build_checkpoint(Path(a.models_dir), a.hidden, a.intermediate, a.vocab, d)
            part["checkpoints"][d] = rvd.checkpoint_info(ckpt)
            print(f"[bench] depth {d}: qrunner scheme=auto memory=low ...", flush=True)
            r = depth_run(ckpt, d, a)
            part["runs"].append(r)
            ok &= r["returncode"] == 0
            print(f"[bench]   exit {r['returncode']}, peak {r['peak_rss_mb']} MiB, wall {r['wall_s']} s", flush=True)
            depth_summary(part, a.depths)
            write(data, out)
        t = part["target"]
        print(f"[bench] {'n/a' if t['pass'] is None else ('PASS' if t['pass'] else 'FAIL')}: {t['text']} "
              f"({t['value_pct']} %)", flush=True)
    if a.skip_autoround:
        data["notes"].append("part 2 (next to auto-round) skipped: --skip-autoround")
    else:
        compare(a, data, out)
        ok &= not any((data["compare"].get(s) or {}).get("error") for s in ("qrunner", "autoround"))
    if git_state() != data["git"]:
        data["notes"].append(f"the checkout changed during the run; at the end: {git_state()}")
    write(data, out)
    print(f"[bench] wrote {out / 'autoscheme.json'} and {out / 'autoscheme.md'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
