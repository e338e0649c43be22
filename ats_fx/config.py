"""User options of the ATS rewrite, validated once, before any graph work."""
from __future__ import annotations

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

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(s.layer for s in self.stages)


def parse_stages(stages: Stages) -> list[int]:
    """Accept an int, an iterable of ints, or a string such as ``"3-11"`` or ``"3,5,7-9"``."""
    if isinstance(stages, bool):
        raise ATSConfigError(f"stages={stages!r}: give attention-layer indices, e.g. range(3, 12) or '3-11'")
    if isinstance(stages, int):
        out = [stages]
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
        try:
            out = [int(s) for s in stages]
        except (TypeError, ValueError):
            raise ATSConfigError(f"stages={stages!r}: give ints, a range, or a string like '3-11'") from None
    if not out:
        raise ATSConfigError("stages is empty: name at least one attention layer, e.g. stages=range(3, 12)")
    if len(set(out)) != len(out):
        raise ATSConfigError(f"stages={stages!r} names a layer twice")
    if any(s < 0 for s in out):
        raise ATSConfigError(f"stages={stages!r}: layer indices count from 0 and cannot be negative")
    return sorted(out)


def _per_stage(name: str, value: PerStage, n: int) -> list:
    if value is None or isinstance(value, (int, float)):
        return [value] * n
    values = list(value)
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
) -> ATSOptions:
    """Validate user options. With neither ``ratio`` nor ``k`` given, ratio defaults to 1.0."""
    layers = parse_stages(stages)
    if ratio is not None and k is not None:
        raise ATSConfigError("give either ratio (rho) or k, not both")
    if ratio is None and k is None:
        ratio = 1.0
    ratios = _per_stage("ratio", ratio, len(layers))
    ks = _per_stage("k", k, len(layers))
    for r in ratios:
        if r is not None and (isinstance(r, bool) or not 0.0 < float(r) <= 1.0):
            raise ATSConfigError(f"ratio={r!r} is outside (0, 1]: ratio is the share of tokens kept, e.g. 0.87")
    for kk in ks:
        if kk is not None and (isinstance(kk, bool) or not isinstance(kk, int) or kk < 1):
            raise ATSConfigError(f"k={kk!r}: k is the most tokens a stage samples and must be an int >= 1")
    if score not in SCORES:
        raise ATSConfigError(f"score={score!r}: choose one of {SCORES}")
    if padding not in PADDINGS:
        raise ATSConfigError(f"padding={padding!r}: choose one of {PADDINGS}")
    if kernels not in KERNELS:
        raise ATSConfigError(f"kernels={kernels!r}: choose one of {KERNELS}")
    if selection not in SELECTIONS:
        raise ATSConfigError(f"selection={selection!r}: choose one of {SELECTIONS}")
    stage_opts = tuple(
        StageOptions(layer, None if r is None else float(r), kk) for layer, r, kk in zip(layers, ratios, ks)
    )
    return ATSOptions(stage_opts, score, padding, kernels, selection)
