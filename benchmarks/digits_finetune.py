"""Fine-tune a transformed model with ATS in the loop (gradients flow through the kept rows).

Runs alone or under torchrun with DistributedDataParallel (gloo on the CPU, nccl on GPUs):

    python -m benchmarks.digits_finetune --stages 1-5 --ratio 0.6 --epochs 5
    torchrun --nproc_per_node 2 -m benchmarks.digits_finetune --stages 1-5 --ratio 0.6

Starts from the shipped digits checkpoint; writes a JSON report (rank 0) with the test accuracy
before and after, and whether all replicas ended with identical weights.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ats_fx
from ats_fx.zoo import digits_split, digits_vit

from .digits_train import accuracy, augment, cosine_lr


def distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def transform_for_training(options: dict, pool: str = "token") -> tuple[torch.nn.Module, torch.nn.Module]:
    """(train-mode ATS model, eval-mode ATS model) with the same state_dict keys. The graph is
    captured in the model's mode, so training and evaluation each get their own capture."""
    base = digits_vit(pretrained=True, pool=pool)
    train_model = ats_fx.transform(base.train(), **options)
    eval_model = ats_fx.transform(base.eval(), **options)
    return train_model, eval_model


def finetune(model: torch.nn.Module, train_x: torch.Tensor, train_y: torch.Tensor, *, epochs: int,
             lr: float = 3e-4, batch: int = 64, seed: int = 0) -> torch.nn.Module:
    """Train ``model`` in place; each rank takes its share of every epoch's shuffled order."""
    rank, world = distributed()
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)  # the same order on every rank
    aug = torch.Generator().manual_seed(seed * 1000 + rank)
    per_rank = batch // world
    steps = math.ceil(len(train_x) / batch)
    total = max(epochs * steps, 1)
    for step in range(epochs * steps):
        if step % steps == 0:
            order = torch.randperm(len(train_x), generator=g)
        idx = order[(step % steps) * batch:][:batch][rank::world][:per_rank]
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, total, lr, warmup=min(steps, total // 5 + 1))
        loss = F.cross_entropy(net(augment(train_x[idx], aug)), train_y[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model


def replicas_identical(model: torch.nn.Module) -> bool:
    """True when every rank holds the same weights (DDP kept them in sync)."""
    _, world = distributed()
    if world == 1:
        return True
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], t) for t in gathered[1:])


def run(options: dict, epochs: int, limit: Optional[int] = None, seed: int = 0, pool: str = "token") -> dict:
    data = digits_split()
    train_x, train_y = data.train_x[:limit], data.train_y[:limit]
    train_model, eval_model = transform_for_training(options, pool)
    before = accuracy(eval_model, data.test_x, data.test_y)
    initial = {k: v.clone() for k, v in train_model.state_dict().items()}
    start = time.time()
    torch.manual_seed(seed + distributed()[0])  # random selection draws differ per rank
    finetune(train_model, train_x, train_y, epochs=epochs, seed=seed)
    eval_model.load_state_dict(train_model.state_dict())
    rank, world = distributed()
    return {
        "options": {k: v for k, v in options.items()}, "pool": pool, "epochs": epochs, "world_size": world,
        "train_images": len(train_x), "test_accuracy_before": before,
        "test_accuracy_after": accuracy(eval_model, data.test_x, data.test_y),
        "replicas_identical": replicas_identical(train_model), "seconds": round(time.time() - start, 1),
        "max_weight_change": max(float((v - initial[k]).abs().max()) for k, v in train_model.state_dict().items()),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default="1-5")
    parser.add_argument("--ratio", type=float)
    parser.add_argument("--k", type=int)
    parser.add_argument("--selection", default="ats")
    parser.add_argument("--score", default="attn_vnorm")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--limit", type=int, help="use only the first N training images")
    parser.add_argument("--pool", choices=("token", "avg"), default="token",
                        help="the shipped digits ViT with a class token, or the one without (average pool)")
    parser.add_argument("--report", type=Path)
    args = parser.parse_args(argv)
    options = {"stages": args.stages, "selection": args.selection, "score": args.score}
    options.update({"ratio": args.ratio} if args.k is None else {"k": args.k})
    report = run(options, args.epochs, args.limit, pool=args.pool)
    if distributed()[0] == 0:
        text = json.dumps(report, indent=2)
        print(text)
        if args.report:
            args.report.write_text(text + "\n")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
