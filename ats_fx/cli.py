"""``ats-fx``: inspect a model's attention sites, or run the demo. rich lives here only."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional

import torch
import torch.nn as nn
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from . import count_flops, kept_tokens, transform
from .api import analyse
from .errors import ATSError

console = Console()
DEMO_MODEL = "deit_small_patch16_224"


def load_model(spec: str) -> nn.Module:
    """A timm model name (random weights, or hub weights with ``--pretrained``), or
    ``package.module:factory`` for any importable callable that returns a module."""
    if ":" in spec:
        module, _, attr = spec.partition(":")
        obj = getattr(importlib.import_module(module), attr)
        return (obj() if callable(obj) and not isinstance(obj, nn.Module) else obj).eval()
    import timm

    return timm.create_model(spec, pretrained=False).eval()


def first_convertible(model: nn.Module, n: int) -> Optional[int]:
    """The earliest layer whose ATS conversion succeeds. A stage at layer i needs everything
    after it to follow the tokens, so convertibility is monotone in i: binary search."""
    lo, hi, best = 0, n - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        try:
            transform(model, mid)
            best, hi = mid, mid - 1
        except ATSError:
            lo = mid + 1
    return best


def cmd_inspect(args) -> int:
    model = load_model(args.model)
    try:
        _, analysis, example = analyse(model)
    except ATSError as err:
        console.print(f"[red]cannot capture:[/red] {err}")
        return 1
    table = Table(title=f"attention sites of {args.model}")
    for col in ("#", "layer", "module", "spelling", "tokens", "converts"):
        table.add_column(col)
    n = len(analysis.token_sites)
    ok_from = first_convertible(model, n) if n and analysis.seed is not None else None
    error = None
    if n and ok_from != 0:
        try:
            transform(model, 0)
        except ATSError as err:
            error = str(err)
    for i, site in enumerate(analysis.sites):
        if site in analysis.not_token:
            table.add_row(str(i), "-", site.module, site.spelling, "no", f"[yellow]{analysis.not_token[site]}[/yellow]")
            continue
        converts = ok_from is not None and site.index >= ok_from
        table.add_row(str(i), str(site.index), site.module, site.spelling, "yes",
                      "[green]yes[/green]" if converts else f"[red]no[/red]: {error}")
    console.print(table)
    console.print(f"input: {tuple(example[0].shape[1:])}; prefix tokens: {analysis.prefix}; "
                  f"pooling: {', '.join(sorted({k for k, _ in analysis.pooling})) or 'unknown'}")
    if not analysis.sites:
        console.print("[red]not convertible:[/red] no attention softmax(Q·Kᵀ)·V found in any spelling")
    elif analysis.seed is None:
        console.print(f"[red]not convertible:[/red] {analysis.seed_problem or 'no class token in front of the patch tokens'}")
    return 0


def _stats(t: torch.Tensor) -> str:
    t = t.double()
    return f"{t.mean():.1f} / {int(t.min())} / {int(t.max())}"


def cmd_demo(args) -> int:
    import timm

    from .testing import eager

    torch.manual_seed(args.seed)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("demo", total=5)
        progress.update(task, description=f"building {DEMO_MODEL} (random weights)")
        model = timm.create_model(DEMO_MODEL, pretrained=False).eval()
        progress.advance(task)
        progress.update(task, description=f"ats_fx.transform(stages={args.stages}, ratio={args.ratio})")
        ats = transform(model, args.stages, ratio=args.ratio)
        progress.advance(task)
        progress.update(task, description=f"forward pass on {args.batch} images")
        g = torch.Generator().manual_seed(args.seed)
        smooth = torch.nn.functional.interpolate(torch.randn(args.batch, 3, 14, 14, generator=g), size=224, mode="bicubic")
        noise = torch.randn(args.batch, 3, 224, 224, generator=g)
        weight = torch.linspace(0, 1, args.batch)[:, None, None, None]
        images = smooth * (1 - weight) + noise * weight  # from smooth to cluttered
        with torch.no_grad():
            logits = ats(images)
        trace = kept_tokens(ats)
        progress.advance(task)
        progress.update(task, description="checking against the eager per-image reference")
        stages = {t.layer: {"ratio": args.ratio} for t in trace}
        with torch.no_grad():
            want = torch.stack([eager.timm_forward(model, img, stages) for img in images])
        delta = (logits - want).abs().max().item()
        progress.advance(task)
        progress.update(task, description="counting FLOPs (FlopCounterMode)")
        dense_flops = count_flops(model, images)
        ats_flops = count_flops(ats, images)
        progress.advance(task)

    table = Table(title=f"ATS on {DEMO_MODEL}, stages {args.stages}, rho={args.ratio}, batch {args.batch}")
    for col in ("stage", "tokens in (mean/min/max)", "K (mean)", "tokens out K'+1 (mean/min/max)"):
        table.add_column(col, justify="right")
    for t in trace:
        table.add_row(str(t.layer), _stats(t.tokens_in), f"{t.budget.double().mean():.1f}", _stats(t.tokens_out))
    console.print(table)
    summary = Table(show_header=False)
    summary.add_row("GFLOPs per image, dense (MACs)", f"{dense_flops.mean():.3f}")
    summary.add_row("GFLOPs per image, ATS (mean/min/max)",
                    f"{ats_flops.mean():.3f} / {ats_flops.min():.3f} / {ats_flops.max():.3f}")
    summary.add_row("FLOPs ratio dense / ATS", f"{dense_flops.mean() / ats_flops.mean():.2f}x")
    summary.add_row("max |Δ| vs eager reference", f"{delta:.2e}")
    console.print(summary)
    console.print("[dim]Random weights: attention is near-uniform, so images keep similar K'. "
                  "A trained model samples far fewer tokens on easy images.[/dim]")
    return 0 if delta < 1e-3 else 1


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="ats-fx", description="Adaptive Token Sampling for vision transformers")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="list attention sites and whether each converts")
    p.add_argument("model", help="timm model name, or package.module:factory")
    p.set_defaults(func=cmd_inspect)
    d = sub.add_parser("demo", help=f"run ATS on an embedded {DEMO_MODEL} and print what it did")
    d.add_argument("--stages", default="3-11")
    d.add_argument("--ratio", type=float, default=0.87)
    d.add_argument("--batch", type=int, default=8)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        return args.func(args)
    except ATSError as err:
        console.print(f"[red]error:[/red] {err}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
