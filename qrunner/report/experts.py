"""Which MoE experts the calibration data reached.

The router sends each token to a few experts, so with a few hundred calibration samples some experts of a large
MoE may receive no token at all in some block. Tuning has no gradient for such an expert: its weights come out as
round-to-nearest from their own values (AutoRound's starting point, unchanged). That is a sound result, but not a
tuned one, so qrunner counts the tokens every expert received on the original model's path (the block's target
forward), records them per block and reports the experts that got none.
"""
from __future__ import annotations

from typing import Any, Dict, List

NAMES_SHOWN = 8


def unrouted(block_name: str, tokens: Dict[str, List[int]]) -> List[str]:
    """The experts of one block (`tokens`: experts module -> tokens each expert received) that got none."""
    return [f"{block_name}.{module}.{e}" for module, counts in tokens.items() for e, n in enumerate(counts) if n == 0]


def coverage_summary(infos: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The stage's record over all blocks (`infos`: the blocks' unit records); empty for a model without
    fused experts."""
    counts = [(i["block"], i["expert_tokens"]) for i in infos if i.get("expert_tokens")]
    if not counts:
        return {}
    total = sum(len(c) for _, tokens in counts for c in tokens.values())
    missed = [name for block, tokens in counts for name in unrouted(block, tokens)]
    return {"experts": total, "experts_without_tokens": len(missed), "experts_without_tokens_names": missed,
            "min_expert_tokens": min(n for _, tokens in counts for c in tokens.values() for n in c)}


def coverage_text(summary: Dict[str, Any]) -> str:
    """One line for the log and the report."""
    missed = summary["experts_without_tokens"]
    names = summary["experts_without_tokens_names"]
    shown = ", ".join(names[:NAMES_SHOWN]) + (f" and {missed - NAMES_SHOWN} more" if missed > NAMES_SHOWN else "")
    if not missed:
        return (f"MoE experts: all {summary['experts']} received calibration tokens (at least "
                f"{summary['min_expert_tokens']} each)")
    return (f"MoE experts: {missed} of {summary['experts']} received no calibration tokens and are round-to-nearest "
            f"from their own weights (nothing to tune them on): {shown}. More or more varied calibration samples "
            "(data.nsamples) reach more experts")
