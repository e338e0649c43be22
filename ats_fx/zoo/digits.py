"""A small ViT trained on scikit-learn's handwritten digits, shipped as the demo's default model.

The data are real scans that a PyPI package ships offline: ``sklearn.datasets.load_digits``
(1,797 labelled 8x8 images, 16 grey levels), upsampled to 32x32. The split is fixed: stratified
80/20 with ``random_state=0`` (1,437 train / 360 test). The model is timm's own
``VisionTransformer`` (class token, patch 4 -> 8x8 = 64 patch tokens + CLS, 6 blocks, width 64),
so ATS sees the same graph as any timm ViT. ``pool="avg"`` is the same network without a class
token, averaging its 64 patch tokens (``class_token=False, global_pool="avg"``): its stages score
tokens by the mean query row. ``benchmarks/digits_train.py`` reproduces both checkpoints from a
seed on the CPU.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

DIGITS_CHECKPOINT = Path(__file__).with_name("digits_vit.safetensors")
DIGITS_GAP_CHECKPOINT = Path(__file__).with_name("digits_vit_gap.safetensors")
IMAGE_SIZE = 32
# Mean and std of the upsampled training images (fixed so preprocessing needs no data pass).
MEAN, STD = 0.3, 0.32
CONFIG = dict(img_size=IMAGE_SIZE, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=6,
              num_heads=4, mlp_ratio=2.0)
POOLS = {  # pool -> (timm arguments beyond CONFIG, checkpoint)
    "token": ({}, DIGITS_CHECKPOINT),
    "avg": ({"class_token": False, "global_pool": "avg"}, DIGITS_GAP_CHECKPOINT),
}


class DigitsSplit(NamedTuple):
    train_x: torch.Tensor  # (1437, 1, 32, 32) float32, normalised
    train_y: torch.Tensor  # (1437,) int64
    test_x: torch.Tensor  # (360, 1, 32, 32)
    test_y: torch.Tensor  # (360,)


def preprocess_digits(images: torch.Tensor) -> torch.Tensor:
    """Raw digits (N, 8, 8) or (N, 64) with grey levels 0..16 -> normalised (N, 1, 32, 32)."""
    x = torch.as_tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=IMAGE_SIZE, mode="bilinear", align_corners=False)
    return (x - MEAN) / STD


def digits_split() -> DigitsSplit:
    """The fixed train/test split of scikit-learn's digits (needs ``scikit-learn``)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data come from scikit-learn: pip install scikit-learn "
                          "(or pip install 'ats_fx[models]')") from err
    data = load_digits()
    tr_x, te_x, tr_y, te_y = train_test_split(
        data.images, data.target, test_size=0.2, random_state=0, stratify=data.target
    )
    return DigitsSplit(preprocess_digits(tr_x), torch.as_tensor(tr_y, dtype=torch.int64),
                       preprocess_digits(te_x), torch.as_tensor(te_y, dtype=torch.int64))


def digits_vit(pretrained: bool = True, pool: str = "token") -> nn.Module:
    """timm ``VisionTransformer`` for 32x32 digits, in eval mode. ``pool="token"`` reads the class
    token; ``pool="avg"`` has no class token and averages the patch tokens. ``pretrained`` loads the
    checkpoint shipped in this package (``DIGITS_CHECKPOINT`` or ``DIGITS_GAP_CHECKPOINT``)."""
    from timm.models.vision_transformer import VisionTransformer

    if pool not in POOLS:
        raise ValueError(f"pool={pool!r}: choose one of {sorted(POOLS)}")
    extra, checkpoint = POOLS[pool]
    model = VisionTransformer(**CONFIG, **extra)
    if pretrained:
        from safetensors.torch import load_file

        if not checkpoint.exists():
            raise FileNotFoundError(f"{checkpoint} is missing: run python -m benchmarks.digits_train --pool {pool}")
        model.load_state_dict(load_file(str(checkpoint)))
    return model.eval()
