"""Merge one Inductor autotune cache directory into another without losing choices from either.

``s15_run.sh`` carries its GEMM choices between device calls as a tgz of the ``*.best_config`` files and
of ``cache/<hash>``, one JSON file holding every GEMM benchmark. Untarring a carried tgz over a machine
that is still warm from the call before replaces that JSON file with the carried, older copy, and the
shapes tuned in between are lost (session 20: 144 benchmark entries of ViT-B's last 7 shapes). This
copies the files DST lacks and deep-merges the JSON files, keeping DST's value where both have one.

    python3 benchmarks/sessions/merge_inductor_cache.py SRC_DIR DST_DIR
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path


def merge_dicts(dst: dict, src: dict) -> int:
    """Add ``src``'s entries missing from ``dst`` (recursively); returns how many leaves were added."""
    added = 0
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            added += merge_dicts(dst[key], value)
        elif key not in dst:
            dst[key] = value
            added += 1
    return added


def merge_tree(src: Path, dst: Path) -> tuple[int, int]:
    """(files copied, JSON entries added) merging directory ``src`` into ``dst``."""
    copied = added = 0
    for path in src.rglob("*"):
        if not path.is_file():
            continue
        target = dst / path.relative_to(src)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
            copied += 1
        elif path.parent.name == "cache":
            mine, theirs = json.loads(target.read_text()), json.loads(path.read_text())
            if mine.get("system") != theirs.get("system"):
                continue  # another GPU's or torch's timings: keep this machine's
            n = merge_dicts(mine, theirs)
            if n:
                target.write_text(json.dumps(mine))
                added += n
    return copied, added


if __name__ == "__main__":
    copied, added = merge_tree(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"merged {sys.argv[1]} into {sys.argv[2]}: {copied} files copied, {added} JSON entries added")
