"""AutoRound (SignRound) tuning of ONE block: pure tensors and modules, no files, no config system.

``tune_block`` mirrors ``SignRoundQuantizer.quantize_block`` of auto-round 0.16
(``auto_round/algorithms/quantization/sign_round/quantizer.py``, ``wrapper.py``,
``sign_sgd.py``, ``compressors/utils.py``):

* Per listed linear: fp32 tensors ``v`` (zeros, ``[out, in]``), ``min_scale`` and ``max_scale``
  (ones, ``[out, n_groups]``), used through ``quant_dequant``'s arithmetic in the forward pass
  (straight-through rounding; :func:`qrunner.quant.fake_quant.fake_quant_linear` fuses it with the
  layer's matmul and gives autograd's gradients). Every other block parameter is frozen.
* ``min_scale`` / ``max_scale`` are clamped *in place* to [0, 1] before every forward
  (``WrapperLinear._qdq_weight``: ``min_scale.data.clamp_(0, 1)``). ``v`` is **not** clamped:
  with the default lr ``1/iters`` and the linear decay, ``|v| <= sum(lr_i) ~= 0.5``.
* Loss: MSE in fp32 between the block output on a mini-batch and the original chain's
  outputs, normalised by the number of elements of the whole accumulated batch; the
  backward runs on ``1000 * loss`` (AutoRound's ``_scale_loss_and_backward``; sign-SGD
  is scale-invariant, the factor only keeps tiny gradients away from underflow).
* Optimizer: sign-SGD (``p -= lr * sign(grad)``), one step per iteration after
  ``grad_accum`` mini-batches (with a single micro-batch per iteration each parameter steps inside
  the backward pass as soon as its gradient is complete, so no block-sized gradient is held), lr decayed by ``torch.optim.lr_scheduler.LinearLR``
  (start 1.0, end 0.0, ``total_iters=iters``). Separate lr for min/max scales.
  Default lr: ``1/iters`` (AutoRound: ``2/iters`` for layers with ``bits <= 3`` when
  ``iters >= 1000``; mirrored per layer); ``minmax_lr`` defaults to the layer's lr.
* Sampling: AutoRound's ``IndexSampler``: a shuffled permutation of the ``n`` samples is
  consumed in consecutive chunks of ``min(n, batch_size * grad_accum)`` indices; when
  fewer than a chunk remain, it reshuffles and starts over (the remainder is dropped).
  The permutations come from ``torch.randperm(n, generator=generator)``.
* Best selection: the loss of iteration ``i`` is computed (and the parameters snapshotted
  if it is strictly lower than the best so far) *before* the optimizer step of iteration
  ``i``, so the loss belongs to exactly the parameters saved; iteration 0 (v = 0,
  scales = 1, i.e. plain RTN) takes part. The snapshot is the layer quantized with those
  parameters (1 byte a weight), not a copy of ``v``: the codes the iteration's forward pass wrote.

Memory: besides the block's weights, tuning holds ``v`` (4 bytes a weight), the codes of the current
and of the best iteration (1 byte a weight each) and one layer's recomputed fake-quantization at a time
(the fused layer's backward pass), plus the block's activations for one micro-batch. No early stop
(``dynamic_max_gap = -1``).

Determinism: mini-batches are drawn only from ``generator``; nothing global is seeded or
changed. Blocks with randomness of their own (dropout in train mode) use torch's global
RNG, so the caller seeds torch globally per block as well (the quantize stage derives
seeds from ``(seed, block index)``).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from qrunner.phases import PhaseTimes
from qrunner.quant.fake_quant import TunedLinear
from qrunner.quant.rtn import QuantizedWeight, quantize
from qrunner.quant.scheme import QuantScheme

__all__ = ["TuneResult", "TuneSettings", "tune_block", "default_lr"]

_LOSS_SCALE = 1000.0  # AutoRound scales the loss before backward


@dataclass(frozen=True)
class TuneSettings:
    """How :func:`tune_block` tunes.

    ``lr=None`` means ``1/iters`` (``2/iters`` for layers of at most 3 bits when
    ``iters >= 1000``, as AutoRound); ``minmax_lr=None`` means the layer's lr.
    ``amp_bf16`` runs the block forward under ``torch.autocast`` (bfloat16) on the
    inputs' device; the loss stays fp32. ``compile`` wraps ``forward`` with
    ``torch.compile``, falling back to eager with a warning if compiling fails.
    ``keep_params`` also returns the best iteration's ``v`` / ``min_scale`` / ``max_scale``
    (4 more bytes a weight while tuning); by default only the quantized weights are kept.
    """

    iters: int = 200
    lr: float | None = None
    minmax_lr: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    minmax_tuning: bool = True
    amp_bf16: bool = False
    compile: bool = False
    keep_params: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 0:
            raise ValueError(f"iters must be an int >= 0, got {self.iters!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        if isinstance(self.grad_accum, bool) or not isinstance(self.grad_accum, int) or self.grad_accum < 1:
            raise ValueError(f"grad_accum must be an int >= 1, got {self.grad_accum!r}")
        for name in ("lr", "minmax_lr"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0 or None, got {value!r}")

    def layer_lr(self, bits: int) -> float:
        """Rounding lr for a layer of ``bits`` bits."""
        return float(self.lr) if self.lr is not None else default_lr(self.iters, bits)

    def layer_minmax_lr(self, bits: int) -> float:
        """min/max-scale lr for a layer of ``bits`` bits."""
        return float(self.minmax_lr) if self.minmax_lr is not None else self.layer_lr(bits)


def default_lr(iters: int, bits: int) -> float:
    """AutoRound's automatic lr: ``1/iters``, or ``2/iters`` for ``bits <= 3`` when ``iters >= 1000``."""
    if iters <= 0:
        return 0.0
    if iters >= 1000 and bits <= 3:
        return 2.0 / iters
    return 1.0 / iters


