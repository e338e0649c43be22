"""Where the time goes in an ATS model with a relative position bias (timm BEiT-B, fp16, GPU).

    python -m benchmarks.profile_bias
"""
from __future__ import annotations

import traceback

import timm
import torch

import ats_fx
from benchmarks.gpu_families import sharpen
from benchmarks.profile_ats import top_kernels


def main() -> None:
    model = sharpen(timm.create_model("beit_base_patch16_224")).cuda().half()
    ats = ats_fx.transform(model, "3-11", ratio=0.87)
    x = torch.randn(64, 3, 224, 224, device="cuda", dtype=torch.float16)
    for m in (model, ats):
        print(type(m).__name__)
        print(top_kernels(m, x, 18, sort="cuda_time_total"))
    try:  # the EVA-02 failure of gpu_families, with its traceback
        eva = sharpen(timm.create_model("eva02_small_patch14_224")).cuda()
        ats = ats_fx.transform(eva, "3-11", ratio=0.87)
        with torch.no_grad():
            ats(torch.randn(2, 3, 224, 224, device="cuda"))
        from ats_fx.testing import eager

        with torch.no_grad():
            eager.eva_forward(eva, torch.randn(3, 224, 224, device="cuda"), {3: {"ratio": 0.87}})
        print("eva ok")
    except Exception:
        traceback.print_exc()


if __name__ == "__main__":
    main()
