"""The tuner as it was before issue 18, for ``benchmarks/tuning_breakdown.py --variant checkpointed``.

Put on ``PYTHONPATH``, this module patches qrunner when (and only when) its modules are imported, so that
importing it does not load torch early: the fake-quantized linears run autograd through ``quant_dequant``
under activation checkpointing (the forward's matmul again in the backward pass), the best iteration is
quantized again from its parameters, the block's loops leave glibc's heap trimming as it is (no
``keep_freed_memory``), and every block's ``unit.json`` is marked ``tuning_variant: checkpointed``. Not part of qrunner; benchmarks only.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys


def _patch_fake_quant(module) -> None:
    import torch
    import torch.nn.functional as F

    from qrunner.quant.rtn import quant_dequant

    def fake(self, x, v, min_scale, max_scale):
        w_hat, _, _, _ = quant_dequant(self.linear.weight, self.scheme, v, min_scale, max_scale)
        return F.linear(x, w_hat, self.linear.bias)

    def forward(self, x):
        if not torch.is_grad_enabled():
            return fake(self, x, self.v, self.min_scale, self.max_scale)
        return torch.utils.checkpoint.checkpoint(fake, self, x, self.v, self.min_scale, self.max_scale,
                                                 use_reentrant=False, preserve_rng_state=False)

    module.TunedLinear.forward = forward
    module.TunedLinear.quantized_from_codes = module.TunedLinear.quantized


def _patch_quantize(module) -> None:
    import contextlib

    module.keep_freed_memory = lambda: contextlib.nullcontext(False)  # glibc's trimming, as before issue 18
    original = module.QuantizeStage._quantize_block

    def quantize_block(self, *args, **kwargs):
        weights, tuning = original(self, *args, **kwargs)
        tuning["tuning_variant"] = "checkpointed"
        return weights, tuning

    module.QuantizeStage._quantize_block = quantize_block


PATCHES = {"qrunner.quant.fake_quant": _patch_fake_quant, "qrunner.stages.quantize": _patch_quantize}


class _Loader(importlib.abc.Loader):
    def __init__(self, inner, patch) -> None:
        self.inner, self.patch = inner, patch

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        self.inner.exec_module(module)
        self.patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader, PATCHES[fullname])
        return spec


sys.meta_path.insert(0, _Finder())
