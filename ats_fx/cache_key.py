"""ats_fx's source as part of Inductor's cache keys.

Inductor's on-disk caches (the FX graph cache and AOTAutograd's) key a compile on the graph it is
handed, the inputs and Inductor's config. The graph ``backend="ats"`` hands over calls ATS stage
modules, whose code is not in that key. So a compile by one ats_fx version could be served to
another: measured on an H100 (torch 2.11), the ats_fx of commit 08373e4, compiling ViT-B/16 at
batch 1 with a cache the current code had filled, ran the current code's compiled graph and failed
("ats_fx::overlapped_stage() expected at most 11 argument(s) but received 13"); with its own cache
directory the same run compiled and ran. A change that kept the op signatures could have run the
other version's code without an error.

Inductor's documented way to key its caches on code it cannot see is a custom pass's ``uuid()``:
``SourceKey`` is a post-grad pass that changes nothing and whose uuid hashes every source file of
the installed ats_fx, and the module-level switches that change what a stage traces to
(``traced_switches``, which the benchmarks flip for A/Bs). The FX graph cache keys the graph after
the stages are traced, where a switch already shows; AOTAutograd's keys the graph before, where it
does not (that cache passes over graphs holding ats_fx's own functions, which most rewritten graphs
do, but not all need to).
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Optional

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

PACKAGE = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=None)
def source_hash(root: Path = PACKAGE) -> str:
    """SHA-256 over the path and bytes of every ``.py`` file under ``root`` (read once a process)."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def traced_switches() -> str:
    """The values of ats_fx's module-level switches that decide what a stage traces to (the benchmarks
    flip them for A/Bs; a user never does), read when Inductor computes a cache key."""
    from . import dispatch
    from .passes import defer

    return (f"overlap={dispatch.OVERLAP},sm_share={dispatch.SM_SHARE},unmasked={dispatch.UNMASKED},"
            f"defer={defer.ENABLED}")


class SourceKey(CustomGraphPass):
    """Leaves the graph as it is; its uuid puts ats_fx's source hash and its traced switches into
    Inductor's cache keys."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        return None

    def uuid(self) -> Optional[str]:
        return f"ats_fx-{source_hash()}-{traced_switches()}"
