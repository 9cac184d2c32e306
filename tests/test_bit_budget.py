"""Tests for qrunner.quant.bit_budget: auto-round bit accounting and the exact
multiple-choice knapsack solver (checked against brute force)."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from qrunner.quant.bit_budget import Item, Solution, layer_cost_bits, max_cost, min_cost, solve


# ---------------------------------------------------------------- layer_cost_bits


def test_layer_cost_bits_hand_computed():
    n = 4096 * 4096
    assert n == 16777216
    # W4 g128: 4 bits/weight + per (row, group) a 16-bit scale and a 4-bit zero point.
    assert layer_cost_bits(4096, 4096, 4, 128, True) == 4 * 16777216 + 4096 * 32 * 20 == 69730304
    # per-channel: one group per output row
    assert layer_cost_bits(4096, 4096, 4, -1, True) == 4 * n + 4096 * 20 == 67190784
    # per-tensor: a single group
    assert layer_cost_bits(4096, 4096, 4, 0, True) == 4 * n + 20
    # 16-bit (or wider) weights carry no scale/zp and count as 16 bits
    assert layer_cost_bits(4096, 4096, 16, 128, True) == 16 * n == 268435456
    assert layer_cost_bits(4096, 4096, 32, 128, False) == 16 * n
    # ignore flag: only the weight payload
    assert layer_cost_bits(4096, 4096, 4, 128, True, ignore_scale_zp_bits=True) == 4 * n
    assert layer_cost_bits(4096, 4096, 16, 128, True, ignore_scale_zp_bits=True) == 16 * n
    # in_features not divisible by group_size: ceil(300 / 128) = 3 groups per row
    assert layer_cost_bits(300, 10, 4, 128, True) == 4 * 3000 + 10 * 3 * 20 == 12600
    # rectangular: groups run along in_features, per output row
    assert layer_cost_bits(4096, 11008, 2, 64, True) == 2 * 45088768 + 11008 * 64 * 18
    assert layer_cost_bits(11008, 4096, 8, 128, True) == 8 * 45088768 + 4096 * 86 * 24


def test_layer_cost_bits_sym_does_not_change_int_count():
    for args in [(4096, 4096, 4, 128), (300, 10, 2, 64), (64, 32, 8, -1), (64, 32, 3, 0)]:
        assert layer_cost_bits(*args, sym=True) == layer_cost_bits(*args, sym=False)


@pytest.mark.parametrize(
    "args", [(0, 4, 4, 128, True), (4, -1, 4, 128, True), (4, 4, 0, 128, True), (4, 4, 4, -2, True)]
)
def test_layer_cost_bits_rejects_bad_args(args):
    with pytest.raises(ValueError):
        layer_cost_bits(*args)


# ---------------------------------------------------------------- solver helpers


def _seq_sum(vals):
    s = 0.0
    for v in vals:
        s = s + v
    return s


def _brute(items, budget):
    """Best choice by (score summed left to right, cost, choice) -- the documented rule."""
    best = None
    for ch in itertools.product(*(range(len(it.costs)) for it in items)):
        scores = [it.scores[j] for it, j in zip(items, ch)]
        if any(s == math.inf for s in scores):
            continue
        cost = sum(it.costs[j] for it, j in zip(items, ch))
        if cost > budget:
            continue
        key = (_seq_sum(scores), cost, ch)
        if best is None or key < best:
            best = key
    return best


def _check_consistent(items, budget, sol):
    assert isinstance(sol, Solution)
    assert len(sol.choice) == len(items)
    assert sol.cost == sum(it.costs[j] for it, j in zip(items, sol.choice))
    assert sol.cost <= budget
    assert all(it.scores[j] != math.inf for it, j in zip(items, sol.choice))
    assert sol.score == pytest.approx(_seq_sum(it.scores[j] for it, j in zip(items, sol.choice)), abs=1e-12)


def _random_items(rng, n_items, n_opt, integer_scores, cost_scale=1):
    items = []
    for _ in range(n_items):
        costs = tuple(rng.randint(0, 20) * cost_scale for _ in range(n_opt))
        if integer_scores:
            scores = [float(rng.randint(-2, 6)) for _ in range(n_opt)]
        else:
            scores = [rng.uniform(-0.5, 3.0) for _ in range(n_opt)]
        for j in range(n_opt):
            if rng.random() < 0.2:
                scores[j] = math.inf
        if all(s == math.inf for s in scores):
            scores[rng.randrange(n_opt)] = rng.uniform(0.0, 1.0)
        items.append(Item(costs, tuple(scores)))
    return items


# ---------------------------------------------------------------- solver vs brute force


@pytest.mark.parametrize("integer_scores", [False, True])
def test_solver_matches_brute_force(integer_scores):
    rng = random.Random(1234 + integer_scores)
    checked = 0
    for trial in range(400):
        n_items, n_opt = rng.randint(1, 7), rng.randint(2, 4)
        scale = rng.choice([1, 1, 7, 2**30])  # 2**30 makes totals ~1e11 and exercises gcd scaling
        items = _random_items(rng, n_items, n_opt, integer_scores, scale)
        lo, hi = min_cost(items), max_cost(items)
        budget = rng.randint(lo, hi) + (rng.randint(0, scale - 1) if scale > 1 else 0)
        sol = solve(items, budget)
        _check_consistent(items, budget, sol)
        best_score, best_cost, best_choice = _brute(items, budget)
        assert abs(sol.score - best_score) <= 1e-12, (trial, sol, best_score)
        if integer_scores:  # sums are exact, so the full tie-breaking rule is checkable
            assert (sol.score, sol.cost, sol.choice) == (best_score, best_cost, best_choice), trial
        checked += 1
    assert checked == 400


def test_min_and_max_cost_skip_disallowed_options():
    items = [Item((1, 5, 9), (2.0, 1.0, math.inf)), Item((3, 2, 8), (math.inf, 1.0, 0.0))]
    assert min_cost(items) == 1 + 2
    assert max_cost(items) == 5 + 8


def test_budget_equal_to_min_cost_picks_min_cost_choice():
    rng = random.Random(7)
    for _ in range(50):
        items = []
        for _ in range(rng.randint(1, 8)):
            costs = tuple(rng.sample(range(1, 100), 4))  # distinct -> unique cheapest option
            scores = tuple(rng.uniform(0, 1) for _ in range(4))
            items.append(Item(costs, scores))
        budget = min_cost(items)
        sol = solve(items, budget)
        assert sol.choice == tuple(int(np.argmin(it.costs)) for it in items)
        assert sol.cost == budget


def test_budget_below_min_raises_with_minimum():
    items = [Item((10, 20), (1.0, 0.0)), Item((30, 5), (0.0, math.inf))]
    assert min_cost(items) == 40
    with pytest.raises(ValueError, match=r"minimum achievable 40 bits"):
        solve(items, 39)
    assert solve(items, 40).choice == (0, 0)


def test_budget_at_or_above_max_picks_min_score_per_item():
    rng = random.Random(99)
    for _ in range(50):
        items = _random_items(rng, rng.randint(1, 10), rng.randint(2, 4), integer_scores=False)
        want = tuple(min(range(len(it.scores)), key=lambda j: it.scores[j]) for it in items)
        for budget in (max_cost(items), max_cost(items) + 12345):
            sol = solve(items, budget)
            assert sol.choice == want
            _check_consistent(items, budget, sol)


def test_identical_items_sharing_costs():
    # 5 identical items; extra budget 4 buys two 2-bit upgrades (score -2 each),
    # which beats one 6-bit upgrade. Tie-break: lexicographically smallest choice.
    items = [Item((2, 4, 8), (3.0, 1.0, 0.0))] * 5
    sol = solve(items, 14)
    assert sol == Solution((0, 0, 0, 1, 1), 14, 11.0)
    # with 6 extra bits: three 2-bit upgrades (-6) beat one 6-bit upgrade (-3)
    assert solve(items, 16) == Solution((0, 0, 1, 1, 1), 16, 9.0)
    # full budget: everything at the best option
    assert solve(items, 40) == Solution((2,) * 5, 40, 0.0)


def test_ties_prefer_cheaper_solution():
    # Options 1 and 2 have the same score; the cheaper one must be chosen.
    items = [Item((1, 3, 5), (2.0, 0.5, 0.5)), Item((1, 2, 9), (1.0, 1.0, math.inf))]
    assert solve(items, 100) == Solution((1, 0), 4, 1.5)


def test_gcd_scaling_with_non_divisible_budget():
    items = [Item((1000, 3000), (5.0, 1.0)), Item((1000, 2000), (4.0, 0.0))]
    # budget 3999 behaves like 3000 (floor): only the second item can be upgraded
    assert solve(items, 3999) == Solution((0, 1), 3000, 5.0)
    # at 4000, (1, 0) also scores 5.0 but costs more: the cheaper (0, 1) wins the tie
    assert solve(items, 4000) == Solution((0, 1), 3000, 5.0)
    assert solve(items, 5000) == Solution((1, 1), 5000, 1.0)


def test_empty_items():
    assert solve([], 0) == Solution((), 0, 0.0)
    with pytest.raises(ValueError, match="minimum achievable 0 bits"):
        solve([], -1)


def test_input_errors():
    with pytest.raises(ValueError, match="inconsistent option counts"):
        solve([Item((1, 2), (0.0, 1.0)), Item((1, 2, 3), (0.0, 1.0, 2.0))], 10)
    with pytest.raises(ValueError, match="no allowed option"):
        solve([Item((1, 2), (0.0, 1.0)), Item((1, 2), (math.inf, math.inf))], 10)
    with pytest.raises(ValueError, match="no allowed option"):
        min_cost([Item((1,), (math.inf,))])
    with pytest.raises(ValueError, match="2 costs but 3 scores"):
        solve([Item((1, 2), (0.0, 1.0, 2.0))], 10)
    with pytest.raises(ValueError, match="score"):
        solve([Item((1, 2), (float("nan"), 1.0))], 10)


# ---------------------------------------------------------------- realistic size


def _greedy(items, budget):
    """Start from the cheapest choice; repeatedly take the best score-drop per bit that fits."""
    choice = [min((j for j in range(len(it.costs)) if it.scores[j] != math.inf), key=lambda j: (it.costs[j], it.scores[j]))
              for it in items]
    cost = sum(it.costs[j] for it, j in zip(items, choice))
    while True:
        best = None
        for i, it in enumerate(items):
            c0, s0 = it.costs[choice[i]], it.scores[choice[i]]
            for j in range(len(it.costs)):
                dc, ds = it.costs[j] - c0, s0 - it.scores[j]
                if ds > 0 and dc > 0 and cost + dc <= budget and (best is None or ds / dc > best[0]):
                    best = (ds / dc, i, j, dc)
        if best is None:
            break
        _, i, j, dc = best
        choice[i], cost = j, cost + dc
    return cost, sum(it.scores[j] for it, j in zip(items, choice))


def test_realistic_model_size_beats_greedy():
    shapes = [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]  # q,k,v,o,gate,up,down
    options = [(2, 64), (4, 128), (8, 128), (16, 128)]
    rng = np.random.default_rng(0)
    items, numel = [], 0
    for _block in range(43):
        for in_f, out_f in shapes:
            costs = tuple(layer_cost_bits(in_f, out_f, b, g, True) for b, g in options)
            scores = tuple(float(x) for x in np.sort(rng.lognormal(0.0, 1.0, 4))[::-1])
            items.append(Item(costs, scores))
            numel += in_f * out_f
    assert len(items) == 301
    budget = 3 * numel  # 3 average bits per weight
    assert min_cost(items) < budget < max_cost(items)
    sol = solve(items, budget)
    _check_consistent(items, budget, sol)
    g_cost, g_score = _greedy(items, budget)
    assert g_cost <= budget
    assert sol.score <= g_score + 1e-9
    # scores strictly fall with cost, so an optimum cannot leave enough slack for any upgrade
    assert budget - sol.cost < max(max(it.costs) - min(it.costs) for it in items)
