"""Capture: one graph IR for every library, through torch.export with a dynamic batch.

torch.fx.symbolic_trace fails on HF transformers v5 models; torch.export works on timm,
torchvision and HF alike and lowers nn.MultiheadAttention to scaled_dot_product_attention.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn
from torch.export import Dim, export

from ..errors import ATSUnsupportedModel

log = logging.getLogger(__name__)

EXAMPLE_BATCH = 2  # export specialises sizes 0 and 1, so trace with 2 and mark the dim dynamic


def _image_size(value: Any) -> Optional[tuple[int, int]]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    return None


def infer_input_shape(model: nn.Module) -> tuple[int, ...]:
    """The (C, H, W) a vision model expects ((T, C, H, W) for video), read from timm, HF or
    torchvision attributes."""
    # The built model's own patch embedding first: pretrained_cfg keeps the default size
    # even when the model was created with another img_size.
    patch = getattr(model, "patch_embed", None)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if patch is not None and _image_size(getattr(patch, "img_size", None)):
        if isinstance(cfg, dict) and cfg.get("input_size"):
            chans = cfg["input_size"][0]  # hybrid ViTs: proj sees backbone features, not the image
        else:
            chans = getattr(getattr(patch, "proj", None), "in_channels", 3)
        return (chans, *_image_size(patch.img_size))
    hf = getattr(model, "config", None)
    if hf is not None and _image_size(getattr(hf, "image_size", None)):
        h, w = _image_size(hf.image_size)
        frames = getattr(hf, "num_frames", None)  # video models (ViViT, TimeSformer): (T, C, H, W)
        if isinstance(frames, int):
            return (frames, getattr(hf, "num_channels", 3), h, w)
        return (getattr(hf, "num_channels", 3), h, w)
    for name in ("image_size", "img_size"):
        size = _image_size(getattr(model, name, None))
        if size:
            return (3, *size)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return tuple(cfg["input_size"])
    raise ATSUnsupportedModel(
        f"cannot tell which input {type(model).__name__} expects: pass example_inputs=, e.g. "
        "ats_fx.transform(model, ..., example_inputs=torch.randn(2, 3, 224, 224))"
    )


def example_inputs_for(model: nn.Module, example_inputs: Any = None) -> tuple:
    """Positional example inputs as a tuple, made from the model's attributes if not given."""
    if example_inputs is None:
        param = next(model.parameters(), None)
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        device = param.device if param is not None else torch.device("cpu")
        shape = infer_input_shape(model)
        example_inputs = torch.randn(EXAMPLE_BATCH, *shape, dtype=dtype, device=device)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    return tuple(example_inputs)


def _batch_spec(value: Any):
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return {0: Dim("batch")}
    return None


def capture(model: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    """Export ``model`` (a deep copy: the caller's model is never touched) to an FX graph.

    The batch dimension of every tensor input is dynamic; every other size is fixed by the
    example. Every node carries a FakeTensor ``meta['val']`` and its ``nn_module_stack``.
    """
    model = copy.deepcopy(model)
    batch = example_inputs[0].shape[0] if isinstance(example_inputs[0], torch.Tensor) else None
    if batch is not None and batch < 2:
        example_inputs = tuple(
            x.expand(EXAMPLE_BATCH, *x.shape[1:]).clone() if isinstance(x, torch.Tensor) else x
            for x in example_inputs
        )
    dynamic = tuple(_batch_spec(x) for x in example_inputs)
    try:
        program = export(model, example_inputs, dynamic_shapes=dynamic, strict=False)
    except Exception as err:  # export raises many types; all mean "cannot capture"
        raise ATSUnsupportedModel(
            f"torch.export could not capture {type(model).__name__}: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}. ats_fx needs a model that torch.export "
            "can trace with a dynamic batch dimension."
        ) from err
    gm = program.module()
    # Values computed and never used would read as extra users of the attention weights
    # (nn.MultiheadAttention's averaged weights that HF's pooling head discards). Keep export's guard module.
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or n.op == "call_module")
    gm.recompile()
    log.debug("captured %s: %d nodes", type(model).__name__, len(gm.graph.nodes))
    return gm
