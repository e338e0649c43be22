"""User options of the ATS rewrite, validated once, before any graph work."""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

from .errors import ATSConfigError

Stages = Union[int, str, Iterable[int]]
PerStage = Union[None, float, int, Sequence[Union[float, int]]]

SCORES = ("attn_vnorm", "attn")
PADDINGS = ("auto", "batch_max", "static")
KERNELS = ("auto", "triton", "reference")
# "ats" is the paper's method; "topk" and "random" are its baselines (ablations, eager only).
SELECTIONS = ("ats", "topk", "random")
# What a returned token sequence becomes: "full", its original length (dropped tokens hold their last
# value); "kept", an ats_fx.KeptTokens(tokens, positions, mask) of the kept tokens.
TOKEN_OUTPUTS = ("full", "kept")


@dataclass(frozen=True)
class StageOptions:
    """What one ATS stage does: its attention-layer index and its budget (ratio or k)."""

    layer: int
    ratio: Optional[float]
    k: Optional[int]


@dataclass(frozen=True)
class ATSOptions:
    """All options of one transform (see ``ats_fx.transform``)."""

    stages: tuple[StageOptions, ...]
    score: str = "attn_vnorm"
    padding: str = "auto"
    kernels: str = "auto"
    selection: str = "ats"
    token_output: str = "full"

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(s.layer for s in self.stages)


def _scalar(value):
    """A numpy scalar or 0-d array/tensor as its Python value; anything else unchanged."""
    return value.item() if getattr(value, "ndim", None) == 0 and hasattr(value, "item") else value


def _index(value) -> Optional[int]:
    """``value`` as an int if it is an integer (Python, numpy or a 0-d integer tensor), else None."""
    value = _scalar(value)
    return int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else None


def _number(value) -> Optional[float]:
    """``value`` as a float if it is a real number (Python, numpy or a 0-d tensor), else None."""
    value = _scalar(value)
    return float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else None


def parse_stages(stages: Stages) -> list[int]:
    """Accept an int, an iterable of ints, or a string such as ``"3-11"`` or ``"3,5,7-9"``. The
    layers come back in the order written (per-stage values pair with them in that order)."""
    single = _index(stages)
    if isinstance(stages, bool) or (single is None and not isinstance(stages, (str, Iterable))):
        raise ATSConfigError(f"stages={stages!r}: give attention-layer indices, e.g. range(3, 12) or '3-11'")
    if single is not None:
        out = [single]
    elif isinstance(stages, str):
        out = []
        for part in stages.replace(" ", "").split(","):
            if not part:
                continue
            lo, sep, hi = part.partition("-")
            try:
                out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
            except ValueError:
                raise ATSConfigError(
                    f"stages={stages!r}: cannot read {part!r}; write indices like '3-11' or '3,5,7'"
                ) from None
    else:
        given = list(stages)  # a generator is read once
        out = [_index(s) for s in given]
        bad = [s for s, i in zip(given, out) if i is None]
        if bad:
            raise ATSConfigError(f"stages={stages!r}: {bad[0]!r} is not a layer index; give ints, a range, "
                                 "or a string like '3-11'")
    if not out:
        raise ATSConfigError("stages is empty: name at least one attention layer, e.g. stages=range(3, 12)")
    if len(set(out)) != len(out):
        raise ATSConfigError(f"stages={stages!r} names a layer twice")
    if any(s < 0 for s in out):
        raise ATSConfigError(f"stages={stages!r}: layer indices count from 0 and cannot be negative")
    return out


def _per_stage(name: str, value: PerStage, n: int, unordered: bool) -> list:
    if value is None or _number(value) is not None:
        return [value] * n
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        kind = "a number" if name == "ratio" else "an int"
        raise ATSConfigError(f"{name}={value!r}: give {kind}, or a list with one per stage")
    values = list(value)
    if unordered:
        raise ATSConfigError(f"{name} gives one value per stage, but stages is a {type(unordered).__name__}, "
                             "which has no order to pair them with: give stages as a list, a range or a string")
    if len(values) != n:
        raise ATSConfigError(f"{name} has {len(values)} values for {n} stages: give one value, or one per stage")
    return values


def make_options(
    stages: Stages,
    ratio: PerStage = None,
    k: PerStage = None,
    score: str = "attn_vnorm",
    padding: str = "auto",
    kernels: str = "auto",
    selection: str = "ats",
    token_output: str = "full",
) -> ATSOptions:
    """Validate user options. With neither ``ratio`` nor ``k`` given, ratio defaults to 1.0."""
    layers = parse_stages(stages)
    if ratio is not None and k is not None:
        raise ATSConfigError("give either ratio (rho) or k, not both")
    if ratio is None and k is None:
        ratio = 1.0
    unordered = stages if isinstance(stages, (set, frozenset)) else False
    ratios = _per_stage("ratio", ratio, len(layers), unordered)
    ks = _per_stage("k", k, len(layers), unordered)
    if ratio is not None:
        for i, r in enumerate(ratios):
            value = _number(r)
            if value is None or not 0.0 < value <= 1.0:
                raise ATSConfigError(f"ratio={r!r} (stage {layers[i]}) is outside (0, 1]: ratio is the share of "
                                     "tokens kept, e.g. 0.87")
            ratios[i] = value
    if k is not None:
        for i, kk in enumerate(ks):
            value = _index(kk)
            if value is None or value < 1:
                raise ATSConfigError(f"k={kk!r} (stage {layers[i]}): k is the most tokens a stage samples and must "
                                     "be an int >= 1")
            ks[i] = value
    if score not in SCORES:
        raise ATSConfigError(f"score={score!r}: choose one of {SCORES}")
    if padding not in PADDINGS:
        raise ATSConfigError(f"padding={padding!r}: choose one of {PADDINGS}")
    if kernels not in KERNELS:
        raise ATSConfigError(f"kernels={kernels!r}: choose one of {KERNELS}")
    if selection not in SELECTIONS:
        raise ATSConfigError(f"selection={selection!r}: choose one of {SELECTIONS}")
    if token_output not in TOKEN_OUTPUTS:
        raise ATSConfigError(f"token_output={token_output!r}: choose one of {TOKEN_OUTPUTS} ('full': the original "
                             "length, dropped tokens hold their last value; 'kept': ats_fx.KeptTokens)")
    # Sorted by layer, each with the values given beside it.
    stage_opts = tuple(sorted((StageOptions(layer, r, kk) for layer, r, kk in zip(layers, ratios, ks)),
                              key=lambda s: s.layer))
    return ATSOptions(stage_opts, score, padding, kernels, selection, token_output)
