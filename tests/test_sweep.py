"""Every timm model name matching the issue's patterns converts and matches its reference, or is
refused with ATSUnsupportedModel. The full walk is slow (-m slow); CI runs one model per family."""
import pytest

from ats_fx.testing.sweep import PATTERNS, check

SAMPLE = ["vit_small_patch16_224", "deit_tiny_distilled_patch16_224", "beitv2_base_patch16_224",
          "eva02_small_patch14_224.mim_in22k", "cait_xxs24_224", "xcit_nano_12_p16_224",
          "swin_tiny_patch4_window7_224", "pit_ti_224", "flexivit_small", "vit_relpos_small_patch16_224",
          "vit_relpos_medium_patch16_cls_224",
          "vit_tiny_r_s16_p8_224",  # hybrid: ResNet stem, then ViT
          "vit_pe_core_tiny_patch16_384",  # attention-pooling head
          # no class token: average pool, registers only, SigLIP's attention pooling
          "vit_base_patch16_gap_224", "vit_base_patch16_reg4_gap_256", "vit_base_patch16_siglip_224",
          "vit_so150m_patch16_reg4_map_256"]  # a pooling head whose keys skip the registers


def _names():
    import timm

    return sorted({n for p in PATTERNS for n in timm.list_models(p)})


def _assert_verdict(result):
    if result["verdict"] == "converted":
        assert result["max_abs_diff"] < 1e-9, result
    elif result["verdict"] == "refused":
        assert result["reason"], result  # a reason that names what is missing


@pytest.mark.parametrize("name", SAMPLE)
def test_sample_converts_or_refuses(name):
    _assert_verdict(check(name.split(".")[0]))


def test_sample_verdicts_are_the_expected_ones():
    verdicts = {n: check(n.split(".")[0])["verdict"] for n in SAMPLE}
    for n in ("vit_small_patch16_224", "deit_tiny_distilled_patch16_224", "beitv2_base_patch16_224",
              "eva02_small_patch14_224.mim_in22k", "flexivit_small", "vit_tiny_r_s16_p8_224",
              "vit_relpos_medium_patch16_cls_224", "cait_xxs24_224", "vit_pe_core_tiny_patch16_384",
              "vit_relpos_small_patch16_224", "vit_base_patch16_gap_224", "vit_base_patch16_reg4_gap_256",
              "vit_base_patch16_siglip_224", "vit_so150m_patch16_reg4_map_256"):
        assert verdicts[n] == "converted", (n, verdicts[n])
    for n in ("xcit_nano_12_p16_224", "swin_tiny_patch4_window7_224", "pit_ti_224"):
        assert verdicts[n] == "refused", (n, verdicts[n])


@pytest.mark.slow
@pytest.mark.parametrize("name", _names())
def test_every_timm_name_converts_or_refuses(name):
    _assert_verdict(check(name))
