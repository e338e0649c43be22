"""ats_fx: Adaptive Token Sampling (ECCV 2022) as a compiler pass for pretrained vision transformers.

    model = ats_fx.transform(model, stages=range(3, 12), ratio=0.87)
    logits = model(images)                  # fewer tokens after stage 3
    ats_fx.kept_tokens(model)               # per stage: kept positions, K' per image
    ats_fx.count_flops(model, images)       # per-image GFLOPs
"""
from .api import ATSGraphModule, count_flops, kept_tokens, load, save, transform
from .errors import ATSConfigError, ATSError, ATSInputError, ATSUnsupportedModel
from .ops import KeptTokens, StageTrace
from .compile import register as _register_backend

_register_backend()  # backend="ats" for torch.compile, also without the pip entry point

__all__ = [
    "transform", "kept_tokens", "count_flops", "save", "load", "ATSGraphModule", "StageTrace", "KeptTokens",
    "ATSError", "ATSConfigError", "ATSInputError", "ATSUnsupportedModel",
]
__version__ = "0.1.0"
