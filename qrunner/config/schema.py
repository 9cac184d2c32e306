"""Structured-config schema of every qrunner config group.

Hydra merges each group's YAML (and every recipe) into these dataclasses, so an unknown key or a
value of the wrong type fails at composition time. Range and cross-field checks that OmegaConf cannot
express live in `qrunner.config.validate`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from omegaconf import MISSING


class MemoryMode(str, Enum):
    auto = "auto"
    high = "high"
    medium = "medium"
    low = "low"


class Objective(str, Enum):
    quality = "quality"  # the held-out perplexity (a diffusion model's latent MSE)
    quality_and_size = "quality_and_size"  # that and the export's bytes, for a two-objective Optuna study


class OnOom(str, Enum):
    downgrade = "downgrade"
    fail = "fail"


class ShortSamples(str, Enum):
    concat = "concat"
    drop = "drop"


class DataFormat(str, Enum):
    auto = "auto"
    text = "text"
    jsonl = "jsonl"
    parquet = "parquet"
    hf_disk = "hf_disk"


class ExportFormat(str, Enum):
    auto_round = "auto_round"
    gptq = "gptq"
    compressed_tensors = "compressed_tensors"
    gguf = "gguf"


@dataclass
class ModelConfig:
    path: str = MISSING
    trust_remote_code: bool = False
    # dtype the calibration and evaluation forwards run in (the checkpoint's own dtype is kept on export)
    compute_dtype: str = "float32"


@dataclass
class FamilyConfig:
    name: str = "llm"
    # module lists holding the blocks to quantize, e.g. ["model.layers"]; empty = found by the family adapter
    block_names: List[str] = field(default_factory=list)
    # family=diffusion: what the tuning loss compares: "both" streams of a block (text and image tokens), or the
    # "image" stream only (the reference tool's loss: the text-stream layers then get no gradient)
    loss_streams: str = "both"


@dataclass
class AutoSchemeConfig:
    """scheme=auto: one option per layer chosen under an average-bits budget (see the autoscheme stages)."""

    # the budget in average bits per weight of the quantized layers: a number, or a list (one plan and export each)
    avg_bits: Any = 3.0
    # candidate schemes: w<bits>a16 with an optional g<group size> (default 128), e.g. w2a16g64; bf16 = full precision
    options: List[str] = field(default_factory=lambda: ["w2a16g64", "w4a16", "w8a16"])
    # regexes matched against layer names inside a block: the layers one regex matches share one option
    shared_layers: List[str] = field(default_factory=list)
    # count only the weight bits (not the 16-bit scale and the zero point of each group) against the budget
    ignore_scale_zp_bits: bool = False
    # scoring samples, independent of the tuning data (read from data.source like it)
    nsamples: int = 16
    seqlen: int = 256
    # samples per scoring backward: a layer's score sums |dL_b/dŴ ⊙ (W − Ŵ)| over the batches b (auto-round's way);
    # nsamples or more = one gradient of the loss on all samples
    batch_size: int = 8


@dataclass
class SchemeConfig:
    name: str = "w4a16"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    data_type: str = "int"
    act_bits: int = 16
    # read only when name is "auto"
    auto: AutoSchemeConfig = field(default_factory=AutoSchemeConfig)


@dataclass
class LayerOverride:
    bits: Optional[int] = None
    group_size: Optional[int] = None
    sym: Optional[bool] = None


@dataclass
class QuantConfig:
    # AutoRound sign-gradient iterations per block; 0 = round-to-nearest
    iters: int = 200
    # learning rate of the rounding offsets; null = 1/iters. min/max range lr; null = lr
    lr: Optional[float] = None
    minmax_lr: Optional[float] = None
    # samples per tuning step, and steps accumulated per update
    batch_size: int = 8
    grad_accum: int = 1
    # tune the per-group min/max range as well as the rounding
    minmax_tuning: bool = True
    # tune block k on the outputs of the already-quantized blocks 0..k-1 (targets stay the original chain's)
    quantized_inputs: bool = True
    # iters=0 only: importance-weighted range search (per-input-channel mean x^2) instead of plain RTN
    opt_rtn: bool = False
    # run the block forward under bfloat16 autocast while tuning (loss stays fp32)
    amp_bf16: bool = False
    # torch.compile the block forward while tuning
    compile: bool = False
    # also run each block with round-to-nearest weights, for the report's per-block "RTN vs tuned" loss (one more
    # block forward over the calibration samples; off by default, on in the demo recipe)
    rtn_loss: bool = False
    seed: int = 42
    # regexes of layer names (e.g. "mlp.down_proj") left in full precision
    ignore_layers: List[str] = field(default_factory=list)
    # regex of layer names -> bits / group_size / sym differing from the scheme (first match wins)
    layer_overrides: Dict[str, LayerOverride] = field(default_factory=dict)


@dataclass
class MemoryConfig:
    mode: MemoryMode = MemoryMode.auto
    # RAM budget for memory=auto; null = 80 % of the RAM available at start
    budget_gb: Optional[float] = None


@dataclass
class DataConfig:
    # "builtin" (bundled CPython-stdlib text) or a local path: .txt, .jsonl, .parquet or a datasets.save_to_disk folder
    source: str = "builtin"
    format: DataFormat = DataFormat.auto
    text_field: str = "text"
    # between documents (JSONL/parquet/datasets records): the text joined with this string and tokenized once
    # (default: a blank line, the standard perplexity convention), or "eos" for the tokenizer's end-of-text token
    separator: str = "\n\n"
    # split a text file into documents at blank lines (default: a text file is one document, as it is)
    split_paragraphs: bool = False
    nsamples: int = 128
    seqlen: int = 2048
    # what to do with documents shorter than seqlen: concatenate all text, or drop them (count reported)
    short_samples: ShortSamples = ShortSamples.concat
    seed: int = 42
    # image–text calibration (vision-language models): null = text only, or a local folder of images (prompt in
    # a same-named .txt) or a .jsonl of {"image": path, "text": prompt}; image samples come first, text fills
    # each to seqlen and makes up the rest of nsamples
    images: Optional[str] = None
    # prompt of an image that has none
    image_prompt: str = "Describe this image."
    # family=diffusion: data.source is a prompt list ("builtin" = bundled prompts, or a local .txt/.jsonl/.tsv);
    # each of data.nsamples prompts is denoised for num_inference_steps steps at height x width pixels, and every
    # step of every sample is a calibration row
    num_inference_steps: int = 8
    # null = the pipeline's own default (Flux 3.5, SD3 7.0); SD3 above 1 runs the negative prompt too
    guidance_scale: Optional[float] = None
    height: int = 512
    width: int = 512
    negative_prompt: str = ""
    max_sequence_length: int = 256


@dataclass
class EvalConfig:
    enabled: bool = True
    # "builtin" (bundled held-out text) or a local path, read like data.source
    source: str = "builtin"
    format: DataFormat = DataFormat.auto
    text_field: str = "text"
    # as data.separator / data.split_paragraphs
    separator: str = "\n\n"
    split_paragraphs: bool = False
    seqlen: int = 256
    # number of non-overlapping windows evaluated (0 = all)
    nsamples: int = 32
    batch_size: int = 4
    # also measure the unquantized model
    original: bool = True
    # lm-eval-harness tasks run on the original and the quantized model (needs qrunner[eval]); offline: tasks whose
    # data is in the local Hugging Face cache or defined by lm-eval task YAML files under tasks_include
    tasks: List[str] = field(default_factory=list)
    # examples per task (0 = all)
    tasks_limit: int = 0
    tasks_include: Optional[str] = None


@dataclass
class ExportConfig:
    # one export stage per format, all reading the one quantize stage
    formats: List[ExportFormat] = field(default_factory=lambda: [ExportFormat.auto_round])
    # null = <run dir>/model (auto_round), <run dir>/model-<format> (the others); a folder: one format only
    output_dir: Optional[str] = None
    max_shard_size: str = "5GB"


@dataclass
class RunConfig:
    root: str = "outputs"
    # explicit run directory; null = <root>/<recipe>/<hash of the semantic config>
    dir: Optional[str] = None
    fresh: bool = False
    show_progress: bool = True
    # when the run dies of memory (OOM kill, MemoryError): restart it one memory mode lower, or fail
    on_oom: OnOom = OnOom.downgrade
    # what a sweep job returns for a sweeper to minimise (hydra/sweeper=optuna)
    objective: Objective = Objective.quality


@dataclass
class QrunnerConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    family: FamilyConfig = field(default_factory=FamilyConfig)
    scheme: SchemeConfig = field(default_factory=SchemeConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    run: RunConfig = field(default_factory=RunConfig)
    # where the block forwards of quantize run: auto (the first GPU when there is one), cpu, cuda or cuda:N; the
    # rows stay on the host. Not part of any fingerprint (a run started on a GPU resumes on the CPU and the other
    # way round; the two differ by floating-point rounding only); every block records where it ran
    device: str = "auto"
    # a recipe's one-line description, shown in the report
    description: str = ""


# Keys that never change what a run computes: excluded from the run directory's hash and from every
# stage fingerprint, so `memory=low` resumes a run started with `memory=high`.
NON_SEMANTIC_KEYS = ("memory", "run", "description", "device")

# Keys that only select how a result is evaluated or where it is written: part of the fingerprints of
# the stages that read them, but not of the run directory, so changing them reruns just those stages.
RUN_DIR_EXCLUDED_KEYS = NON_SEMANTIC_KEYS + ("eval", "export.formats", "export.output_dir", "export.max_shard_size")


def register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="qrunner_schema", node=QrunnerConfig)


def as_plain(cfg: Any) -> Dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]
