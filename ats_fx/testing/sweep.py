"""Convert-or-refuse sweep over timm model names: every model either converts and
matches a reference, or raises ATSUnsupportedModel with a reason. Used by tests/test_sweep.py."""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn as nn

import ats_fx
from ats_fx.api import analyse
from ats_fx.testing import eager

PATTERNS = ("vit_*", "deit*", "beit*", "eva*", "cait*", "xcit*", "swin*", "pit*", "flexivit*")
# Tried in order: the first that builds gives the tiny model. Families name their sizes differently.
TINY_KWARGS = (
    dict(depth=2, embed_dim=64, num_heads=2, img_size=64, num_classes=5),
    dict(depth=2, embed_dim=64, num_heads=2, img_size=56, num_classes=5),  # patch 14
    dict(depth=2, img_size=64, num_classes=5),
    dict(depth=2, img_size=56, num_classes=5),
    dict(depths=(1, 1), embed_dim=32, num_heads=(2, 2), img_size=64, window_size=4, num_classes=5),
    dict(depth=(1, 1, 1), img_size=64, num_classes=5),
    dict(img_size=64, num_classes=5),
    dict(num_classes=5),
)
MAX_PARAMS = 60_000_000
# Families whose dense features cannot stand in for the reference (the class token attends to the
# kept tokens after the stage): the independent per-image ATS of ats_fx.testing.eager.
PER_IMAGE = {"Cait": eager.cait_forward}


def tiny_model(name: str) -> Optional[nn.Module]:
    """The smallest version of ``name`` timm lets us build (random weights), or None."""
    import timm

    for kwargs in TINY_KWARGS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = timm.create_model(name, pretrained=False, **kwargs)
        except Exception:
            continue
        if sum(p.numel() for p in model.parameters()) > MAX_PARAMS:
            return None
        try:  # some sizes build but do not run (an image size the patch does not divide)
            from ats_fx.passes.capture import infer_input_shape

            with torch.no_grad():
                model.eval()(torch.randn(1, *infer_input_shape(model)))
        except Exception:
            continue
        return model
    return None


def check(name: str) -> dict:
    """Convert ``name`` with one ATS stage (rho = 1) at its last attention layer and compare with
    the dense model's features at the kept positions, pooled by the model's own head; or record
    the ATSUnsupportedModel reason. Any other exception propagates (a bug)."""
    model = tiny_model(name)
    if model is None:
        return {"model": name, "verdict": "skipped", "reason": "no tiny configuration timm accepts"}
    torch.manual_seed(0)
    model = model.double()
    try:
        _, analysis, example = analyse(model)
        n = len(analysis.token_sites)
        if n == 0:  # let transform raise its documented refusal
            ats_fx.transform(model, 0)
        ats = ats_fx.transform(model, n - 1, ratio=1.0)
    except ats_fx.ATSUnsupportedModel as err:
        return {"model": name, "verdict": "refused", "reason": str(err)}
    x = torch.randn(3, *example[0].shape[1:], dtype=torch.float64)
    with torch.no_grad():
        got = ats(x)
        positions = ats_fx.kept_tokens(ats)[-1].positions
        want = []
        for b in range(x.shape[0]):
            if type(model).__name__ in PER_IMAGE:  # the class token joins after the stage
                want.append(PER_IMAGE[type(model).__name__](model, x[b], {n - 1: {"ratio": 1.0}}))
                continue
            feats = model.forward_features(x[b:b + 1])
            rows = positions[b][positions[b] >= 0]
            want.append(model.forward_head(feats[:, rows])[0])
    err = float((got - torch.stack(want)).abs().max())
    return {"model": name, "verdict": "converted", "layers": n, "max_abs_diff": err}
