"""Bit accounting and an exact bit-budget allocator for mixed-precision schemes.

Two pieces, both pure math (numpy + stdlib only):

* :func:`layer_cost_bits` -- storage bits of one quantized linear weight, using
  the same accounting as auto-round's AutoScheme (``compute_layer_bits`` in
  ``auto_round/auto_scheme/utils.py``).
* :func:`solve` -- an exact multiple-choice knapsack solver: every
  :class:`Item` (a layer, or a group of layers forced to share one option)
  picks exactly one option; minimise the summed score (estimated loss increase)
  subject to the summed cost (bits) staying within a budget.

Method of :func:`solve`: dynamic programming over the items, keeping only the
Pareto front of partial solutions -- the (cost, score) states for which no
other state has cost <= and score <= (with one of them strict).  A dominated
state can never lead to a better full solution (adding the same later options
to both keeps the dominance), so discarding it is exact.  Per item, every front
state is extended by every allowed option, states that cannot finish within the
budget (cost + cheapest completion > budget) are dropped, and the candidates
are sorted by cost then score and kept only if their score is strictly below
the running minimum of all cheaper-or-equal candidates
(``np.minimum.accumulate``).  States that fit the budget even with the most
expensive completion are collapsed to the single best of them.  Costs and the
budget are first divided by the gcd of all costs (budget floor-divided, which
is exact: ``sum(g*c) <= B`` iff ``sum(c) <= B // g``).  Each step stores
back-pointers (parent index + option index) to reconstruct the choice.

Scores are accumulated as float64 in item order, so the reported score is
``s_0 + s_1 + ...`` of the chosen options, evaluated left to right.

Tie-breaking (deterministic): among solutions of minimal score, the cheapest
wins; among those, the lexicographically smallest ``choice`` tuple (lower
option indices at earlier items).  "Equal score" means bit-equal partial float
sums; ties that only appear through float rounding are resolved arbitrarily
but still deterministically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np

__all__ = ["Item", "Solution", "layer_cost_bits", "max_cost", "min_cost", "solve"]

_INT64_SAFE = 2**62


def layer_cost_bits(
    in_features: int,
    out_features: int,
    bits: int,
    group_size: int,
    sym: bool,
    ignore_scale_zp_bits: bool = False,
) -> int:
    """Storage bits of one ``out_features x in_features`` weight under a scheme.

    Follows auto-round's AutoScheme accounting: ``numel = in * out``; a scheme
    with ``bits >= 16`` (kept in 16-bit float) or ``ignore_scale_zp_bits`` costs
    ``bits * numel`` (``bits >= 16`` counted as 16).  Otherwise each group adds a
    16-bit scale plus a ``bits``-bit zero point: ``n_group`` is
    ``out * ceil(in / group_size)`` for ``group_size > 0``, ``out`` for
    ``group_size == -1`` (per channel) and ``1`` for ``group_size == 0`` (per
    tensor); total ``bits * numel + n_group * (16 + bits)``.

    ``sym`` does not change the integer count: like auto-round, the zero point
    is counted even for symmetric int schemes.  It is accepted so float
    formats with different per-group metadata can be added later.
    """
    for name, v in (("in_features", in_features), ("out_features", out_features), ("bits", bits)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < -1:
        raise ValueError(f"group_size must be -1, 0 or a positive int, got {group_size!r}")
    numel = in_features * out_features
    if bits >= 16:
        return 16 * numel
    if ignore_scale_zp_bits:
        return bits * numel
    if group_size > 0:
        n_group = out_features * (-(-in_features // group_size))
    elif group_size == -1:
        n_group = out_features
    else:
        n_group = 1
    return bits * numel + n_group * (16 + bits)


@dataclass(frozen=True)
class Item:
    """One decision: a layer, or a group of layers that must share an option.

    ``costs[j]`` / ``scores[j]`` are the bits and the estimated loss increase of
    option ``j`` (same option order for all items); ``scores[j] == math.inf``
    marks option ``j`` as not allowed for this item.
    """

    costs: Tuple[int, ...]
    scores: Tuple[float, ...]


@dataclass(frozen=True)
class Solution:
    """Chosen option index per item, with the summed cost (bits) and score."""

    choice: Tuple[int, ...]
    cost: int
    score: float


def _allowed(items: Sequence[Item]) -> list[list[int]]:
    """Validate items; return the allowed option indices of each item."""
    n_opt = None
    out = []
    for i, it in enumerate(items):
        if len(it.costs) != len(it.scores):
            raise ValueError(f"item {i}: {len(it.costs)} costs but {len(it.scores)} scores")
        if n_opt is None:
            n_opt = len(it.costs)
        elif len(it.costs) != n_opt:
            raise ValueError(f"inconsistent option counts: item 0 has {n_opt} options, item {i} has {len(it.costs)}")
        for j, (c, s) in enumerate(zip(it.costs, it.scores)):
            if isinstance(c, bool) or not isinstance(c, (int, np.integer)):
                raise ValueError(f"item {i} option {j}: cost must be an int, got {c!r}")
            if math.isnan(s) or s == -math.inf:
                raise ValueError(f"item {i} option {j}: score must be finite or +inf, got {s!r}")
        ok = [j for j, s in enumerate(it.scores) if s != math.inf]
        if not ok:
            raise ValueError(f"item {i} has no allowed option (all scores are inf)")
        out.append(ok)
    return out


def min_cost(items: Sequence[Item]) -> int:
    """Cheapest achievable total cost (bits) over the allowed options."""
    return sum(min(int(it.costs[j]) for j in ok) for it, ok in zip(items, _allowed(items)))


def max_cost(items: Sequence[Item]) -> int:
    """Most expensive achievable total cost (bits) over the allowed options."""
    return sum(max(int(it.costs[j]) for j in ok) for it, ok in zip(items, _allowed(items)))


def solve(items: Sequence[Item], budget_bits: int) -> Solution:
    """Exactly minimise the summed score subject to summed cost <= ``budget_bits``.

    Raises ``ValueError`` when the budget is below the minimum achievable bits,
    when items have inconsistent option counts, or when an item has no allowed
    option.  See the module docstring for the method and the tie-breaking rule.
    """
    allowed = _allowed(items)
    budget_bits = int(budget_bits)
    lo = sum(min(int(it.costs[j]) for j in ok) for it, ok in zip(items, allowed))
    if budget_bits < lo:
        raise ValueError(f"budget of {budget_bits} bits is below the minimum achievable {lo} bits")
    if not items:
        return Solution((), 0, 0.0)

    g = 0
    for it, ok in zip(items, allowed):
        for j in ok:
            g = math.gcd(g, int(it.costs[j]))
    g = g or 1
    # Only the allowed options matter; costs are scaled by g and shifted so the
    # cheapest option of each item costs 0 (keeps every state small and >= 0).
    opts, base_total = [], 0
    for it, ok in zip(items, allowed):
        c = np.array([int(it.costs[j]) // g for j in ok], dtype=object)
        base = int(c.min())
        base_total += base
        opts.append((np.array(ok, dtype=np.int64), (c - base).astype(np.int64),
                     np.array([float(it.scores[j]) for j in ok], dtype=np.float64)))
    budget = budget_bits // g - base_total  # >= 0 because budget_bits >= lo
    spans = [int(c.max()) for _, c, _ in opts]
    if sum(spans) >= _INT64_SAFE:
        raise ValueError("cost range too large for int64 arithmetic")
    max_rem = np.cumsum([0] + spans[::-1])[::-1]  # max_rem[k]: worst extra cost of items k..end
    budget = min(budget, int(max_rem[0]))  # more budget than the max changes nothing

    cost = np.zeros(1, dtype=np.int64)
    score = np.zeros(1, dtype=np.float64)
    rank = np.zeros(1, dtype=np.int64)  # lexicographic rank of each state's choice prefix
    parents: list[np.ndarray] = []
    picks: list[np.ndarray] = []
    for k, (opt_idx, c, s) in enumerate(opts):
        n, m = cost.size, c.size
        # Option-major candidate layout: candidate a*n + p = parent p + option a.
        cc = (cost[None, :] + c[:, None]).ravel()
        cs = (score[None, :] + s[:, None]).ravel()
        cpar = np.tile(np.arange(n, dtype=np.int64), m)
        copt = np.repeat(np.arange(m, dtype=np.int64), n)
        fit = cc <= budget  # remaining items can always add 0 (shifted costs)
        cc, cs, cpar, copt = cc[fit], cs[fit], cpar[fit], copt[fit]
        crank = rank[cpar] * m + copt  # prefix order: parent's prefix, then option
        order = np.lexsort((crank, cs, cc))  # by cost, then score, then prefix
        cc, cs, cpar, copt, crank = cc[order], cs[order], cpar[order], copt[order], crank[order]
        keep = np.ones(cc.size, dtype=bool)
        if cc.size > 1:
            keep[1:] = cs[1:] < np.minimum.accumulate(cs)[:-1]
        cc, cs, cpar, copt, crank = cc[keep], cs[keep], cpar[keep], copt[keep], crank[keep]
        # States that fit even with the worst completion: only the best one matters
        # (front scores strictly decrease with cost, so that is the last of them).
        free = int(np.searchsorted(cc, budget - int(max_rem[k + 1]), side="right"))
        if free > 1:
            sl = slice(free - 1, None)
            cc, cs, cpar, copt, crank = cc[sl], cs[sl], cpar[sl], copt[sl], crank[sl]
        cost, score = cc, cs
        rank = np.empty(crank.size, dtype=np.int64)
        rank[np.argsort(crank, kind="stable")] = np.arange(crank.size, dtype=np.int64)
        small = np.int32 if n < 2**31 else np.int64
        parents.append(cpar.astype(small))
        picks.append(opt_idx[copt].astype(np.int16 if len(items[k].costs) > 127 else np.int8))

    best = cost.size - 1  # min score; the front keeps the cheapest of equal scores
    choice = [0] * len(items)
    for k in range(len(items) - 1, -1, -1):
        choice[k] = int(picks[k][best])
        best = int(parents[k][best])
    total = sum(int(it.costs[j]) for it, j in zip(items, choice))
    return Solution(tuple(choice), total, float(score[-1]))
