"""Tiny, random-weight versions of the models ats_fx must convert (no weights exist offline)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU the Triton kernels run in Triton's CPU interpreter. It is chosen when a kernel is
# decorated, so it must be set before anything imports ats_fx.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ats_fx.testing import eager as ref  # noqa: E402

# Under pytest-xdist each worker takes its share of the cores: torch's default of one thread per
# core in every worker oversubscribes them (the digits curves test: 293 s that way, 114 s with one
# thread per worker, on 2 cores).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(autouse=True)
def scalar_inductor(request):
    """Inductor's C++ backend compiles scalar loops here, except in tests marked ``vectorized``.

    Vectorizing (choosing tilings, compiling at::vec templates) is a fifth of a cold CPU compile: a
    4-layer DeiT compiled at two batch sizes took 103 s with it and 81 s without, on 2 cores. The
    tests check the graphs ats_fx hands Inductor, not Inductor's vectorizer; the ``vectorized``
    tests keep Inductor's default so that path stays covered."""
    import torch._inductor.config as inductor

    simdlen = None if request.node.get_closest_marker("vectorized") else 1
    with inductor.patch({"cpp.simdlen": simdlen}):
        yield


SMALL = dict(depth=4, embed_dim=64, num_heads=4)


def sharpen(model: torch.nn.Module, std: float = 0.15, seed: int = 0) -> torch.nn.Module:
    """Random init with larger weights: peaky attention, so K' differs between images.

    (Default ViT init makes attention nearly uniform, and then every image keeps K' = K,
    which would leave padding untested.)"""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 or "token" in name or "pos" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def timm_model(name: str, **kw):
    import timm

    args = dict(SMALL)
    args.update(kw)
    return sharpen(timm.create_model(name, pretrained=False, **args)).eval()


def timm_unfused(name: str, **kw):
    import timm.layers.config as cfg

    before = cfg.use_fused_attn()
    cfg.set_fused_attn(False)
    try:
        return timm_model(name, **kw)
    finally:
        cfg.set_fused_attn(before)


def hf_vit(attn: str):
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                    image_size=64, patch_size=8, num_labels=10, attn_implementation=attn)
    return sharpen(ViTForImageClassification(cfg)).eval()


def hf_deit_teacher():
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    cfg = DeiTConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                     image_size=64, patch_size=8, num_labels=10)
    return sharpen(DeiTForImageClassificationWithTeacher(cfg)).eval()


def hf_beit(shared: bool = False):
    from transformers import BeitConfig, BeitForImageClassification

    cfg = BeitConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                     image_size=64, patch_size=8, num_labels=10, use_relative_position_bias=not shared,
                     use_shared_relative_position_bias=shared, layer_scale_init_value=0.5)
    return sharpen(BeitForImageClassification(cfg)).eval()


def hf_dinov2(registers: int = 0):
    import transformers as T

    if registers:
        cfg = T.Dinov2WithRegistersConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=64,
                                          patch_size=8, num_labels=10, num_register_tokens=registers)
        return sharpen(T.Dinov2WithRegistersForImageClassification(cfg)).eval()
    cfg = T.Dinov2Config(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=64, patch_size=8,
                         num_labels=10)
    return sharpen(T.Dinov2ForImageClassification(cfg)).eval()


