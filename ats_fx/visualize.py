"""Draw what ATS kept: per-stage token masks over the input (paper Fig. 2/A.5), and the K'
histogram per stage over a dataset (Fig. 6). Pillow draws the masks; matplotlib the histogram."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
import torch.nn as nn

from .api import kept_tokens
from .errors import ATSConfigError
from .ops import ATSStage

GAP = 4  # pixels between panels
# A dropped patch is blended towards a blue tint, visible on dark backgrounds as well as light ones.
TINT, TINT_SHARE = torch.tensor([30.0, 70.0, 160.0]), 0.65


def _grid(patches: int, height: int, width: int) -> tuple[int, int]:
    gh = max(round(math.sqrt(patches * height / width)), 1)
    if patches % gh:
        raise ATSConfigError(f"{patches} patch tokens do not tile a {height}x{width} image in a grid; "
                             "kept-token masks need a rectangular patch grid")
    return gh, patches // gh


def kept_token_masks(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Run ``model`` (made by ``ats_fx.transform``) on ``images`` (B, C, H, W) and return
    (B, stages, grid_h, grid_w) bool: which patches are still computed after each stage."""
    stages = sorted((m for m in model.modules() if isinstance(m, ATSStage)), key=lambda m: m.layer)
    if not stages:
        raise ATSConfigError("this model has no ATS stages: make it with ats_fx.transform first")
    with torch.no_grad():
        model(images)
    trace = kept_tokens(model)
    prefix = stages[0].num_prefix
    patches = trace[0].width_in - prefix  # the first stage sees every token
    gh, gw = _grid(patches, images.shape[-2], images.shape[-1])
    masks = torch.zeros(images.shape[0], len(trace), patches, dtype=torch.bool)
    for s, t in enumerate(trace):
        pos = t.positions.cpu()
        for b in range(pos.shape[0]):
            real = pos[b][pos[b] >= prefix] - prefix
            masks[b, s, real] = True
    return masks.reshape(images.shape[0], len(trace), gh, gw)


def to_display(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) model inputs -> (B, H, W, 3) uint8, each image min-max scaled."""
    x = images.detach().float().cpu()
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    x = ((x - lo) / (hi - lo).clamp_min(1e-12) * 255).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x[:, :3].permute(0, 2, 3, 1).contiguous()


def overlay(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(H, W, 3) uint8 image with the patches where ``mask`` (gh, gw) is False tinted."""
    H, W, _ = image.shape
    keep = mask[:, None, :, None].expand(-1, H // mask.shape[0], -1, W // mask.shape[1])
    keep = keep.reshape(H - H % mask.shape[0], W - W % mask.shape[1])
    keep = torch.nn.functional.pad(keep, (0, W - keep.shape[1], 0, H - keep.shape[0]), value=True)
    tinted = (image.float() * (1 - TINT_SHARE) + TINT * TINT_SHARE).round().to(torch.uint8)
    return torch.where(keep[..., None], image, tinted)


def render_kept_tokens(display: torch.Tensor, masks: torch.Tensor, scale: int = 1,
                       labels: Optional[list[str]] = None):
    """A PIL image: one row per image, the input then one panel per stage with dropped patches
    tinted. ``display`` (B, H, W, 3) uint8; ``masks`` (B, stages, gh, gw). Each panel is
    (H*scale, W*scale); panels are GAP pixels apart, with a GAP*4 pixel label strip on top."""
    from PIL import Image, ImageDraw

    B, H, W, _ = display.shape
    S = masks.shape[1]
    h, w, top = H * scale, W * scale, GAP * 4
    canvas = Image.new("RGB", ((S + 1) * (w + GAP) + GAP, top + B * (h + GAP) + GAP), "white")
    draw = ImageDraw.Draw(canvas)
    labels = labels or ["input"] + [f"stage {s}" for s in range(S)]
    for col, text in enumerate(labels[: S + 1]):
        draw.text((GAP + col * (w + GAP), 2), text, fill="black")
    for b in range(B):
        panels = [display[b]] + [overlay(display[b], masks[b, s]) for s in range(S)]
        for col, panel in enumerate(panels):
            tile = Image.fromarray(panel.numpy()).resize((w, h), Image.NEAREST)
            canvas.paste(tile, (GAP + col * (w + GAP), top + GAP + b * (h + GAP)))
    return canvas


def draw_kept_tokens(model: nn.Module, images: torch.Tensor, path: Union[str, Path], *,
                     display: Optional[torch.Tensor] = None, scale: Optional[int] = None) -> Path:
    """Save a PNG of the tokens each ATS stage keeps for each image of ``images``.

    ``display`` (B, H, W, 3) uint8 is what to draw (default: the inputs, min-max scaled);
    ``scale`` enlarges small images (default: to about 128 px).
    """
    masks = kept_token_masks(model, images)
    display = to_display(images) if display is None else display
    scale = scale or max(1, 128 // max(display.shape[1], display.shape[2]))
    layers = [m.layer for m in sorted((m for m in model.modules() if isinstance(m, ATSStage)), key=lambda m: m.layer)]
    labels = ["input"] + [f"after layer {layer}" for layer in layers]
    path = Path(path)
    render_kept_tokens(display, masks, scale, labels).save(path)
    return path


def collect_kprime(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[int, torch.Tensor]:
    """K' of every image at every stage over ``batches``: {layer: (images,) int64}."""
    out: dict[int, list[torch.Tensor]] = {}
    for x in batches:
        with torch.no_grad():
            model(x)
        for t in kept_tokens(model):
            out.setdefault(t.layer, []).append(t.kept.cpu())
    return {layer: torch.cat(v) for layer, v in out.items()}


def plot_kprime_histogram(kprime: dict[int, torch.Tensor], path: Union[str, Path], title: str = "") -> Path:
    """Save a PNG with one histogram of K' per stage (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the K' histogram needs matplotlib: pip install matplotlib") from err
    layers = sorted(kprime)
    fig, axes = plt.subplots(1, len(layers), figsize=(2.6 * len(layers), 2.6), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        k = kprime[layer].numpy()
        ax.hist(k, bins=range(int(k.min()), int(k.max()) + 2), color="C3", align="left")
        ax.set_title(f"layer {layer}: mean {k.mean():.1f}", fontsize=9)
        ax.set_xlabel("K' (sampled tokens)", fontsize=8)
    axes[0][0].set_ylabel("images")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
