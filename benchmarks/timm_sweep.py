"""Walk every timm model name of the issue's patterns: converts (and matches) or refused, why.

    python -m benchmarks.timm_sweep            # writes benchmarks/results/timm_sweep.{json,md}
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter, defaultdict
from pathlib import Path

import timm
import torch

from ats_fx.testing.sweep import PATTERNS, check

RESULTS = Path(__file__).with_name("results")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS))
    parser.add_argument("--out", type=Path, default=RESULTS / "timm_sweep")
    args = parser.parse_args(argv)
    rows, start = [], time.time()
    for pattern in args.patterns:
        for name in sorted(timm.list_models(pattern)):
            try:
                row = check(name)
            except Exception as err:  # a bug: recorded so the sweep finishes, and reported
                row = {"model": name, "verdict": "ERROR", "reason": f"{type(err).__name__}: {err}"[:500]}
            row["family"] = pattern
            rows.append(row)
            print(f"{row['verdict']:9s} {name}  {row.get('max_abs_diff', row.get('reason', ''))!s:.120}", flush=True)
    counts = defaultdict(Counter)
    for r in rows:
        counts[r["family"]][r["verdict"]] += 1
    meta = {"timm": timm.__version__, "torch": torch.__version__, "seconds": round(time.time() - start)}
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = ["| pattern | converted (matches reference) | refused (ATSUnsupportedModel) | skipped | errors |",
             "|---|---:|---:|---:|---:|"]
    for fam, c in counts.items():
        lines.append(f"| `{fam}` | {c['converted']} | {c['refused']} | {c['skipped']} | {c['ERROR']} |")
    reasons = Counter(r["reason"].split(":")[1].strip()[:90] if ":" in r.get("reason", "") else r.get("reason", "")
                      for r in rows if r["verdict"] == "refused")
    lines += ["", "Most common refusal reasons (first words):", ""]
    lines += [f"- {n} x {reason}" for reason, n in reasons.most_common(12)]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