class Pooled(torch.nn.Module):
    """A model that returns its token sequence, wrapped to return the pooled output."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config  # tells ats_fx the input size

    def forward(self, x):
        return self.model(x).pooler_output


def hf_clip():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                           image_size=64, patch_size=8)
    return sharpen(CLIPVisionModel(cfg)).eval()


def hf_siglip():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    cfg = SiglipVisionConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                             image_size=64, patch_size=8)
    return sharpen(SiglipVisionModel(cfg)).eval()


def hf_vivit():
    from transformers import VivitConfig, VivitForVideoClassification

    cfg = VivitConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                      image_size=32, num_frames=4, tubelet_size=[2, 8, 8], num_labels=10)
    return sharpen(VivitForVideoClassification(cfg)).eval()


def torchvision_vit():
    import torchvision

    m = torchvision.models.VisionTransformer(image_size=64, patch_size=8, num_layers=4, num_heads=4,
                                             hidden_dim=64, mlp_dim=128)
    return sharpen(m).eval()


# name -> (factory, independent reference forward, input (C, H, W))
MODELS = {
    "timm_vit_tiny": (lambda: timm_model("vit_tiny_patch16_224", img_size=64), ref.timm_forward, (3, 64, 64)),
    "timm_vit_tiny_unfused": (lambda: timm_unfused("vit_tiny_patch16_224", img_size=64), ref.timm_forward, (3, 64, 64)),
    "timm_deit_small": (lambda: timm_model("deit_small_patch16_224", img_size=64), ref.timm_forward, (3, 64, 64)),
    "timm_deit_distilled": (lambda: timm_model("deit_base_distilled_patch16_224", img_size=64), ref.timm_forward, (3, 64, 64)),
    "timm_deit3_layerscale": (lambda: timm_model("deit3_small_patch16_224", img_size=64), ref.timm_forward, (3, 64, 64)),
    "timm_vit_avgpool": (lambda: timm_model("vit_small_patch16_224", img_size=64, global_pool="avg"), ref.timm_forward, (3, 64, 64)),
    "timm_vit_registers": (lambda: timm_model("vit_base_patch16_reg4_gap_256", img_size=64, class_token=True), ref.timm_forward, (3, 64, 64)),
    # no class token: average pool, registers only, attention pooling (SigLIP's MAP head)
    "timm_vit_gap": (lambda: timm_model("vit_base_patch16_gap_224", img_size=64), ref.timm_forward, (3, 64, 64)),
    "timm_vit_no_class_token": (lambda: timm_model("vit_small_patch16_224", img_size=64, class_token=False,
                                                   global_pool="avg"), ref.timm_forward, (3, 64, 64)),
    "timm_vit_registers_gap": (lambda: timm_model("vit_base_patch16_reg4_gap_256", img_size=64), ref.timm_forward,
                               (3, 64, 64)),
    "timm_siglip_map": (lambda: timm_model("vit_base_patch16_siglip_224", img_size=64), ref.timm_forward, (3, 64, 64)),
    "timm_relpos_gap": (lambda: timm_model("vit_relpos_base_patch16_224", img_size=64), ref.timm_relpos_forward,
                        (3, 64, 64)),
    "timm_rope_registers_gap": (lambda: timm_model("vit_base_patch16_rope_reg1_gap_256", img_size=64),
                                ref.eva_forward, (3, 64, 64)),
    "timm_flexivit": (lambda: timm_model("flexivit_small", img_size=64, patch_size=16), ref.timm_forward, (3, 64, 64)),
    # position-dependent attention: relative position bias (BEiT) and rotary embeddings (EVA-02)
    "timm_beit": (lambda: timm_model("beit_base_patch16_224", img_size=64), ref.beit_forward, (3, 64, 64)),
    "timm_beit_unfused": (lambda: timm_unfused("beit_base_patch16_224", img_size=64), ref.beit_forward, (3, 64, 64)),
    "timm_beitv2": (lambda: timm_model("beitv2_base_patch16_224", img_size=64), ref.beit_forward, (3, 64, 64)),
    "timm_eva02": (lambda: timm_model("eva02_tiny_patch14_224", img_size=56), ref.eva_forward, (3, 56, 56)),
    "timm_eva02_unfused": (lambda: timm_unfused("eva02_tiny_patch14_224", img_size=56), ref.eva_forward, (3, 56, 56)),
    # no class token until the class-attention blocks; talking heads (CaiT)
    "timm_cait": (lambda: timm_model("cait_xxs24_224", img_size=64), ref.cait_forward, (3, 64, 64)),
    "timm_cait_unfused": (lambda: timm_unfused("cait_xxs24_224", img_size=64), ref.cait_forward, (3, 64, 64)),
    "hf_vit_eager": (lambda: hf_vit("eager"), ref.hf_vit_forward, (3, 64, 64)),
    "hf_vit_sdpa": (lambda: hf_vit("sdpa"), ref.hf_vit_forward, (3, 64, 64)),
    "hf_deit_teacher": (hf_deit_teacher, ref.hf_deit_teacher_forward, (3, 64, 64)),
    "torchvision_vit": (torchvision_vit, ref.torchvision_forward, (3, 64, 64)),
    "hf_beit": (hf_beit, ref.hf_beit_forward, (3, 64, 64)),
    "hf_beit_shared_bias": (lambda: hf_beit(shared=True), ref.hf_beit_forward, (3, 64, 64)),
    "hf_dinov2": (hf_dinov2, ref.hf_dinov2_forward, (3, 64, 64)),
    "hf_dinov2_registers": (lambda: hf_dinov2(registers=4), ref.hf_dinov2_forward, (3, 64, 64)),
    "hf_clip_pooled": (lambda: Pooled(hf_clip()), lambda m, x, s: ref.hf_clip_pooled_forward(m.model, x, s), (3, 64, 64)),
    "hf_siglip_pooled": (lambda: Pooled(hf_siglip()), lambda m, x, s: ref.hf_siglip_pooled_forward(m.model, x, s),
                         (3, 64, 64)),
    "hf_vivit": (hf_vivit, ref.hf_vivit_forward, (4, 3, 32, 32)),
}


@pytest.fixture
def overlap_mode(monkeypatch):
    """Set ``ats_fx.dispatch.OVERLAP`` for one test ("on" runs the overlapped stage on the CPU too)."""
    from ats_fx import dispatch

    def set_mode(mode: str):
        monkeypatch.setattr(dispatch, "OVERLAP", mode)

    return set_mode


@pytest.fixture(params=sorted(MODELS))
def model_case(request):
    return request.param


def logits(out):
    return out.logits if hasattr(out, "logits") else out
