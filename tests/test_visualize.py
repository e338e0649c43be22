"""Kept-token masks and K' histograms (ats_fx.visualize, ``ats-fx visualize``)."""
import numpy as np
import pytest
import timm
import torch
from PIL import Image

import ats_fx
from ats_fx import cli
from ats_fx.errors import ATSConfigError
from ats_fx.visualize import (GAP, collect_kprime, draw_kept_tokens, kept_token_masks, overlay,
                              plot_kprime_histogram, render_kept_tokens, to_display)
from ats_fx.zoo import digits_split, digits_vit


@pytest.fixture(scope="module")
def digits():
    return digits_split().test_x[:3]


def test_masks_match_kept_tokens(digits):
    ats = ats_fx.transform(digits_vit(), "1-3", ratio=0.8)
    masks = kept_token_masks(ats, digits)
    assert masks.shape == (3, 3, 8, 8)
    for s, t in enumerate(ats_fx.kept_tokens(ats)):
        assert masks[:, s].flatten(1).sum(1).tolist() == t.kept.tolist()
    # a token dropped at one stage never comes back later
    assert not (masks[:, 1:] & ~masks[:, :-1]).any()


def test_overlay_tints_dropped_patches_only():
    image = torch.full((8, 8, 3), 200, dtype=torch.uint8)
    mask = torch.tensor([[True, False], [False, True]])
    out = overlay(image, mask)
    assert torch.equal(out[:4, :4], image[:4, :4]) and torch.equal(out[4:, 4:], image[4:, 4:])
    assert (out[:4, 4:] != image[:4, 4:]).any(dim=-1).all() and (out[4:, :4] != image[4:, :4]).any(dim=-1).all()


def test_png_has_the_expected_size_and_masked_panels_differ(digits, tmp_path):
    ats = ats_fx.transform(digits_vit(), "1-2", ratio=0.6)
    path = draw_kept_tokens(ats, digits, tmp_path / "kept.png", scale=4)
    img = Image.open(path)
    w = h = 32 * 4
    assert img.size == (3 * (w + GAP) + GAP, GAP * 4 + 3 * (h + GAP) + GAP)
    pixels = torch.tensor(np.asarray(img.convert("RGB")), dtype=torch.int16)
    top = GAP * 4 + GAP
    first = pixels[top:top + h, GAP:GAP + w]
    stage2 = pixels[top:top + h, GAP + 2 * (w + GAP):GAP + 2 * (w + GAP) + w]
    masks = kept_token_masks(ats, digits)[0, 1]
    patch = h // 8
    for (i, j), kept in [((i, j), bool(masks[i, j])) for i in range(8) for j in range(8)]:
        region = (slice(i * patch, (i + 1) * patch), slice(j * patch, (j + 1) * patch))
        same = torch.equal(first[region], stage2[region])
        assert same == kept, (i, j)


def test_render_and_display_on_an_rgb_model(tmp_path):
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=3).eval()
    ats = ats_fx.transform(model, 1, k=8)
    x = torch.randn(2, 3, 64, 64)
    masks = kept_token_masks(ats, x)
    assert masks.shape == (2, 1, 4, 4) and masks.flatten(1).sum(1).tolist() == [8, 8]
    canvas = render_kept_tokens(to_display(x), masks, scale=2)
    assert canvas.size == (2 * (128 + GAP) + GAP, GAP * 4 + 2 * (128 + GAP) + GAP)


def test_histogram_png_and_counts(digits, tmp_path):
    ats = ats_fx.transform(digits_vit(), "1-2", ratio=0.8)
    kprime = collect_kprime(ats, [digits[:2], digits[2:]])
    assert sorted(kprime) == [1, 2] and kprime[1].shape == (3,)
    path = plot_kprime_histogram(kprime, tmp_path / "hist.png", "test")
    assert Image.open(path).size[0] > 300


def test_model_without_stages_is_refused(digits):
    with pytest.raises(ATSConfigError, match="ats_fx.transform"):
        kept_token_masks(digits_vit(), digits)


def test_cli_visualize_on_image_files(tmp_path, capsys):
    files = []
    for i, img in enumerate(digits_split().test_x[:2]):
        arr = ((img[0] * 0.32 + 0.3).clamp(0, 1) * 255).to(torch.uint8)
        path = tmp_path / f"d{i}.png"
        Image.fromarray((255 - arr).numpy()).save(path)  # dark ink on white paper
        files.append(str(path))
    out, hist = tmp_path / "kept.png", tmp_path / "hist.png"
    assert cli.main(["visualize", *files, "--out", str(out), "--hist", str(hist)]) == 0
    assert Image.open(out).size[1] == GAP * 4 + 2 * (128 + GAP) + GAP and hist.exists()
    assert "K' per stage" in capsys.readouterr().out