@dataclass
class TuneResult:
    """Outcome of :func:`tune_block`.

    ``weights[name]`` is ``quantize(weight, scheme, v, min_scale, max_scale)`` with the best
    iteration's parameters. With ``settings.keep_params``, ``params[name]`` holds those parameters
    (``min_scale``/``max_scale`` are ``None`` without min/max tuning); otherwise it is empty. With ``iters=0`` the weights are plain
    RTN, ``losses`` is empty and ``best_loss``/``first_loss`` are NaN (nothing was run).
    ``phases``: seconds by phase of the iterations (``read_rows``, ``forward`` with the loss, ``backward``,
    ``sign_step``, ``snapshot``, ``clamp``) and ``setup`` (wrapping the layers, the sampler, unwrapping).
    """

    weights: dict[str, QuantizedWeight]
    best_iter: int
    best_loss: float
    first_loss: float
    losses: list[float]
    seconds: float
    params: dict[str, dict[str, torch.Tensor | None]] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)


class _SignSGD(torch.optim.Optimizer):
    """``p -= lr * sign(grad)`` (AutoRound's SignSGD with momentum 0 and no weight decay)."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D401 - torch API
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(torch.sign(p.grad), alpha=-group["lr"])
        return None


class _IndexSampler:
    """AutoRound's cyclic shuffled sampler, drawing its permutations from ``generator``."""

    def __init__(self, n: int, batch: int, generator: torch.Generator) -> None:
        if not 0 < batch <= n:
            raise ValueError(f"batch must be in (0, {n}], got {batch}")
        self.n, self.batch, self.generator = n, batch, generator
        self.perm = torch.randperm(n, generator=generator)
        self.pos = 0

    def next_batch(self) -> torch.Tensor:
        if self.pos + self.batch > self.n:
            self.perm = torch.randperm(self.n, generator=self.generator)
            self.pos = 0
        out = self.perm[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return out


def _swap_in(block: nn.Module, layers: dict[str, QuantScheme], minmax_tuning: bool
             ) -> dict[str, tuple[nn.Module, str, nn.Linear, TunedLinear]]:
    """Build wrappers for every listed linear (validating all first), then swap them in."""
    plan = {}
    for name, scheme in layers.items():
        try:
            module = block.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"layer {name!r} not found in block {type(block).__name__}") from exc
        if not isinstance(module, nn.Linear):
            raise ValueError(f"layer {name!r} is a {type(module).__name__}, expected nn.Linear")
        if not isinstance(scheme, QuantScheme):
            raise TypeError(f"layers[{name!r}] must be a QuantScheme, got {type(scheme).__name__}")
        parent_name, _, child = name.rpartition(".")
        parent = block.get_submodule(parent_name) if parent_name else block
        plan[name] = (parent, child, module, TunedLinear(module, scheme, minmax_tuning))
    for parent, child, _, wrapper in plan.values():
        setattr(parent, child, wrapper)
    return plan


