"""``ats-fx``: inspect a model's attention sites, run the demo, draw kept tokens. rich lives here only."""
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
from .api import analyse, describe_unmatched
from .errors import ATSError

console = Console()
DEMO_MODEL = "digits"  # ats_fx/zoo: a ViT trained on scikit-learn's digits
DEMO_STAGES, DEMO_RATIO = "2-5", 0.8  # 98.6% vs 99.7% dense at 1.7x fewer FLOPs


class CLIError(Exception):
    """A user mistake the CLI reports in one line (exit status 2)."""


def load_model(spec: str) -> nn.Module:
    """A timm model name (random weights), ``package.module:factory`` for any importable
    callable that returns a module, or ``transformers:ClassName`` for an HF model class (built
    from its default config, random weights)."""
    if ":" in spec:
        module, _, attr = spec.partition(":")
        try:
            obj = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise CLIError(f"cannot load {spec!r}: {err}") from None
        config_class = getattr(obj, "config_class", None)
        if isinstance(obj, type) and config_class is not None:  # an HF PreTrainedModel class
            return obj(config_class()).eval()
        return (obj() if callable(obj) and not isinstance(obj, nn.Module) else obj).eval()
    import timm

    try:
        return timm.create_model(spec, pretrained=False).eval()
    except RuntimeError as err:  # timm: "Unknown model (...)"
        raise CLIError(f"{err}; list names with timm.list_models('vit_*'), or give package.module:factory") from None


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
        if site in analysis.class_attention:
            table.add_row(str(i), "-", site.module, site.spelling, "keys only",
                          "[green]follows[/green] (class attention)")
            continue
        if site in analysis.not_token:
            table.add_row(str(i), "-", site.module, site.spelling, "no", f"[yellow]{analysis.not_token[site]}[/yellow]")
            continue
        converts = ok_from is not None and site.index >= ok_from
        table.add_row(str(i), str(site.index), site.module, site.spelling, "yes",
                      "[green]yes[/green]" if converts else f"[red]no[/red]: {error}")
    console.print(table)
    console.print(f"input: {tuple(example[0].shape[1:])}; prefix tokens: {analysis.prefix}; "
                  f"pooling: {', '.join(sorted({k for k, _ in analysis.pooling})) or 'unknown'}")
    if analysis.late_class_token is not None and analysis.prefix == 0:
        from .passes.graph import module_path

        console.print(f"class token joins at {module_path(analysis.late_class_token)}: stages score tokens by the "
                      "attention they receive (mean query row, docs/ats-semantics.md)")
    elif analysis.seed is not None and not analysis.class_token:
        console.print("no class token" + (f" ({analysis.prefix} register(s), always kept)" if analysis.prefix else "")
                      + ": stages score tokens by the attention they receive (mean query row, docs/ats-semantics.md)")
    if analysis.unmatched:
        console.print(f"[yellow]softmax attention no spelling matched:[/yellow] {describe_unmatched(analysis.unmatched)}")
    if not analysis.sites:
        console.print("[red]not convertible:[/red] no attention softmax(Q·Kᵀ)·V found in any spelling")
    elif analysis.seed is None:
        console.print(f"[red]not convertible:[/red] {analysis.seed_problem or 'no token sequence found before the first attention'}")
    return 0


def _stats(t: torch.Tensor) -> str:
    t = t.double()
    return f"{t.mean():.1f} / {int(t.min())} / {int(t.max())}"


def _digits_or_timm(name: str):
    """The demo/visualize model: the shipped digits ViT with its data, or a timm model with
    random weights and synthetic images (smooth to cluttered)."""
    if name == "digits":
        from .zoo import digits_split, digits_vit

        data = digits_split()
        return digits_vit(pretrained=True), data.test_x, data.test_y, "digits ViT (shipped weights)"
    model = load_model(name)
    from .passes.capture import infer_input_shape

    shape = infer_input_shape(model)
    g = torch.Generator().manual_seed(0)
    n = 8
    smooth = torch.nn.functional.interpolate(torch.randn(n, shape[0], 14, 14, generator=g), size=shape[1:], mode="bicubic")
    weight = torch.linspace(0, 1, n)[:, None, None, None]
    images = smooth * (1 - weight) + torch.randn(n, *shape, generator=g) * weight
    return model, images, None, f"{name} (random weights)"


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return sum(int((model(xb).argmax(-1) == yb).sum()) for xb, yb in zip(x.split(128), y.split(128))) / len(y)


