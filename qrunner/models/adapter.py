"""The family adapter interface: everything qrunner needs to know about one kind of architecture."""
from __future__ import annotations

import inspect
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from qrunner.errors import UserError
from qrunner.memory.streaming import module_tensor_names
from qrunner.models.moe import (FUSED_TENSORS, expert_layout, fused_experts_modules, is_fused_experts, refuse,
                               split_fused_tensor, unfuse)


@dataclass(frozen=True)
class LayerPlan:
    """What happens to one linear layer inside a block."""

    name: str  # full module name, e.g. model.layers.0.mlp.down_proj
    in_features: int
    out_features: int
    quantize: bool
    reason: str = ""  # why it is left in full precision
    bits: int = 16
    group_size: int = -1
    sym: bool = True


KERNEL_MULTIPLE = 32  # the loaders' kernels need in/out features divisible by this
NAMES_SHOWN = 5
UNSPLIT_SHARE = 0.05  # fused weights qrunner cannot split, as a share of a block's linear weights, that stop a run
# config attributes some causal LMs multiply their logits by (Cohere, Muse)
LOGIT_FACTORS = ("logit_scale", "output_multiplier")  # layer names a warning spells out before "and N more"


_KERNEL_REASON = "in/out features not divisible by"


def kernel_reason(multiple: int = KERNEL_MULTIPLE) -> str:
    """The reason recorded for a layer kept in full precision because no loader's kernel takes its shape."""
    return f"{_KERNEL_REASON} {multiple} (loader kernels)"


def full_precision_layers(plan: Sequence[LayerPlan]) -> Dict[str, Any]:
    """The block linears left in full precision: their count, their share of the weights of all block linears
    (``in * out`` each), their names and how many for each reason."""
    kept = [p for p in plan if not p.quantize]
    total = sum(p.in_features * p.out_features for p in plan)
    reasons: Dict[str, int] = {}
    for p in kept:
        reasons[p.reason] = reasons.get(p.reason, 0) + 1
    return {"count": len(kept),
            "share_of_weights": sum(p.in_features * p.out_features for p in kept) / total if total else 0.0,
            "names": [p.name for p in kept], "reasons": reasons}


def kernel_warning(plan: Sequence[LayerPlan]) -> Optional[str]:
    """A warning naming the layers no loader's kernel takes (kept in full precision), or None if there are none."""
    kept = [p for p in plan if not p.quantize and p.reason.startswith(_KERNEL_REASON)]
    if not kept:
        return None
    total = sum(p.in_features * p.out_features for p in plan)
    share = sum(p.in_features * p.out_features for p in kept) / total
    names = ", ".join(f"{p.name} [out {p.out_features}, in {p.in_features}]" for p in kept[:NAMES_SHOWN])
    more = f" and {len(kept) - NAMES_SHOWN} more" if len(kept) > NAMES_SHOWN else ""
    return (f"{len(kept)} layer(s) stay in full precision ({100 * share:.2f} % of the block linear weights), "
            f"{kept[0].reason}: {names}{more}")


def config_error(model_dir: Path, trusted: bool, error: Exception) -> str:
    """What to tell the user when transformers cannot read a checkpoint's config.json."""
    import json

    import transformers

    try:
        raw = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raw = {}
    model_type, auto_map = raw.get("model_type"), raw.get("auto_map")
    if auto_map and not trusted:
        return (f"{model_dir}/config.json (model_type={model_type!r}) needs the checkpoint's own Python code "
                f"({', '.join(sorted(auto_map))} in its auto_map), which qrunner runs only when told to: read the "
                "code, then set model.trust_remote_code=true.")
    return (f"transformers {transformers.__version__} cannot read {model_dir}/config.json (model_type="
            f"{model_type!r}): {str(error).strip().splitlines()[0]} This architecture is not supported yet: a newer transformers may know it, "
            "or the checkpoint may ship its own code (auto_map) to run with model.trust_remote_code=true.")