def _swap_out(plan: dict[str, tuple[nn.Module, str, nn.Linear, TunedLinear]]) -> None:
    for parent, child, linear, _ in plan.values():
        setattr(parent, child, linear)


def tune_block(
    block: nn.Module,
    layers: dict[str, QuantScheme],
    inputs: torch.Tensor | RowSource,
    targets: torch.Tensor | RowSource,
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    settings: TuneSettings,
    generator: torch.Generator,
    progress: Callable[[int, float], None] | None = None,
) -> TuneResult:
    """Tune the rounding (``v``) and range (``min_scale``/``max_scale``) of ``layers`` in ``block``.

    Args:
        block: the block; left exactly as it came in (same modules, weights, requires_grad).
        layers: linear name relative to ``block`` (e.g. ``"mlp.down_proj"``) -> its scheme.
        inputs: ``[n, ...]`` block inputs, one row per calibration sample: a tensor, or any object with
            ``len()`` and ``read(indices)`` (rows kept on disk and read per mini-batch) returning what
            ``forward`` takes: a tensor, or a dict of tensors (hidden states plus other per-sample inputs).
        targets: ``[n, ...]`` the original (unquantized) chain's block outputs for those samples (same kinds).
        forward: ``forward(block, x_batch) -> output`` on a mini-batch (shared kwargs such as
            rotary embeddings are closed over by the caller).
        settings: see :class:`TuneSettings`.
        generator: the only source of randomness (mini-batch sampling).
        progress: called as ``progress(iteration, loss)`` after every iteration.
    """
    start = time.perf_counter()
    inputs, targets = _as_rows(inputs), _as_rows(targets)
    if len(inputs) != len(targets):
        raise ValueError(f"inputs and targets differ in samples: {len(inputs)} vs {len(targets)}")
    n = len(inputs)
    if settings.iters > 0 and n == 0:
        raise ValueError("no calibration samples")
    if not layers:
        return TuneResult({}, 0, float("nan"), float("nan"), [], time.perf_counter() - start, {})

    plan = _swap_in(block, layers, settings.minmax_tuning)
    wrappers = {name: entry[3] for name, entry in plan.items()}
    grad_flags = [(p, p.requires_grad) for p in _unique_params(block, wrappers)]
    losses: list[float] = []
    times = PhaseTimes()
    best_iter, best_loss, best = 0, float("nan"), None
    try:
        for p, _ in grad_flags:
            p.requires_grad_(False)
        if settings.iters > 0:
            best_iter, best_loss, best = _optimize(
                wrappers, block, inputs, targets, forward, settings, generator, progress, losses, times
            )
    finally:
        for w in wrappers.values():
            for p in (w.v, w.min_scale, w.max_scale):
                if p is not None:
                    p.grad = None
        _swap_out(plan)
        for p, flag in grad_flags:
            p.requires_grad_(flag)

    if best is None:  # iters=0: plain RTN
        best = {name: _Snapshot(quantize(w.linear.weight, w.scheme),
                                _initial_params(w) if settings.keep_params else None)
                for name, w in wrappers.items()}
    weights = {name: snap.weight for name, snap in best.items()}
    params = {name: snap.params for name, snap in best.items() if snap.params is not None}
    first_loss = losses[0] if losses else float("nan")
    seconds = time.perf_counter() - start
    times.add("setup", seconds - sum(times.seconds.values()))
    return TuneResult(weights, best_iter, best_loss, first_loss, losses, seconds, params, times.as_dict())


