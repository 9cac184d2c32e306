"""Checks on a composed config that the schema's types cannot express. Run before anything loads."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any, Callable, Dict

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from qrunner.config.provenance import Provenance
from qrunner.errors import ConfigValueError, UserError

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_MEMORY_MODES = ("auto", "high", "medium", "low")
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000; '512MiB' -> 536870912."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(text).upper())
    if not match:
        raise ValueError(text)
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def model_weight_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def check_model_dir(path_text: str, source: str) -> Path:
    path = Path(path_text).expanduser()
    if not path.exists():
        raise UserError(f"model.path={path_text!r} (set in {source}) does not exist. "
                        "Point model.path at a local Hugging Face model folder (config.json + *.safetensors).")
    if not (path / "config.json").is_file() and (path / "model_index.json").is_file():
        raise UserError(f"model.path={path_text!r} (set in {source}) is a diffusers pipeline folder "
                        "(model_index.json): use family=diffusion, e.g. recipe=flux_w4a16 or recipe=sd3_w4a16.")
    if not (path / "config.json").is_file():
        raise UserError(f"model.path={path_text!r} (set in {source}) has no config.json: "
                        "it must be a Hugging Face model folder, e.g. one written by save_pretrained().")
    if not model_weight_files(path):
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise UserError(f"model.path={path_text!r} holds PyTorch .bin weights but no *.safetensors: qrunner "
                            "streams safetensors shards. Convert once with "
                            "`AutoModel.from_pretrained(p).save_pretrained(p2, safe_serialization=True)`.")
        raise UserError(f"model.path={path_text!r} (set in {source}) has no *.safetensors weight files.")
    return path


def _check_source(value: str, key: str, where: Callable[[str], str]) -> None:
    if value != "builtin" and not Path(value).expanduser().exists():
        raise UserError(f"{key}={value!r} (set in {where(key)}) does not exist: use 'builtin' or a local "
                        ".txt / .jsonl / .parquet file or a datasets.save_to_disk folder.")


def validate(cfg: DictConfig, provenance: Provenance) -> None:
    """Raise a UserError naming the key, the bad value, the allowed values and where it was set."""
    where = provenance.source_of

    def bad(key: str, allowed: str, hint: str = "") -> ConfigValueError:
        return ConfigValueError(key, OmegaConf.select(cfg, key), allowed, where(key), hint)

    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as err:
        key = getattr(err, "full_key", "") or "?"
        hint = "Pass it on the command line, e.g. model.path=/models/my-model." if key == "model.path" else ""
        raise UserError(f"config error: {key} is required but not set (in {where(key)}). {hint}".strip()) from None

    scheme = cfg.scheme
    if scheme.bits not in SUPPORTED_BITS:
        raise bad("scheme.bits", ", ".join(map(str, SUPPORTED_BITS)))
    if scheme.group_size != -1 and scheme.group_size <= 0:
        raise bad("scheme.group_size", "-1 (one group per output row) or a positive integer (one that does not divide a "
                  "layer's input size leaves a shorter last group)")
    if scheme.data_type != "int":
        raise bad("scheme.data_type", "int")
    if scheme.act_bits != 16:
        raise bad("scheme.act_bits", "16 (weight-only schemes)")

    if scheme.name == "auto":
        _check_auto(cfg, bad)

    if cfg.quant.iters < 0:
        raise bad("quant.iters", "0 (round-to-nearest) or a positive number of tuning iterations")
    for key in ("quant.lr", "quant.minmax_lr"):
        value = OmegaConf.select(cfg, key)
        if value is not None and value <= 0:
            raise bad(key, "a positive number, or null for the default (1/iters)")
    for key in ("quant.batch_size", "quant.grad_accum"):
        if OmegaConf.select(cfg, key) <= 0:
            raise bad(key, "a positive integer")
    if cfg.quant.opt_rtn and cfg.quant.iters > 0:
        raise bad("quant.opt_rtn", "false when quant.iters > 0", "opt_rtn is the iters=0 variant; set quant.iters=0")
    for pattern, override in cfg.quant.layer_overrides.items():
        key = f"quant.layer_overrides.{pattern}"
        try:
            re.compile(pattern)
        except re.error as err:
            raise bad(key, f"a Python regular expression as the key ({err})")
        if override.bits is not None and override.bits not in SUPPORTED_BITS + (16,):
            raise bad(f"{key}.bits", ", ".join(map(str, SUPPORTED_BITS + (16,))) + " (16 = keep in full precision)")
        if override.group_size is not None and override.group_size != -1 and override.group_size <= 0:
            raise bad(f"{key}.group_size", "-1 or a positive integer")
    for i, pattern in enumerate(cfg.quant.ignore_layers):
        try:
            re.compile(pattern)
        except re.error as err:
            raise bad(f"quant.ignore_layers.{i}", f"a Python regular expression ({err})")

    mode = cfg.memory.mode.value if hasattr(cfg.memory.mode, "value") else str(cfg.memory.mode)
    if mode not in SUPPORTED_MEMORY_MODES:
        raise bad("memory.mode", ", ".join(SUPPORTED_MEMORY_MODES))
    if cfg.memory.budget_gb is not None and cfg.memory.budget_gb <= 0:
        raise bad("memory.budget_gb", "a positive number of GB, or null for 80 % of available RAM")

    for key in ("data.nsamples", "data.seqlen", "eval.seqlen", "eval.batch_size"):
        if OmegaConf.select(cfg, key) <= 0:
            raise bad(key, "a positive integer")
    if cfg.eval.nsamples < 0:
        raise bad("eval.nsamples", "0 (all windows) or a positive integer")
    _check_source(cfg.data.source, "data.source", where)
    _check_source(cfg.eval.source, "eval.source", where)
    if cfg.eval.tasks_limit < 0:
        raise bad("eval.tasks_limit", "0 (every example) or a positive integer")
    if cfg.eval.tasks_include and not Path(cfg.eval.tasks_include).expanduser().is_dir():
        raise bad("eval.tasks_include", "a folder of lm-eval task YAML files")
    if cfg.eval.tasks and importlib.util.find_spec("lm_eval") is None:
        raise UserError(f"eval.tasks={list(cfg.eval.tasks)} (set in {where('eval.tasks')}) needs lm-eval-harness, "
                        "which is not installed: pip install 'qrunner[eval]' (or pip install lm-eval), or drop eval.tasks")

    try:
        if parse_size(cfg.export.max_shard_size) <= 0:
            raise ValueError
    except ValueError:
        raise bad("export.max_shard_size", "a size such as 5GB, 500MB or 2GiB") from None

    _check_export_formats(cfg, bad)

    from qrunner.models.registry import family_names

    if cfg.family.name not in family_names():
        raise bad("family.name", ", ".join(family_names()))

    if cfg.family.name == "diffusion":
        _check_diffusion(cfg, bad, where)
    else:
        if cfg.family.loss_streams != "both":
            raise bad("family.loss_streams", "both", "the loss streams are a family=diffusion setting")
        check_model_dir(cfg.model.path, where("model.path"))


def _check_export_formats(cfg: DictConfig, bad: Callable[..., ConfigValueError]) -> None:
    """export.formats: a non-empty list without repeats; one folder (export.output_dir) holds one format; GPTQ v1
    carries symmetric schemes only; a diffusers pipeline goes out in the AutoRound format only."""
    formats = [str(getattr(f, "value", f)) for f in cfg.export.formats]
    if not formats or len(set(formats)) != len(formats):
        raise bad("export.formats", "a list of distinct formats: auto_round, gptq, compressed_tensors, gguf")
    if cfg.export.output_dir and len(formats) > 1:
        raise bad("export.output_dir", "null with several export formats",
                  "each format goes to <run dir>/model-<format> (auto_round: <run dir>/model); set "
                  "export.output_dir only with one format")
    asym = [str(p) for p, o in cfg.quant.layer_overrides.items() if o.sym is False]
    if "gptq" in formats and (not cfg.scheme.sym or asym):
        what = "scheme.sym=false" if not cfg.scheme.sym else f"quant.layer_overrides {asym} with sym: false"
        raise bad("export.formats", "formats that carry asymmetric weights: auto_round, compressed_tensors",
                  f"GPTQ v1 stores zero points minus one and carries symmetric schemes only ({what})")
    if cfg.family.name == "diffusion" and formats != ["auto_round"]:
        raise bad("export.formats", "[auto_round]", "a diffusers pipeline loads the AutoRound format only "
                  "(diffusers has no GPTQ, compressed-tensors or GGUF loader for AutoRound weights)")


def _check_diffusion(cfg: DictConfig, bad: Callable[..., ConfigValueError], where: Callable[[str], str]) -> None:
    """family=diffusion: the pipeline folder and the sampling keys."""
    from qrunner.models.diffusion import read_pipeline_folder
    from qrunner.models.diffusion_adapter import LOSS_STREAMS

    read_pipeline_folder(Path(cfg.model.path).expanduser())
    for key in ("data.num_inference_steps", "data.height", "data.width", "data.max_sequence_length"):
        if OmegaConf.select(cfg, key) <= 0:
            raise bad(key, "a positive integer")
    if cfg.data.guidance_scale is not None and cfg.data.guidance_scale < 0:
        raise bad("data.guidance_scale", "a non-negative number, or null for the pipeline's default")
    if cfg.family.loss_streams not in LOSS_STREAMS:
        raise bad("family.loss_streams", ", ".join(LOSS_STREAMS))
    if cfg.scheme.name == "auto":
        raise bad("scheme", "a fixed scheme (w4a16, w8a16, ...)", "scheme=auto (AutoScheme) is not supported for "
                  "family=diffusion yet; set per-layer schemes with quant.layer_overrides")
    if cfg.data.images:
        raise bad("data.images", "null", "family=diffusion calibrates on prompts (data.source)")


def budgets(auto: Any) -> list[float]:
    """scheme.auto.avg_bits as a list of budgets (one number, or a list)."""
    value = auto.avg_bits
    return [float(v) for v in value] if OmegaConf.is_list(value) or isinstance(value, (list, tuple)) else [float(value)]


def _check_auto(cfg: DictConfig, bad: Callable[..., ConfigValueError]) -> None:
    """scheme=auto: budgets, option names and shared-layer regexes (their range against the model's layers is
    checked once the skeleton is built, by the autoscheme stage's preflight)."""
    from qrunner.quant.scheme import parse_scheme_name

    auto = cfg.scheme.auto
    try:
        values = budgets(auto)
    except (TypeError, ValueError):
        raise bad("scheme.auto.avg_bits", "a number of bits per weight (e.g. 3) or a list of them (e.g. [2.5,3,4])")
    if not values or any(v <= 0 for v in values) or len(set(values)) != len(values):
        raise bad("scheme.auto.avg_bits", "positive, distinct numbers of bits per weight")
    if len(auto.options) < 2 or len(set(auto.options)) != len(auto.options):
        raise bad("scheme.auto.options", "at least two distinct scheme names, e.g. [w2a16g64, w4a16, w8a16]")
    for i, name in enumerate(auto.options):
        try:
            parse_scheme_name(name)
        except ValueError as err:
            raise bad(f"scheme.auto.options.{i}", "w<bits>a16[g<group size>][_asym] with bits in "
                      f"{', '.join(map(str, SUPPORTED_BITS))}, or bf16", str(err)) from None
    for i, pattern in enumerate(auto.shared_layers):
        try:
            re.compile(pattern)
        except re.error as err:
            raise bad(f"scheme.auto.shared_layers.{i}", f"a Python regular expression ({err})")
    for key in ("scheme.auto.nsamples", "scheme.auto.seqlen", "scheme.auto.batch_size"):
        if OmegaConf.select(cfg, key) <= 0:
            raise bad(key, "a positive integer")
    for pattern, override in cfg.quant.layer_overrides.items():
        if override.bits != 16 or override.group_size is not None or override.sym is not None:
            raise bad(f"quant.layer_overrides.{pattern}", "only {bits: 16} with scheme=auto",
                      "AutoScheme chooses every layer's scheme; keep a layer out of it with bits: 16 or "
                      "quant.ignore_layers")


def plain(cfg: DictConfig) -> Dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]
