"""ImageNet-1k validation of a timm model, dense and with ATS (paper Table A.4 / appendix C).

    python -m benchmarks.imagenet_eval --model deit_small_patch16_224 --data /path/to/imagenet/val

``--data`` is an ImageFolder (one folder per synset, sorted = timm's class order), or a flat
folder of images with ``--labels FILE`` (one line per image: ``filename label``, or only the
label, in sorted filename order, as ILSVRC2012_validation_ground_truth.txt). Weights come from
the timm/Hugging Face hub (``--no-pretrained`` for random weights, ``--checkpoint`` for a file).
Default configurations are the paper's DeiT-S points:

    dense                                   79.8 top-1, 4.6 GFLOPs
    ATS multi-stage 3-11, rho=1.0, no FT    ~79.2 top-1, ~3.0 GFLOPs
    ATS single-stage 3, K=108, no FT        ~78.5 top-1

Prints a table (rich progress bars) and writes JSON. GFLOPs are FlopCounterMode multiply-adds per
image over the first ``--flops-images`` images. Not yet run on real ImageNet by us: no ImageNet
and no hub access exist where ats_fx is developed; tests run it on a generated ImageFolder.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import ats_fx

from .flops import PatternFlops

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
PAPER = {  # DeiT-S top-1 from the ATS paper (no fine-tuning), for the table
    ("deit_small_patch16_224", "dense"): 79.8,
    ("deit_small_patch16_224", "3-11:rho=1.0"): 79.2,
    ("deit_small_patch16_224", "3:k=108"): 78.5,
}
DEFAULT_CONFIGS = ["dense", "3-11:rho=1.0", "3:k=108"]


def parse_config(spec: str) -> Optional[dict]:
    """``"dense"`` -> None; ``"3-11:rho=0.87"`` / ``"3:k=108"`` -> ``transform`` keyword arguments."""
    if spec == "dense":
        return None
    stages, _, budget = spec.partition(":")
    key, _, value = budget.partition("=")
    if key not in ("rho", "k") or not value:
        raise SystemExit(f"config {spec!r}: write STAGES:rho=R or STAGES:k=K, e.g. 3-11:rho=1.0 or 3:k=108")
    return {"stages": stages, **({"ratio": float(value)} if key == "rho" else {"k": int(value)})}


class FlatFolder(torch.utils.data.Dataset):
    """A folder of images plus a labels file (``filename label`` lines, or labels only in sorted
    filename order)."""

    def __init__(self, root: Path, labels: Path, transform):
        files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        lines = [line.split() for line in labels.read_text().splitlines() if line.strip()]
        if all(len(parts) == 2 for parts in lines):
            by_name = {Path(name).stem: int(label) for name, label in lines}
            missing = [p.name for p in files if p.stem not in by_name]
            if missing:
                raise SystemExit(f"{labels} has no label for {missing[:3]}... ({len(missing)} images)")
            self.items = [(p, by_name[p.stem]) for p in files]
        elif len(lines) == len(files):
            self.items = [(p, int(parts[-1])) for p, parts in zip(files, lines)]
        else:
            raise SystemExit(f"{labels}: {len(lines)} labels for {len(files)} images in {root}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image

        path, label = self.items[i]
        return self.transform(Image.open(path).convert("RGB")), label


def make_dataset(data: Path, labels: Optional[Path], transform):
    if labels is not None:
        return FlatFolder(data, labels, transform)
    if not any(p.is_dir() for p in data.iterdir()):
        raise SystemExit(f"{data} has no class folders: pass --labels FILE for a flat validation folder")
    from torchvision.datasets import ImageFolder

    return ImageFolder(str(data), transform=transform)


def load_model(name: str, pretrained: bool, checkpoint: Optional[Path]) -> torch.nn.Module:
    import timm

    model = timm.create_model(name, pretrained=pretrained and checkpoint is None,
                              checkpoint_path=str(checkpoint) if checkpoint else "")
    return model.eval()


@torch.no_grad()
def evaluate(model, loader, device, flops_images: int, progress: Progress, label: str) -> dict:
    counter = PatternFlops(model)
    top1 = top5 = seen = 0
    kprime_sum: list[float] = []
    task = progress.add_task(label, total=len(loader.dataset))
    start = time.time()
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        top1 += int((top[:, 0] == y).sum())
        top5 += int((top == y[:, None]).any(-1).sum())
        if isinstance(model, ats_fx.ATSGraphModule):
            trace = ats_fx.kept_tokens(model)
            kprime_sum = [a + float(t.kept.sum()) for a, t in zip(kprime_sum or [0.0] * len(trace), trace)]
        if len(counter.values) < flops_images:
            counter.update(x, flops_images - len(counter.values))
        seen += len(y)
        progress.advance(task, len(y))
    return {"top1": 100 * top1 / seen, "top5": 100 * top5 / seen, "images": seen,
            "gflops": counter.mean(), "flops_images": len(counter.values),
            "kprime": [k / seen for k in kprime_sum], "seconds": round(time.time() - start, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--labels", type=Path, help="labels file for a flat validation folder")
    parser.add_argument("--config", action="append", help=f"dense or STAGES:rho=R / STAGES:k=K (default {DEFAULT_CONFIGS})")
    parser.add_argument("--no-pretrained", action="store_true", help="random weights (testing the harness)")
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--limit", type=int, help="evaluate the first N images only")
    parser.add_argument("--flops-images", type=int, default=500)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("imagenet_eval.json"))
    args = parser.parse_args(argv)
    configs = [(spec, parse_config(spec)) for spec in (args.config or DEFAULT_CONFIGS)]
    console = Console()

    import timm

    model = load_model(args.model, not args.no_pretrained, args.checkpoint).to(args.device)
    data_config = timm.data.resolve_data_config({}, model=model)
    dataset = make_dataset(args.data, args.labels, timm.data.create_transform(**data_config))
    if args.limit:
        dataset = torch.utils.data.Subset(dataset, range(min(args.limit, len(dataset))))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)
    example = torch.zeros(1, *data_config["input_size"], device=args.device)
    results = []
    with Progress(console=console) as progress:
        for spec, options in configs:
            net = model if options is None else ats_fx.transform(model, **options, example_inputs=example)
            results.append({"config": spec, "options": options,
                            **evaluate(net, loader, args.device, args.flops_images, progress, spec)})
    table = Table(title=f"{args.model} on {args.data} ({results[0]['images']} images, {args.device})")
    for col in ("config", "top-1", "top-5", "GFLOPs", "mean K' per stage", "paper top-1"):
        table.add_column(col, justify="right")
    for r in results:
        paper = PAPER.get((args.model, r["config"]))
        table.add_row(r["config"], f"{r['top1']:.2f}", f"{r['top5']:.2f}", f"{r['gflops']:.3f}",
                      " ".join(f"{k:.0f}" for k in r["kprime"]) or "-", "-" if paper is None else f"{paper}")
    console.print(table)
    meta = {"model": args.model, "data": str(args.data), "pretrained": not args.no_pretrained,
            "checkpoint": str(args.checkpoint) if args.checkpoint else None, "device": args.device,
            "torch": torch.__version__, "timm": timm.__version__, "batch_size": args.batch_size}
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
