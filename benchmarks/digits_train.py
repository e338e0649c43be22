"""Train the shipped digits ViT (``ats_fx/zoo``) from a seed, on the CPU, in a few minutes.

    python -m benchmarks.digits_train                 # writes ats_fx/zoo/digits_vit.safetensors
    python -m benchmarks.digits_train --pool avg      # no class token: ats_fx/zoo/digits_vit_gap.safetensors
    python -m benchmarks.digits_train --epochs 5 --out /tmp/x.safetensors   # a quick run

Dense training (no ATS): AdamW, cosine schedule, label smoothing, random affine augmentation.
Writes the checkpoint and benchmarks/results/digits_train.json (or digits_train_gap.json: test
accuracy, seed, time).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ats_fx.zoo import digits_split, digits_vit
from ats_fx.zoo.digits import POOLS

RESULTS = Path(__file__).with_name("results")


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random rotation (±12°), scale (0.9-1.1) and shift (±2 px) of a normalised batch."""
    n = x.shape[0]
    u = torch.rand(n, 4, generator=generator) * 2 - 1
    angle, scale = u[:, 0] * math.radians(12), 1 + 0.1 * u[:, 1]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, u[:, 2] * 0.125], 1),
                         torch.stack([sin, cos, u[:, 3] * 0.125], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    model.eval()
    hits = sum(int((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    return hits / len(x)


def cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * base * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def train(epochs: int, seed: int, lr: float = 2e-3, batch: int = 64, log_every: int = 10,
          pool: str = "token") -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(seed)
    data = digits_split()
    model = digits_vit(pretrained=False, pool=pool).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(data.train_x) / batch)
    total, step, start = epochs * steps_per_epoch, 0, time.time()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(data.train_x), generator=g)
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, total, lr, warmup=steps_per_epoch * 3)
            loss = F.cross_entropy(model(augment(data.train_x[idx], g)), data.train_y[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        if (epoch + 1) % log_every == 0 or epoch + 1 == epochs:
            print(f"epoch {epoch + 1:4d}  loss {loss.item():.3f}  test acc {accuracy(model, data.test_x, data.test_y):.4f}",
                  flush=True)
    model.eval()
    report = {
        "test_accuracy": accuracy(model, data.test_x, data.test_y),
        "train_accuracy": accuracy(model, data.train_x, data.train_y),
        "pool": pool, "epochs": epochs, "seed": seed, "lr": lr, "batch": batch,
        "train_images": len(data.train_x), "test_images": len(data.test_x),
        "seconds": round(time.time() - start, 1), "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    return model, report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--pool", choices=sorted(POOLS), default="token",
                        help="token: class token (the demo's model); avg: no class token, average pool")
    parser.add_argument("--out", type=Path, help="checkpoint (default: the one shipped for --pool)")
    parser.add_argument("--report", type=Path)
    args = parser.parse_args(argv)
    from safetensors.torch import save_file

    args.out = args.out or POOLS[args.pool][1]
    args.report = args.report or RESULTS / ("digits_train.json" if args.pool == "token" else "digits_train_gap.json")
    model, report = train(args.epochs, args.seed, args.lr, pool=args.pool)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out))
    report["checkpoint"] = str(args.out)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
