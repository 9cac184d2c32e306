"""autoscheme: one option per quantizable layer, chosen from the committed scores under the average-bits budget.

The layers that must share an option (a `scheme.auto.shared_layers` regex inside one block; the experts of a
mixture-of-experts block) are one decision. Each decision's cost is the storage bits of its layers under each
option (weights, plus a 16-bit scale and a zero point per group unless `ignore_scale_zp_bits`); its score is
the sum of its layers' first-order loss changes. An exact multiple-choice knapsack (quant/bit_budget.py) picks
the plan with the lowest total score whose bits, divided by the scored layers' weights, stay within the budget.
The budget is not part of the scores' fingerprint: a new budget re-solves from the committed scores.
"""
from __future__ import annotations

import dataclasses
import re
from collections import Counter
from typing import Any, Dict, List, Tuple

from qrunner.config.validate import budgets
from qrunner.errors import UserError
from qrunner.models.adapter import LayerPlan
from qrunner.pipeline.stage import Stage, StageContext, register_stage
from qrunner.quant.bit_budget import Item, layer_cost_bits, max_cost, min_cost, solve
from qrunner.quant.scheme import parse_scheme_name
from qrunner.stages.autoscheme_scores import read_scores
from qrunner.stages.layer_plan import AUTOSCHEME, PLAN_KEYS, scheme_is_auto, write_plan


@dataclasses.dataclass
class Decisions:
    """The scored layers grouped into decisions, with each decision's cost per option."""

    groups: List[List[LayerPlan]]
    options: List[str]
    costs: List[Tuple[int, ...]]
    weights: int  # elements of all scored layers

    def items(self, scores: Dict[str, Dict[str, float]]) -> List[Item]:
        return [Item(costs=cost, scores=tuple(sum(scores[o][p.name] for p in group) for o in self.options))
                for group, cost in zip(self.groups, self.costs)]

    def avg_bits_range(self) -> Tuple[float, float]:
        zero = [Item(costs=c, scores=(0.0,) * len(c)) for c in self.costs]
        return min_cost(zero) / self.weights, max_cost(zero) / self.weights


def decisions(cfg: Any, session: Any) -> Decisions:
    """Scored layers (those the base plan quantizes) grouped by block and shared-layer regex or expert set."""
    auto = cfg.scheme.auto
    patterns = [re.compile(p) for p in auto.shared_layers]
    matched = [0] * len(patterns)
    names = session.block_names()
    groups: Dict[Tuple[str, str], List[LayerPlan]] = {}
    for plan in (p for p in session.layer_plan if p.quantize):
        block = max((b for b in names if plan.name.startswith(b + ".")), key=len)
        rel = plan.name[len(block) + 1:]
        hit = next((i for i, rx in enumerate(patterns) if rx.search(rel)), None)
        if hit is not None:
            matched[hit] += 1
        key = f"shared_layers[{hit}]" if hit is not None else session.adapter.option_group(rel)
        groups.setdefault((block, key), []).append(plan)
    for i, count in enumerate(matched):
        if count == 0:
            raise UserError(f"scheme.auto.shared_layers.{i}={auto.shared_layers[i]!r} matches no quantized layer "
                            f"inside a block (e.g. {_example_names(session)}); fix the regex or remove it.")
    options = list(auto.options)
    schemes = [parse_scheme_name(o) for o in options]
    ignore = bool(auto.ignore_scale_zp_bits)
    costs = [tuple(sum(layer_cost_bits(p.in_features, p.out_features, s.bits if s else 16, s.group_size if s else -1,
                                       s.sym if s else True, ignore) for p in group) for s in schemes)
             for group in groups.values()]
    weights = sum(p.in_features * p.out_features for g in groups.values() for p in g)
    if not groups:
        raise UserError("scheme=auto: the model has no quantizable layer inside its blocks to choose schemes for.")
    return Decisions(list(groups.values()), options, costs, weights)


def _example_names(session: Any) -> str:
    names = session.block_names()
    rels = [p.name[len(names[0]) + 1:] for p in session.layer_plan if p.name.startswith(names[0] + ".")]
    return ", ".join(rels[:6])


@register_stage
class AutoSchemeStage(Stage):
    name = AUTOSCHEME
    needs = ("load", "autoscheme_scores")
    reads = ("scheme.name", "scheme.auto.avg_bits", "scheme.auto.options", "scheme.auto.shared_layers",
             "scheme.auto.ignore_scale_zp_bits", *PLAN_KEYS)
    version = 1
    description = "per-layer schemes under the bit budget (exact knapsack)"

    @classmethod
    def in_pipeline(cls, cfg: Any) -> bool:
        return scheme_is_auto(cfg)

    def preflight(self, cfg: Any, session: Any) -> None:
        low, high = decisions(cfg, session).avg_bits_range()
        for budget in budgets(cfg.scheme.auto):
            if not low - 1e-9 <= budget <= high + 1e-9:
                raise UserError(f"scheme.auto.avg_bits={budget:g} is outside what the options "
                                f"{list(cfg.scheme.auto.options)} can reach on this model: {low:.4f} (all "
                                f"cheapest) to {high:.4f} (all most expensive) average bits per weight"
                                f"{'' if cfg.scheme.auto.ignore_scale_zp_bits else ', scales and zero points included'}"
                                ". Choose a budget in that range or change scheme.auto.options.")

    def run(self, ctx: StageContext) -> Dict[str, Any]:
        cfg, session = ctx.cfg, ctx.session
        (budget,) = budgets(cfg.scheme.auto)
        found = decisions(cfg, session)
        scored = read_scores(ctx.inputs["autoscheme_scores"])
        solution = solve(found.items(scored["scores"]), int(budget * found.weights))
        chosen: Dict[str, str] = {}
        for group, option in zip(found.groups, solution.choice):
            chosen.update({p.name: found.options[option] for p in group})
        layers = [planned(p, chosen.get(p.name)) for p in session.layer_plan]
        achieved = solution.cost / found.weights
        per_option = Counter(chosen.values())
        weights_per_option = Counter()
        for p in session.layer_plan:
            if p.name in chosen:
                weights_per_option[chosen[p.name]] += p.in_features * p.out_features
        summary = {"avg_bits_target": budget, "avg_bits": achieved, "estimated_loss_increase": solution.score,
                   "options": found.options, "decisions": len(found.groups),
                   "layers_per_option": {o: per_option.get(o, 0) for o in found.options},
                   "weight_share_per_option": {o: weights_per_option.get(o, 0) / found.weights for o in found.options},
                   "option_of_layer": chosen, "option_loss": scored["loss"],
                   "ignore_scale_zp_bits": bool(cfg.scheme.auto.ignore_scale_zp_bits)}
        write_plan(ctx.out, layers, summary)
        ctx.log.info("autoscheme: %.4f average bits for a %.4g budget; layers per option: %s", achieved, budget,
                     ", ".join(f"{o} {n}" for o, n in summary["layers_per_option"].items()))
        return {k: summary[k] for k in ("avg_bits_target", "avg_bits", "estimated_loss_increase", "decisions",
                                        "layers_per_option", "weight_share_per_option")}


def planned(plan: LayerPlan, option: Any) -> LayerPlan:
    """A layer's plan with the chosen option (bf16: kept in full precision); layers not scored stay as they are."""
    if option is None:
        return plan
    scheme = parse_scheme_name(option)
    if scheme is None:
        return dataclasses.replace(plan, quantize=False, reason="scheme=auto chose bf16", bits=16, group_size=-1)
    return dataclasses.replace(plan, bits=scheme.bits, group_size=scheme.group_size, sym=scheme.sym)

