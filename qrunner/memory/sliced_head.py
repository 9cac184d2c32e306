"""The output head applied in slices of its rows: the vocabulary-wide projection is never whole in RAM.

A 128k-token head of a 4096-wide model is 1 GB in bf16 (2 GB in fp32), more than one decoder block of that
model, and a 152k or 262k vocabulary is larger still. The streaming modes read it from the checkpoint a slice
of rows at a time (one `safe_open` slice read each) and accumulate what the caller needs slice by slice:

- `nll`: the summed next-token negative log-likelihood, with a running log-sum-exp per token and the target
  token's logit picked from the slice that holds it (evaluate);
- `nll_and_grad`: the same for one sample plus its gradient with respect to the last block's output, in two
  passes over the slices (the log-sum-exp first, then softmax - one-hot times the slice's rows; autoscheme);
- `logits`: the full logits of a few rows, written slice by slice into one output tensor (lm-eval's tasks ask
  for them).

The modules before the projection (final norms) are small and are applied whole. A final logit soft cap
(`cap * tanh(z / cap)`, Gemma) is applied per slice, and its derivative in the gradient.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, Optional, Sequence, Tuple

import torch
from torch import nn

SLICE_BYTES = 64 * 2**20  # the projection's rows read at a time, in the compute dtype
GROUP_BYTES = 256 * 2**20  # normed hidden rows kept for one pass over the slices (nll)


class SlicedHead:
    """The head modules `names` of `model` (applied in this order; all but the last are in RAM, the last is a
    linear projection whose weight stays in the checkpoint and is read through `reader` in row slices)."""

    def __init__(self, model: nn.Module, names: Sequence[str], reader: object, dtype: torch.dtype,
                 softcap: Optional[float] = None, slice_bytes: Optional[int] = None, scale: float = 1.0) -> None:
        if not names:
            raise ValueError("the model has no output head modules")
        self.model, self.reader, self.dtype, self.softcap, self.scale = model, reader, dtype, softcap, scale
        self.pre, self.projection = list(names[:-1]), names[-1]
        proj = model.get_submodule(self.projection)
        if not isinstance(proj, nn.Linear):
            raise TypeError(f"the output head {self.projection} is a {type(proj).__name__}, not a linear "
                            "projection; streaming modes apply the head in row slices of a linear layer")
        self.vocab, self.hidden = proj.out_features, proj.in_features
        self.has_bias = proj.bias is not None
        row_bytes = self.hidden * torch.empty((), dtype=dtype).element_size()
        self.slice_rows = max(1, (slice_bytes or SLICE_BYTES) // row_bytes)

    # ---- building blocks -------------------------------------------------------------------
    def normed(self, hidden: torch.Tensor) -> torch.Tensor:
        """The last block's output through the modules before the projection (final norms)."""
        for name in self.pre:
            hidden = self.model.get_submodule(name)(hidden)
        return hidden

    def slices(self) -> Iterator[Tuple[int, int, torch.Tensor, Optional[torch.Tensor]]]:
        """(first row, end row, weight rows, bias rows) of the projection, read one slice at a time."""
        for start in range(0, self.vocab, self.slice_rows):
            stop = min(self.vocab, start + self.slice_rows)
            weight = self.reader.read_row_range(f"{self.projection}.weight", start, stop).to(self.dtype)
            bias = (self.reader.read_row_range(f"{self.projection}.bias", start, stop).to(self.dtype)
                    if self.has_bias else None)
            yield start, stop, weight, bias

    def _logits(self, normed: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """fp32 logits of one slice (scaled, then soft-capped, as the model's forward does)."""
        z = torch.nn.functional.linear(normed.to(weight.dtype), weight, bias).float()
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    # ---- what the stages ask for -----------------------------------------------------------
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits [..., vocab] of `hidden` (the last block's output), computed slice by slice."""
        with torch.no_grad():
            normed = self.normed(hidden)
            out = torch.empty(*normed.shape[:-1], self.vocab, dtype=torch.float32)
            for start, stop, weight, bias in self.slices():
                out[..., start:stop] = self._logits(normed, weight, bias)
        return out

    def nll(self, read: Callable[[range], torch.Tensor], labels: torch.Tensor) -> float:
        """The summed negative log-likelihood of `labels` [n, T]: row i of `read(range)` (the last block's output,
        [n, T + 1, hidden] for a range of n rows) predicts `labels[i]` from its first T positions. Rows are
        taken in groups whose normed hidden states fit GROUP_BYTES; each group is one pass over the slices."""
        n, tokens = labels.shape
        per_row = (tokens + 1) * self.hidden * 4
        group = max(1, GROUP_BYTES // per_row)
        total = 0.0
        with torch.no_grad():
            for first in range(0, n, group):
                rows = range(first, min(n, first + group))
                normed = self.normed(read(rows))[:, :tokens]
                lse, target = self._lse_and_target(normed, labels[rows.start:rows.stop])
                total += float((lse - target).sum(dtype=torch.float64))
        return total

    def _lse_and_target(self, normed: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per token: log-sum-exp of its logits and the logit of its label, one slice at a time."""
        run_max = torch.full(labels.shape, -math.inf)
        run_sum = torch.zeros(labels.shape)
        target = torch.zeros(labels.shape)
        for start, stop, weight, bias in self.slices():
            z = self._logits(normed, weight, bias)
            new_max = torch.maximum(run_max, z.amax(-1))
            run_sum = run_sum * torch.exp(run_max - new_max) + torch.exp(z - new_max.unsqueeze(-1)).sum(-1)
            run_max = new_max
            here = (labels >= start) & (labels < stop)
            if here.any():
                target[here] = z[here].gather(-1, (labels[here] - start).unsqueeze(-1)).squeeze(-1)
        return run_max + torch.log(run_sum), target

    def nll_and_grad(self, hidden: torch.Tensor, labels: torch.Tensor) -> Tuple[float, torch.Tensor]:
        """The summed negative log-likelihood of `labels` [n, T] predicted by `hidden` [n, T + 1, h] and its
        gradient with respect to `hidden` (fp32, `hidden`'s shape): the log-sum-exp in a first pass over the
        slices, then dNLL/dlogits = softmax - one-hot, slice by slice, through the projection's rows; the
        norms' part by autograd."""
        tokens = labels.shape[1]
        h = hidden.detach().requires_grad_(True)
        with torch.enable_grad():
            normed = self.normed(h)
        predicting = normed.detach()[:, :tokens]
        with torch.no_grad():
            lse, target = self._lse_and_target(predicting, labels)
            grad = torch.zeros(*predicting.shape[:-1], self.hidden, dtype=torch.float32)
            for start, stop, weight, bias in self.slices():
                z = self._logits(predicting, weight, bias)
                dz = torch.exp(z - lse.unsqueeze(-1))
                here = (labels >= start) & (labels < stop)
                if here.any():
                    picked = dz[here]
                    picked.scatter_add_(-1, (labels[here] - start).unsqueeze(-1), -torch.ones(len(picked), 1))
                    dz[here] = picked
                if self.softcap:
                    dz *= 1 - (z / self.softcap) ** 2
                if self.scale != 1.0:
                    dz *= self.scale
                grad += dz @ weight.float()
        full = torch.zeros(normed.shape, dtype=torch.float32)
        full[:, :tokens] = grad
        (g,) = torch.autograd.grad(normed, [h], full.to(normed.dtype))
        return float((lse - target).sum(dtype=torch.float64)), g.float()
