"""Per-image GFLOPs of an ATS model over a dataset, measured with FlopCounterMode."""
from __future__ import annotations

import torch

import ats_fx


class PatternFlops:
    """GFLOPs (multiply-adds) per image, read after each forward pass of the model.

    An image's FLOPs depend only on its token count at each stage, so ``ats_fx.count_flops``
    (FlopCounterMode, the image alone) runs once per distinct count pattern, not per image.
    """

    def __init__(self, model: torch.nn.Module):
        self.model, self.cache, self.values = model, {}, []

    @torch.no_grad()
    def update(self, x: torch.Tensor, limit: int = -1) -> None:
        """Record the first ``limit`` images of ``x`` (all with -1); call right after
        ``model(x)`` on the same batch (reads ``kept_tokens``)."""
        x = x if limit < 0 else x[:limit]
        try:
            trace = ats_fx.kept_tokens(self.model)
        except ats_fx.ATSConfigError:  # a dense model: every image costs the same
            if "dense" not in self.cache:
                self.cache["dense"] = float(ats_fx.count_flops(self.model, x[:1])[0])
            self.values += [self.cache["dense"]] * x.shape[0]
            return
        pattern = torch.stack([t.tokens_out.cpu() for t in trace], 1).tolist()[: x.shape[0]]
        missing = [i for i, p in enumerate(pattern) if tuple(p) not in self.cache]
        counts = {}
        for i in missing:
            if tuple(pattern[i]) not in counts:  # count_flops reruns the model: trace read above
                counts[tuple(pattern[i])] = float(ats_fx.count_flops(self.model, x[i:i + 1])[0])
        self.cache.update(counts)
        self.values += [self.cache[tuple(p)] for p in pattern]

    def mean(self) -> float:
        return float(torch.tensor(self.values, dtype=torch.float64).mean())


@torch.no_grad()
def mean_gflops(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, list[float]]:
    """Mean per-image GFLOPs over ``x`` and mean K' per stage (empty for a dense model)."""
    model.eval()
    model(x)
    try:
        kprime = [float(t.kept.double().mean()) for t in ats_fx.kept_tokens(model)]
    except ats_fx.ATSConfigError:
        kprime = []
    counter = PatternFlops(model)
    counter.update(x)
    return counter.mean(), kprime
