"""The tuner's time per iteration, before and after issue 18, interleaved in one process (A/B rounds), so that the
machine's drift (±20 % between separate runs on a shared 2-core VM) falls on both alike.

Block 0 of the bundled demo model, its inputs from 128 random token windows of 256, W4A16 g128, micro-batch 8;
each round runs ``--iters`` iterations of every variant in turn:

* ``checkpointed``: the fake-quantized linears as before issue 18 (autograd through ``quant_dequant`` under
  activation checkpointing; best snapshot quantized again), glibc's heap trimming untouched;
* ``checkpointed+keep``: the same inside ``keep_freed_memory``;
* ``fused``: the fused layer (``qrunner.quant.fake_quant``), glibc untouched;
* ``fused+keep``: what the quantize stage runs now.

    python benchmarks/tuning_ab.py --rounds 4 --iters 25

Writes ``tuning_ab.json`` and ``tuning_ab.md`` to ``--out``; the best loss of every run is recorded (it must be
the same for all variants: same arithmetic).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as qrunner's entry point sets it, before torch is imported


def main(argv: List[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--iters", type=int, default=25)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from qrunner._paths import asset
    from qrunner.memory.trim import keep_freed_memory
    from qrunner.quant.autoround import TuneSettings, tune_block
    from qrunner.quant.fake_quant import TunedLinear
    from qrunner.quant.rtn import quant_dequant
    from qrunner.quant.scheme import QuantScheme

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(asset("demo-llama")), dtype=torch.float32).eval()
    block = model.model.layers[0]
    with torch.no_grad():
        hidden = model.model.embed_tokens(torch.randint(0, model.config.vocab_size, (128, 256)))
        rope = model.model.rotary_emb(hidden[:1], torch.arange(256).unsqueeze(0))
        forward = lambda b, x: b(x, attention_mask=None, position_embeddings=rope)  # noqa: E731
        target = torch.cat([forward(block, hidden[i:i + 8]) for i in range(0, 128, 8)])
    layers = {n: QuantScheme(4, 128, True) for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}

    def fake(self, x, v, lo, hi):
        return F.linear(x, quant_dequant(self.linear.weight, self.scheme, v, lo, hi)[0], self.linear.bias)

    def checkpointed_forward(self, x):
        if not torch.is_grad_enabled():
            return fake(self, x, self.v, self.min_scale, self.max_scale)
        return torch.utils.checkpoint.checkpoint(fake, self, x, self.v, self.min_scale, self.max_scale,
                                                 use_reentrant=False, preserve_rng_state=False)

    fused = (TunedLinear.forward, TunedLinear.quantized_from_codes)
    checkpointed = (checkpointed_forward, TunedLinear.quantized)
    variants = {"checkpointed": (checkpointed, False), "checkpointed+keep": (checkpointed, True),
                "fused": (fused, False), "fused+keep": (fused, True)}
    ms: Dict[str, List[float]] = {v: [] for v in variants}
    losses: Dict[str, List[float]] = {v: [] for v in variants}
    settings = TuneSettings(iters=args.iters, batch_size=8)
    try:
        for _ in range(args.rounds):
            for name, ((fwd, snap), keep) in variants.items():
                TunedLinear.forward, TunedLinear.quantized_from_codes = fwd, snap
                with keep_freed_memory() if keep else contextlib.nullcontext():
                    result = tune_block(block, layers, hidden, target, forward, settings,
                                        torch.Generator().manual_seed(1))
                ms[name].append(round(1000 * result.seconds / args.iters, 1))
                losses[name].append(result.best_loss)
                print(f"{name}: {ms[name][-1]} ms/iter, best loss {result.best_loss:.6g}", flush=True)
    finally:
        TunedLinear.forward, TunedLinear.quantized_from_codes = fused
    base = statistics.median(ms["checkpointed"])
    rows = {v: {"ms_per_iter": ms[v], "median": statistics.median(ms[v]), "min": min(ms[v]),
                "ratio_to_checkpointed": round(statistics.median(ms[v]) / base, 3), "best_loss": losses[v]}
            for v in variants}
    lines = ["# Tuner time per iteration, A/B in one process", "",
             f"Block 0 of the demo model, 128 x 256 tokens, W4A16 g128, micro-batch 8, fp32, {args.rounds} rounds of "
             f"{args.iters} iterations per variant, interleaved; torch {torch.__version__}, {os.cpu_count()} CPUs.", "",
             "| variant | median ms/iter | min | vs checkpointed | best loss (all rounds) |", "|---|---:|---:|---:|---|"]
    for v, r in rows.items():
        lines.append(f"| {v} | {r['median']:.1f} | {r['min']:.1f} | {r['ratio_to_checkpointed']:.3f} | "
                     f"{', '.join(sorted({f'{x:.6g}' for x in r['best_loss']}))} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tuning_ab.json").write_text(json.dumps({"rounds": args.rounds, "iters": args.iters,
                                                         "variants": rows}, indent=2) + "\n")
    (args.out / "tuning_ab.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
