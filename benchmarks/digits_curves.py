"""Top-1 vs measured GFLOPs on the digits test set (paper Figs. 3-5, Table A.3), on the CPU.

    python -m benchmarks.digits_curves                          # no fine-tuning, then 5 epochs
    python -m benchmarks.digits_curves --pool avg               # the digits ViT without a class token
    torchrun --nproc_per_node 2 -m benchmarks.digits_curves     # the fine-tunes run under DDP

For each budget (multi-stage 1-5 at several rho, single-stage at layer 1 at several K) it
evaluates ATS, ATS without the ‖V‖ factor (score="attn"), top-K selection and random dropping
with the same K rule, first with the shipped weights and then after a short fine-tune with each
selection in the loop. GFLOPs are FlopCounterMode counts (multiply-adds) per image, averaged
over the test set. Writes benchmarks/results/digits_curves.{json,md,png} (``--pool avg``: the model
without a class token, whose ATS stages score by the mean query row: digits_curves_gap.*).
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

import ats_fx
from ats_fx.zoo import digits_split, digits_vit

from .digits_finetune import distributed, finetune, transform_for_training
from .digits_train import accuracy
from .flops import mean_gflops

RESULTS = Path(__file__).with_name("results")
MULTI_STAGES, SINGLE_STAGE = "1-5", 1
RATIOS = (1.0, 0.8, 0.6, 0.4)
KS = (48, 32, 16, 8)
VARIANTS = {  # label -> transform options
    "ATS": {"selection": "ats", "score": "attn_vnorm"},
    "ATS w/o ||V||": {"selection": "ats", "score": "attn"},
    "top-K": {"selection": "topk", "score": "attn_vnorm"},
    "random": {"selection": "random"},
}


def configs(ratios=RATIOS, ks=KS):
    """(family, variant, budget label, transform options); family None is the dense model."""
    yield "dense", "dense", "-", None
    for variant, opts in VARIANTS.items():
        for r in ratios:
            yield "multi-stage 1-5", variant, f"rho={r}", {"stages": MULTI_STAGES, "ratio": r, **opts}
        for k in ks:
            yield f"single-stage {SINGLE_STAGE}", variant, f"K={k}", {"stages": SINGLE_STAGE, "k": k, **opts}


def evaluate(model, data) -> dict:
    torch.manual_seed(0)  # random selection: the same draws for every evaluation
    acc = accuracy(model, data.test_x, data.test_y)
    gflops, kprime = mean_gflops(model, data.test_x)
    return {"accuracy": acc, "gflops": gflops, "kprime": kprime}


def run(finetune_epochs: int, ratios=RATIOS, ks=KS, limit=None, pool: str = "token") -> list[dict]:
    data = digits_split()
    rank, _ = distributed()
    rows = []
    for family, variant, budget, options in configs(ratios, ks):
        start = time.time()
        if options is None:
            model = digits_vit(pretrained=True, pool=pool)
        else:
            model = ats_fx.transform(digits_vit(pretrained=True, pool=pool), **options)
        row = {"family": family, "variant": variant, "budget": budget, "options": options,
               "finetuned": False, **evaluate(model, data)}
        rows.append(row)
        if finetune_epochs:
            if options is None:
                train_model = digits_vit(pretrained=True, pool=pool).train()
                eval_model = model
            else:
                train_model, eval_model = transform_for_training(options, pool)
            finetune(train_model, data.train_x[:limit], data.train_y[:limit], epochs=finetune_epochs)
            eval_model.load_state_dict(train_model.state_dict())
            rows.append({**row, "finetuned": True, "finetune_epochs": finetune_epochs, **evaluate(eval_model, data)})
        if rank == 0:
            tail = f" -> {rows[-1]['accuracy']:.4f} fine-tuned" if finetune_epochs else ""
            print(f"{family:18s} {variant:14s} {budget:9s} {row['gflops'] * 1e3:7.2f} MFLOPs  "
                  f"top-1 {row['accuracy']:.4f}{tail}  ({time.time() - start:.0f} s)", flush=True)
    return rows


def plot(rows: list[dict], path: Path, title: str = "ATS on the shipped digits ViT (65 tokens, 6 blocks)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tuned = sorted({r["finetuned"] for r in rows})
    fig, axes = plt.subplots(1, len(tuned), figsize=(6.5 * len(tuned), 4.8), sharey=True, squeeze=False)
    colors = {"ATS": "C3", "ATS w/o ||V||": "C1", "top-K": "C0", "random": "C7"}
    for ax, ft in zip(axes[0], tuned):
        curves = defaultdict(list)
        for r in rows:
            if r["finetuned"] == ft:
                curves[(r["family"], r["variant"])].append((r["gflops"] * 1e3, r["accuracy"] * 100))
        for (family, variant), pts in sorted(curves.items()):
            pts.sort()
            xs, ys = zip(*pts)
            if family == "dense":
                ax.plot(xs, ys, "k*", markersize=14, label="dense")
                continue
            style = "-o" if family.startswith("multi") else "--s"
            ax.plot(xs, ys, style, color=colors[variant], markersize=4, label=f"{variant}, {family}")
        ax.set_xlabel("MFLOPs per image (multiply-adds, FlopCounterMode)")
        ax.set_title("after ATS-in-the-loop fine-tuning" if ft else "no fine-tuning (shipped weights)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-1 on digits test set (%)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(rows: list[dict]) -> str:
    lines = ["| family | variant | budget | fine-tuned | MFLOPs | top-1 (%) | mean K' per stage |",
             "|---|---|---|---|---:|---:|---|"]
    for r in rows:
        ks = ", ".join(f"{k:.1f}" for k in r["kprime"]) or "-"
        lines.append(f"| {r['family']} | {r['variant']} | {r['budget']} | {'yes' if r['finetuned'] else 'no'} "
                     f"| {r['gflops'] * 1e3:.2f} | {r['accuracy'] * 100:.2f} | {ks} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    parser.add_argument("--ks", type=int, nargs="+", default=list(KS))
    parser.add_argument("--limit", type=int, help="fine-tune on the first N training images only")
    parser.add_argument("--pool", choices=("token", "avg"), default="token",
                        help="token: the shipped ViT with a class token; avg: the one without (mean query row scores)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    args.out = args.out or RESULTS / ("digits_curves" if args.pool == "token" else "digits_curves_gap")
    start = time.time()
    rows = run(args.finetune_epochs, args.ratios, args.ks, args.limit, args.pool)
    rank, world = distributed()
    if rank == 0:
        meta = {"device": "cpu", "threads": torch.get_num_threads(), "world_size": world,
                "torch": torch.__version__, "seconds": round(time.time() - start, 1),
                "test_images": 360, "finetune_epochs": args.finetune_epochs, "pool": args.pool}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(markdown(rows))
        title = ("ATS on the shipped digits ViT (65 tokens, 6 blocks)" if args.pool == "token" else
                 "ATS on the digits ViT without a class token (64 tokens, average pool, mean query row scores)")
        plot(rows, args.out.with_suffix(".png"), title)
        print(f"wrote {args.out}.{{json,md,png}}")


if __name__ == "__main__":
    main()