@dataclass
class _Snapshot:
    """The best iteration so far: the layer quantized with its parameters (and, on request, the parameters)."""

    weight: QuantizedWeight
    params: dict[str, torch.Tensor | None] | None


def _snapshot(wrappers: dict[str, TunedLinear], keep_params: bool) -> dict[str, _Snapshot]:
    return {name: _Snapshot(w.quantized_from_codes(), w.params() if keep_params else None)
            for name, w in wrappers.items()}


class RowSource(Protocol):
    """Rows of block inputs or targets that are read per mini-batch (e.g. from disk)."""

    def __len__(self) -> int: ...

    def read(self, indices: torch.Tensor) -> torch.Tensor: ...


class _TensorSource:
    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def __len__(self) -> int:
        return int(self.tensor.shape[0])

    def read(self, indices: torch.Tensor) -> torch.Tensor:
        return self.tensor.index_select(0, torch.as_tensor(indices, dtype=torch.long, device=self.tensor.device))


def _as_rows(rows: torch.Tensor | RowSource) -> RowSource:
    return _TensorSource(rows) if isinstance(rows, torch.Tensor) else rows


def _unique_params(block: nn.Module, wrappers: dict[str, TunedLinear]) -> list[nn.Parameter]:
    """The block's own parameters (the tuning parameters of the wrappers excluded)."""
    own = {id(p) for w in wrappers.values() for p in (w.v, w.min_scale, w.max_scale) if p is not None}
    seen, out = set(), []
    for p in block.parameters():
        if id(p) not in own and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _optimize(wrappers, block, inputs, targets, forward, settings, generator, progress, losses, times):
    groups = []
    for w in wrappers.values():
        groups.append({"params": [w.v], "lr": settings.layer_lr(w.scheme.bits)})
    if settings.minmax_tuning:
        for w in wrappers.values():
            groups.append({"params": [w.min_scale, w.max_scale], "lr": settings.layer_minmax_lr(w.scheme.bits)})
    optimizer = _SignSGD(groups, lr=groups[0]["lr"])
    schedule = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.0,
                                                 total_iters=settings.iters)
    tuned = [p for g in groups for p in g["params"]]

    n = len(inputs)
    batch_size = settings.batch_size
    global_batch = min(n, batch_size * settings.grad_accum)
    micro_batches = -(-global_batch // batch_size)
    sampler = _IndexSampler(n, global_batch, generator)
    per_sample = int(targets.read([0]).numel())
    numel_global = float(global_batch * per_sample)
    if settings.amp_bf16:
        device = _device_of(inputs.read([0]))
        amp = lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)  # noqa: E731
    else:
        amp = contextlib.nullcontext

    fwd = forward
    compile_pending = False
    if settings.compile:
        try:
            fwd = torch.compile(forward)
            compile_pending = True
        except Exception as exc:  # pragma: no cover - depends on the torch build
            warnings.warn(f"torch.compile failed ({type(exc).__name__}: {exc}); tuning in eager mode",
                          RuntimeWarning, stacklevel=3)
            fwd = forward

    best_iter, best_loss = 0, math.inf
    best = None

    def consider(i: int, total: float) -> None:
        """Snapshot the parameters of iteration `i` (still unstepped) if its loss is the best so far."""
        nonlocal best_iter, best_loss, best
        if total < best_loss:  # strict, as AutoRound: ties keep the earlier iteration
            best_loss, best_iter = total, i
            best = None  # the old snapshot goes before the new one is made
            with times.phase("snapshot"):
                best = _snapshot(wrappers, settings.keep_params)

    def micro_batch_loss(fn, mb: torch.Tensor) -> tuple[torch.Tensor, float]:
        with times.phase("read_rows"):
            x = inputs.read(mb)
            y = targets.read(mb)
        with times.phase("forward"):
            with amp():
                out = fn(block, x)
            y = y.to(out.device)
            if out.shape != y.shape:
                raise ValueError(f"forward returned shape {tuple(out.shape)}, targets have {tuple(y.shape)}")
            loss = F.mse_loss(out.to(torch.float32), y.to(torch.float32), reduction="sum") / numel_global
            return loss, float(loss.item())

    def backward(loss: torch.Tensor) -> None:
        """The backward pass; the sign steps the hooks take inside it are counted as "sign_step"."""
        steps_before = times.seconds["sign_step"]
        started = time.perf_counter()
        (loss * _LOSS_SCALE).backward()
        times.add("backward", time.perf_counter() - started - (times.seconds["sign_step"] - steps_before))

    def run_iteration(fn, i: int, indices: torch.Tensor) -> float:
        with times.phase("clamp"):
            for w in wrappers.values():
                w.clamp_scales_()
                w.codes_valid = False  # a layer this iteration's forward does not reach quantizes afresh
        if micro_batches == 1:
            # one micro-batch: the loss is known before the backward pass, so the snapshot is taken first and
            # each parameter takes its sign step as soon as its gradient is complete (hooks below): no
            # gradient of the whole block is ever held
            loss, total = micro_batch_loss(fn, indices)
            consider(i, total)
            backward(loss)
            optimizer.step()  # a no-op (every gradient is already consumed); keeps the lr schedule's bookkeeping
            return total
        total = 0.0
        for b in range(0, global_batch, batch_size):
            loss, value = micro_batch_loss(fn, indices[b : b + batch_size])
            total += value
            backward(loss)
        consider(i, total)
        with times.phase("sign_step"):
            optimizer.step()
            for p in tuned:
                p.grad = None
        return total

    hooks = []
    if micro_batches == 1:
        for group in optimizer.param_groups:
            for p in group["params"]:
                hooks.append(p.register_post_accumulate_grad_hook(_sign_step_hook(group, times)))
    try:
        with torch.enable_grad():
            for i in range(settings.iters):
                indices = sampler.next_batch()
                if compile_pending:
                    try:
                        total = run_iteration(fwd, i, indices)
                    except Exception as exc:
                        warnings.warn(f"torch.compile'd forward failed ({type(exc).__name__}: {exc}); "
                                      "tuning in eager mode", RuntimeWarning, stacklevel=3)
                        for p in tuned:
                            p.grad = None
                        fwd = forward
                        total = run_iteration(fwd, i, indices)
                    compile_pending = False
                else:
                    total = run_iteration(fwd, i, indices)
                losses.append(total)
                if progress is not None:
                    progress(i, total)
                schedule.step()
    finally:
        for h in hooks:
            h.remove()
    if best is None:  # every loss was NaN/inf: keep RTN (iteration 0's parameters are v=0, scales=1)
        best_iter, best_loss = 0, losses[0]
        best = {name: _Snapshot(quantize(w.linear.weight, w.scheme),
                                _initial_params(w) if settings.keep_params else None)
                for name, w in wrappers.items()}
    return best_iter, best_loss, best


def _device_of(batch: torch.Tensor | dict) -> torch.device:
    """The device of a mini-batch: a tensor, or a dict of tensors (a block's inputs by name)."""
    if isinstance(batch, dict):
        return next(v for v in batch.values() if isinstance(v, torch.Tensor)).device
    return batch.device


def _sign_step_hook(group: dict, times: PhaseTimes):
    """``p -= lr * sign(grad)`` the moment ``p``'s gradient is complete, then the gradient is dropped."""

    @torch.no_grad()
    def hook(p: torch.Tensor) -> None:
        with times.phase("sign_step"):
            p.add_(torch.sign(p.grad), alpha=-group["lr"])
            p.grad = None

    return hook


def _initial_params(w: TunedLinear) -> dict[str, torch.Tensor | None]:
    return {
        "v": torch.zeros_like(w.v),
        "min_scale": None if w.min_scale is None else torch.ones_like(w.min_scale),
        "max_scale": None if w.max_scale is None else torch.ones_like(w.max_scale),
    }