def cmd_demo(args) -> int:
    from .testing import eager

    torch.manual_seed(args.seed)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("demo", total=5)
        progress.update(task, description=f"loading {args.model}")
        model, images, labels, title = _digits_or_timm(args.model)
        progress.advance(task)
        progress.update(task, description=f"ats_fx.transform(stages={args.stages!r}, ratio={args.ratio})")
        ats = transform(model, args.stages, ratio=args.ratio)
        progress.advance(task)
        progress.update(task, description=f"forward pass on {len(images)} images")
        acc = None
        if labels is not None:
            acc = (_accuracy(model, images, labels), _accuracy(ats, images, labels))
        with torch.no_grad():
            ats(images)
        trace = kept_tokens(ats)
        progress.advance(task)
        progress.update(task, description="checking against the eager per-image reference")
        check = images[: args.batch]
        stages = {t.layer: {"ratio": args.ratio} for t in trace}
        with torch.no_grad():
            got = ats(check)
            want = torch.stack([eager.timm_forward(model, img, stages) for img in check])
        delta = (got - want).abs().max().item()
        progress.advance(task)
        progress.update(task, description="counting FLOPs per image (FlopCounterMode)")
        dense_flops = count_flops(model, check)
        ats_flops = count_flops(ats, check)
        progress.advance(task)

    table = Table(title=f"ATS on {title}, stages {args.stages}, rho={args.ratio}, {len(images)} images")
    for col in ("layer", "tokens in (mean/min/max)", "K (mean)", "tokens out K'+1 (mean/min/max)"):
        table.add_column(col, justify="right")
    for t in trace:
        table.add_row(str(t.layer), _stats(t.tokens_in), f"{t.budget.double().mean():.1f}", _stats(t.tokens_out))
    console.print(table)
    summary = Table(show_header=False)
    if acc is not None:
        summary.add_row("top-1 on the digits test set, dense / ATS", f"{acc[0]:.2%} / {acc[1]:.2%}")
    unit, mult = ("MFLOPs", 1e3) if dense_flops.mean() < 0.1 else ("GFLOPs", 1.0)
    summary.add_row(f"{unit} per image, dense (MACs)", f"{dense_flops.mean() * mult:.3f}")
    summary.add_row(f"{unit} per image, ATS (mean/min/max over {len(check)})",
                    f"{ats_flops.mean() * mult:.3f} / {ats_flops.min() * mult:.3f} / {ats_flops.max() * mult:.3f}")
    summary.add_row("FLOPs ratio dense / ATS", f"{dense_flops.mean() / ats_flops.mean():.2f}x")
    summary.add_row(f"max |Δ| vs eager reference ({len(check)} images)", f"{delta:.2e}")
    console.print(summary)
    if labels is None:
        console.print("[dim]Random weights: attention is near-uniform, so images keep similar K'. "
                      "A trained model samples far fewer tokens on easy images.[/dim]")
    return 0 if delta < 1e-3 else 1


def _load_images(paths: list[str], model: nn.Module, digits: bool) -> torch.Tensor:
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    for p in paths:
        try:
            Image.open(p).close()
        except (OSError, UnidentifiedImageError) as err:
            raise CLIError(f"cannot read image {p!r}: {err}") from None
    if digits:  # grey, ink bright on dark like the scans, 32x32, the training normalisation
        from .zoo.digits import IMAGE_SIZE, MEAN, STD

        out = []
        for p in paths:
            img = Image.open(p).convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
            x = torch.tensor(np.asarray(img), dtype=torch.float32)[None] / 255
            x = 1 - x if x.mean() > 0.5 else x  # dark ink on white paper -> bright ink on black
            out.append((x - MEAN) / STD)
        return torch.stack(out)
    import timm

    config = timm.data.resolve_data_config({}, model=model)
    tf = timm.data.create_transform(**config)
    return torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])


def cmd_visualize(args) -> int:
    from .visualize import collect_kprime, draw_kept_tokens, plot_kprime_histogram

    model, images, _, title = _digits_or_timm(args.model)
    if args.images:
        images = _load_images(args.images, model, args.model == "digits")
    ats = transform(model, args.stages, ratio=args.ratio, example_inputs=images[:1])
    kprime = collect_kprime(ats, images.split(128))
    path = draw_kept_tokens(ats, images[: args.max_images], args.out)
    console.print(f"kept tokens of {min(len(images), args.max_images)} image(s) -> [bold]{path}[/bold]")
    if args.hist:
        hist = plot_kprime_histogram(kprime, args.hist, f"K' per stage, {title}, {len(images)} images, rho={args.ratio}")
        console.print(f"K' histogram over {len(images)} image(s) -> [bold]{hist}[/bold]")
    table = Table(title="K' per stage")
    for col in ("layer", "mean", "min", "max"):
        table.add_column(col, justify="right")
    for layer, k in kprime.items():
        table.add_row(str(layer), f"{k.double().mean():.1f}", str(int(k.min())), str(int(k.max())))
    console.print(table)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="ats-fx", description="Adaptive Token Sampling for vision transformers")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="list attention sites and whether each converts")
    p.add_argument("model", help="timm model name, package.module:factory, or transformers:ClassName")
    p.set_defaults(func=cmd_inspect)
    d = sub.add_parser("demo", help="run ATS on the shipped digits ViT (real weights, real test images)")
    d.add_argument("--model", default=DEMO_MODEL, help="'digits' (shipped), or a timm name (random weights)")
    d.add_argument("--stages", default=DEMO_STAGES)
    d.add_argument("--ratio", type=float, default=DEMO_RATIO)
    d.add_argument("--batch", type=int, default=16, help="images checked against the eager reference")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)
    v = sub.add_parser("visualize", help="draw the tokens each ATS stage keeps, and K' histograms")
    v.add_argument("images", nargs="*", help="image files (default: the digits test set)")
    v.add_argument("--model", default=DEMO_MODEL, help="'digits' (shipped), or a timm name (random weights)")
    v.add_argument("--stages", default=DEMO_STAGES)
    v.add_argument("--ratio", type=float, default=DEMO_RATIO)
    v.add_argument("--out", default="ats_kept_tokens.png", help="PNG of per-stage token masks")
    v.add_argument("--hist", help="also write a PNG histogram of K' per stage")
    v.add_argument("--max-images", type=int, default=8, help="rows in the mask figure")
    v.set_defaults(func=cmd_visualize)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        return args.func(args)
    except (ATSError, CLIError) as err:
        console.print(f"[red]error:[/red] {err}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