def linear_modules(block: nn.Module) -> List[Tuple[str, nn.Linear]]:
    """The `nn.Linear` modules inside `block`, by name relative to it."""
    return [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)]


def check_no_unsplit_weights(block_name: str, view: nn.Module) -> None:
    """Stop when a block (as seen through its adapter's view) holds weights of 3 or more dimensions that are not
    linears (a fused layout qrunner does not know) and that are a sizeable share of the block: they would silently
    stay in full precision. Small ones (a state-space model's convolution) are left as they are."""
    linear = sum(m.weight.numel() for m in view.modules() if isinstance(m, nn.Linear))
    unsplit = [(n, p) for n, p in view.named_parameters() if p.dim() >= 3]
    if unsplit and sum(p.numel() for _, p in unsplit) >= UNSPLIT_SHARE * max(1, linear):
        shown = ", ".join(f"{block_name}.{n} {list(p.shape)}" for n, p in unsplit[:3])
        raise UserError(f"{block_name} holds {len(unsplit)} weight(s) of 3 or more dimensions that are not linear "
                        f"layers ({shown}): fused in a layout qrunner does not know, they would stay in full "
                        "precision. Describe the layout in qrunner/models/moe.py.")


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the wanted inputs are captured."""


class FamilyAdapter:
    """Subclasses describe a family as data (block lists, model types) plus small hooks."""

    name: ClassVar[str]
    # the pipeline the family runs (stage names; the runner orders them by what each needs)
    stages: ClassVar[Tuple[str, ...]] = ("load", "data", "capture", "autoscheme_scores", "autoscheme", "quantize",
                                         "export", "export_gptq", "export_compressed_tensors", "export_gguf", "evaluate",
                                         "tasks")
    model_types: ClassVar[Tuple[str, ...]]
    # candidate module-list paths holding the decoder blocks, tried in order
    block_list_candidates: ClassVar[Tuple[str, ...]]
    # linears inside a block the family keeps in full precision (name suffixes, e.g. a MoE router)
    kept_linears: ClassVar[Tuple[str, ...]] = ()
    # model.path is a diffusers pipeline folder (model_index.json), not a transformers checkpoint
    pipeline_folder: ClassVar[bool] = False

    # ---- architecture checks -------------------------------------------------------------
    def supports(self, model_type: Optional[str]) -> bool:
        """The family takes checkpoints of this model type (config.json's model_type)."""
        return model_type in self.model_types

    def check_config(self, config: Any, model_path: str) -> None:
        model_type = getattr(config, "model_type", None)
        if not self.supports(model_type):
            from qrunner.models.registry import family_for_model_type

            other = family_for_model_type(model_type)
            hint = (f" It looks like a '{other}' model: use family={other}." if other
                    else " This architecture is not supported yet.")
            raise UserError(f"family={self.name} does not support model_type={model_type!r} "
                            f"(from {model_path}/config.json); supported: {', '.join(self.model_types)}.{hint}")

    def build_skeleton(self, config: Any, trust_remote_code: bool, dtype: Optional[torch.dtype] = None) -> nn.Module:
        """The model with every parameter on the meta device (no memory for weights). Buffers the model builds
        itself (rotary tables, embedding scales) are made in `dtype`, as `from_pretrained(dtype=...)` makes them."""
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            return self.model_class(config).from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)

    def model_class(self, config: Any) -> Any:
        raise NotImplementedError(f"family {self.name} does not define model_class()")

    # ---- blocks ----------------------------------------------------------------------------
    def block_lists(self, model: nn.Module, requested: Sequence[str]) -> List[str]:
        names = list(requested) or [n for n in self.block_list_candidates if _get(model, n) is not None][:1]
        if not names:
            raise UserError(f"could not find the decoder blocks of {type(model).__name__}; tried "
                            f"{', '.join(self.block_list_candidates)}. Set family.block_names=[path.to.layers].")
        for name in names:
            tower = next((u for u in self.unused_modules if name == u or name.startswith(u + ".")), None)
            if tower is not None:
                found = [n for n in self.block_list_candidates if _get(model, n) is not None]
                raise UserError(f"family.block_names: {name!r} lies in {tower}, which text calibration never runs: "
                                f"it is not a decoder block list. Use {', '.join(found) or 'the decoder layers'}.")
            if not isinstance(_get(model, name), nn.ModuleList):
                available = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
                raise UserError(f"family.block_names: {name!r} is not a module list in {type(model).__name__}; "
                                f"module lists in this model: {', '.join(available) or 'none'}.")
        return names

    def blocks(self, model: nn.Module, block_lists: Sequence[str]) -> List[Tuple[str, nn.Module]]:
        out = []
        for list_name in block_lists:
            for i, block in enumerate(_get(model, list_name)):
                out.append((f"{list_name}.{i}", block))
        return out

    def linears(self, block: nn.Module) -> List[Tuple[str, nn.Linear]]:
        """The block's linears as qrunner quantizes them (fused MoE experts one linear per expert)."""
        with self.block_view(block) as view:
            return linear_modules(view)

    @contextmanager
    def block_view(self, block: nn.Module) -> Iterator[nn.Module]:
        """The block as qrunner tunes, quantizes and fake-quantizes it: every quantizable weight an `nn.Linear`
        (fused MoE experts seen as one linear per expert, models/moe.py). Undone on exit."""
        swapped = unfuse(block)
        try:
            yield block
        finally:
            refuse(swapped)

    def fused_experts(self, model: nn.Module, block_lists: Sequence[str]) -> List[str]:
        """The fused MoE experts modules inside the blocks (full names)."""
        return [f"{name}.{rel}" for name, block in self.blocks(model, block_lists)
                for rel, _ in fused_experts_modules(block)]

    def split_source_tensor(self, key: str, read: Callable[[str], torch.Tensor], quantized: Any, model: nn.Module
                            ) -> Optional[Dict[str, torch.Tensor]]:
        """A checkpoint tensor (`key`: its name in `model`; `read(name)` reads any model tensor) the export writes
        under other names: a fused experts weight as per-expert weights (with their biases) when `quantized`
        holds those experts, their fused bias then as nothing (written with the weights); None to copy it as
        stored."""
        module, _, leaf = key.rpartition(".")
        if not key.endswith(FUSED_TENSORS) or not any(n.startswith(module + ".") for n in quantized):
            return None
        experts = _get(model, module)
        if experts is None or not is_fused_experts(experts):
            return None
        if leaf.endswith("_bias"):
            return {}
        layout = expert_layout(experts)
        parts = split_fused_tensor(key, read(key), layout)
        if layout.bias:
            parts.update(split_fused_tensor(f"{key}_bias", read(f"{key}_bias"), layout))
        return parts

    def option_group(self, rel: str) -> str:
        """The name the layers that must share one quantization option have in common (scheme=auto): all experts
        of a mixture-of-experts block share one (``mlp.experts.*``, as engines run an expert set as one kernel);
        any other layer is its own."""
        return re.sub(r"(^|\.)experts\.\d+\..*$", r"\1experts.*", rel)

    def plan_layers(self, model: nn.Module, block_lists: Sequence[str], bits: int, group_size: int, sym: bool,
                    ignore: Sequence[str], overrides: Sequence[Tuple[str, Dict[str, Any]]] = (),
                    kernel_multiple: int = KERNEL_MULTIPLE) -> List[LayerPlan]:
        """Decide, for every linear layer inside the blocks, whether and how it is quantized.

        `overrides` are (regex, {bits/group_size/sym}) pairs; the first whose regex matches a layer's
        full name sets what differs from the scheme. bits=16 keeps a layer in full precision. A group size
        that does not divide a layer's input size leaves a shorter last group; layers whose input or output
        size is not a multiple of `kernel_multiple` (the loaders' kernels) stay in full precision.
        """
        patterns = [re.compile(p) for p in ignore]
        compiled = [(re.compile(rx), {k: v for k, v in o.items() if v is not None}) for rx, o in overrides]
        plans: List[LayerPlan] = []
        for block_name, block in self.blocks(model, block_lists):
            with self.block_view(block) as view:  # once a block: unfusing many experts is not free
                linears = linear_modules(view)
                check_no_unsplit_weights(block_name, view)
            for rel, layer in linears:
                full = f"{block_name}.{rel}"
                fin, fout = layer.in_features, layer.out_features
                spec = {"bits": bits, "group_size": group_size, "sym": sym}
                for rx, override in compiled:
                    if rx.search(full):
                        spec.update(override)
                        break
                if rel.endswith(self.kept_linears):
                    plans.append(LayerPlan(full, fin, fout, False, f"{self.name} keeps it in full precision"))
                elif any(p.search(full) for p in patterns):
                    plans.append(LayerPlan(full, fin, fout, False, "matches quant.ignore_layers"))
                elif spec["bits"] >= 16:
                    plans.append(LayerPlan(full, fin, fout, False, "bits=16 in quant.layer_overrides"))
                elif fin % kernel_multiple or fout % kernel_multiple:
                    plans.append(LayerPlan(full, fin, fout, False, kernel_reason(kernel_multiple)))
                else:
                    plans.append(LayerPlan(full, fin, fout, True, "", int(spec["bits"]), int(spec["group_size"]),
                                           bool(spec["sym"])))
            for rel, router in self.weight_modules_kept(block):
                out_features, in_features = router.weight.shape
                plans.append(LayerPlan(f"{block_name}.{rel}", in_features, out_features, False,
                                       f"{self.name} keeps it in full precision"))
        return plans

    def weight_modules_kept(self, block: nn.Module) -> List[Tuple[str, nn.Module]]:
        """Modules of `kept_linears` that hold a 2-D weight without being an `nn.Linear` (transformers 5's MoE
        routers): never quantized, but listed in the plan, so that the export's config names them as full
        precision for loaders that rebuild them as linears (AutoRound's does for Qwen3-MoE and DeepSeek-V3)."""
        return [(n, m) for n, m in block.named_modules() if n.endswith(self.kept_linears) and not isinstance(m, nn.Linear)
                and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2]

    # ---- what streaming modes read besides the blocks --------------------------------------
    # modules after the blocks that turn the last block's output into logits, applied in this order (those the
    # model has: candidates for several model classes may be listed)
    head_modules: ClassVar[Tuple[str, ...]] = ()
    # modules a text-only forward never calls (vision and audio towers): never read from the shards
    unused_modules: ClassVar[Tuple[str, ...]] = ()

    def heads(self, model: nn.Module) -> List[str]:
        return [p for p in self.head_modules if _get(model, p) is not None]

    def input_tensor_names(self, model: nn.Module, block_lists: Sequence[str], towers: bool = False) -> List[str]:
        """Tensors the forward pass needs up to the first block: everything but the blocks, the head and, unless
        `towers` (image–text calibration), the modules a text-only forward does not use."""
        skip = tuple(f"{p}." for p in (*block_lists, *self.heads(model), *(() if towers else self.unused_modules)))
        return [n for n in module_tensor_names(model) if not n.startswith(skip)]

    def head_tensor_names(self, model: nn.Module) -> List[str]:
        return [f"{p}.{n}" for p in self.heads(model) for n in module_tensor_names(model.get_submodule(p))]

    def logit_scale(self, config: Any) -> float:
        """The factor the model's forward multiplies its logits by (before any soft cap): Granite divides them by
        `logits_scaling`, Cohere multiplies them by `logit_scale`; 1 for most models."""
        text = self.text_config(config)
        if getattr(text, "logits_scaling", None):
            return 1.0 / float(text.logits_scaling)
        for name in LOGIT_FACTORS:
            if getattr(text, name, None):
                return float(getattr(text, name))
        return 1.0

    def logit_softcap(self, config: Any) -> Optional[float]:
        """The final logit soft cap (`cap * tanh(logits / cap)`, Gemma-style) the model's forward applies, if any."""
        cap = getattr(self.text_config(config), "final_logit_softcapping", None)
        return float(cap) if cap else None

    # ---- block inputs ----------------------------------------------------------------------
    # block inputs that differ per sample besides hidden_states (stored as row files, one per block and name)
    per_sample_inputs: ClassVar[Tuple[str, ...]] = ()
    # block kwargs that are per-call state rather than inputs (caches); never stored
    dropped_block_kwargs: ClassVar[Tuple[str, ...]] = ("past_key_values", "past_key_value", "use_cache", "cache",
                                                       "output_attentions", "output_router_logits")
    # what a block returns: the hidden states alone, or a tuple starting with them (the recorder mimics it)
    block_returns_tuple: ClassVar[bool] = False

    def text_config(self, config: Any) -> Any:
        """The config of the decoder stack (the text config of a multimodal model)."""
        return getattr(config, "text_config", None) or config

    def capture_block_inputs(self, model: nn.Module, blocks: Sequence[nn.Module], input_ids: torch.Tensor,
                             extra: Optional[Dict[str, torch.Tensor]] = None
                             ) -> Tuple[torch.Tensor, List[Dict[str, Any]], List[Optional[torch.Tensor]]]:
        """Run the model on one sample with every block replaced by a recorder that hands its hidden states on
        unchanged. Returns block 0's hidden states and, for every block, the other inputs the model gives it, by
        parameter name (positional arguments included), and what the model adds to the hidden states between
        blocks (None for most blocks; Qwen3-VL's deepstack adds visual features after its first layers): block
        b's input is block b-1's output plus that. No block weight is touched, so the blocks may be on the meta
        device; the forward stops after the last block. `extra` holds further model inputs (pixel values)."""
        records: List[Dict[str, Any]] = []
        hiddens: List[torch.Tensor] = []

        def recorder(index: int, block: nn.Module):
            signature = inspect.signature(type(block).forward)

            def forward(*args: Any, **kwargs: Any) -> Any:
                bound = signature.bind(block, *args, **kwargs)
                values = dict(bound.arguments)
                values.pop(next(iter(signature.parameters)))  # self
                for name, param in signature.parameters.items():
                    if param.kind is inspect.Parameter.VAR_KEYWORD:
                        values.update(values.pop(name, {}) or {})
                    elif param.kind is inspect.Parameter.VAR_POSITIONAL and values.get(name):
                        raise UserError(f"{type(model).__name__}'s forward gives its blocks "
                                        f"({type(block).__name__}) {len(values[name])} unnamed positional input(s) "
                                        "that qrunner cannot record by name; family=" + self.name + " cannot run "
                                        "these blocks in isolation (their adapter in qrunner/models/ must name them)")
                    elif param.kind is inspect.Parameter.VAR_POSITIONAL:
                        values.pop(name, None)
                hidden_name = list(signature.parameters)[1]
                hidden = values.pop(hidden_name)
                hiddens.append(hidden.detach())
                records.append({k: v for k, v in values.items() if k not in self.dropped_block_kwargs})
                if index == len(blocks) - 1:
                    raise StopForward
                return (hidden,) if self.block_returns_tuple else hidden

            return forward

        for i, block in enumerate(blocks):
            block.forward = recorder(i, block)
        try:
            with torch.no_grad():
                model(input_ids=input_ids, use_cache=False, **(extra or {}))
        except StopForward:
            pass
        finally:
            for block in blocks:
                del block.forward
        if len(records) != len(blocks):
            raise UserError(f"the forward pass of {type(model).__name__} reached {len(records)} of the "
                            f"{len(blocks)} blocks in the block list: it does not run them one after the other, so "
                            "their inputs cannot be recorded (set family.block_names to the list it does run)")
        added: List[Optional[torch.Tensor]] = [None]
        for before, after in zip(hiddens, hiddens[1:]):
            added.append(None if after is before or torch.equal(after, before) else after - before)
        return hiddens[0], records, added

    # ---- image–text calibration -------------------------------------------------------------
    def image_text_encoder(self, model_dir: Path, tokenizer: Any, config: Any, trust_remote_code: bool
                           ) -> Callable[[Any, str], Dict[str, torch.Tensor]]:
        """A function turning (PIL image, prompt) into the model's inputs for one sample (`input_ids`,
        `pixel_values`, ...), through the model's own processor and chat template."""
        from transformers import AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        except Exception as e:  # noqa: BLE001 - any failure is reported with the model path and the reason
            raise UserError(f"data.images needs the model's processor, which did not load from {model_dir}: "
                            f"{type(e).__name__}: {e}") from None
        if getattr(processor, "image_processor", None) is None:
            raise UserError(f"data.images: {model_dir} has no image processor (preprocessor_config.json); it is not "
                            "a vision-language checkpoint. Calibrate on text only (unset data.images).")
        return lambda image, prompt: encode_with_processor(processor, image, prompt)

    def side_io(self, config: Any, index: int) -> Tuple[Dict[str, str], Dict[str, str]]:
        """Per-sample values a block hands to later blocks other than its output (e.g. shared keys/values):
        ``(reads, writes)``, each mapping the adapter's local name to the name of the rows that carry it."""
        return {}, {}

    def run_block(self, block: nn.Module, inputs: Dict[str, torch.Tensor], shared: Dict[str, Any],
                  writes: Sequence[str] = ()) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Run `block` on a mini-batch: `inputs` holds ``hidden_states`` plus the per-sample inputs by name,
        `shared` the inputs every sample shares. Returns the output hidden states and the side values named
        in `writes`."""
        kwargs = {**shared, **{k: v for k, v in inputs.items() if k != HIDDEN}}
        out = block(inputs[HIDDEN], **kwargs)
        return (out[0] if isinstance(out, (tuple, list)) else out), {}

    def tuning_forward(self, shared: Dict[str, Any], cfg: Any
                       ) -> Callable[[nn.Module, Dict[str, torch.Tensor]], torch.Tensor]:
        """The block forward the tuner compares with the block's target (its original output)."""
        return lambda block, x: self.run_block(block, x, shared)[0]

    def tuning_compared(self, block: nn.Module, shared: Dict[str, Any], cfg: Any) -> Optional[slice]:
        """The part of the block's output (a slice of its token axis) the tuning loss compares; None: all of it."""
        return None

    def output_parts(self, block: nn.Module, shared: Dict[str, Any]) -> Dict[str, slice]:
        """Named slices of the output's token axis whose errors the quantize stage reports on their own (the
        streams of a diffusion block); none for a decoder."""
        return {}


HIDDEN = "hidden_states"


def image_prompt_messages(prompt: str) -> List[Dict[str, Any]]:
    """One user turn holding an image and the prompt, as chat templates of vision-language models take it."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]


def encode_with_processor(processor: Any, image: Any, prompt: str) -> Dict[str, torch.Tensor]:
    """The processor's inputs for one image and prompt (chat template applied when the processor has one)."""
    if getattr(processor, "chat_template", None):
        text = processor.apply_chat_template(image_prompt_messages(prompt), tokenize=False)
    elif getattr(processor, "image_token", None):
        text = f"{processor.image_token}{prompt}"
    else:
        raise UserError(f"data.images: {type(processor).__name__} has neither a chat template nor an image token "
                        "to place the image in the prompt.")
    out = processor(images=[image], text=[text], return_tensors="pt")
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor) and k != "attention_mask"}


def _get(root: nn.Module, dotted: str) -> Optional[nn.Module]:
    node: Any = root
    for part in dotted.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node


def get_module(root: nn.Module, dotted: str) -> nn.Module:
    module = _get(root, dotted)
    if module is None:
        raise KeyError(dotted)
    return module
