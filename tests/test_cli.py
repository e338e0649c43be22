"""The CLI a newcomer meets first: inspect, demo (visualize: tests/test_visualize.py)."""
from __future__ import annotations

from ats_fx import cli


def test_inspect_lists_sites_and_verdicts(capsys):
    assert cli.main(["inspect", "test_match:inspect_model"]) == 0
    out = capsys.readouterr().out
    assert "blocks.0.attn" in out and "blocks.1.attn" in out
    assert "channels" in out  # the XCiT-like layer is reported, not converted
    assert "prefix tokens: 1" in out and "pooling: token" in out


def test_inspect_refuses_a_cnn(capsys):
    assert cli.main(["inspect", "timm.models:convnext_atto"]) == 0
    assert "no attention" in capsys.readouterr().out


def test_demo_runs_on_the_shipped_digits_model(capsys):
    assert cli.main(["demo", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "digits ViT (shipped weights)" in out and "360 images" in out
    assert "top-1 on the digits test set, dense / ATS" in out and "99.72%" in out
    assert "MFLOPs per image, dense (MACs)" in out and "16.090" in out
    assert "max |Δ| vs eager reference" in out


def test_demo_on_a_timm_model_with_random_weights(capsys):
    assert cli.main(["demo", "--model", "deit_small_patch16_224", "--batch", "2", "--stages", "9-11",
                     "--ratio", "0.87"]) == 0
    out = capsys.readouterr().out
    assert "GFLOPs per image, dense" in out and "4.599" in out and "random weights" in out


def test_load_model_builds_an_hf_class_from_its_default_config():
    model = cli.load_model("transformers:ViTForImageClassification")
    assert type(model).__name__ == "ViTForImageClassification" and not model.training


def tiny_cait():
    import timm

    return timm.create_model("cait_xxs24_224", depth=2, img_size=64).eval()


def test_inspect_cait_shows_class_attention_and_the_late_class_token(capsys):
    assert cli.main(["inspect", "test_cli:tiny_cait"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "talking" in out and "follows" in out and "prefix tokens: 0" in out
    assert "class token joins at blocks_token_only.0" in out


import pytest  # noqa: E402


@pytest.mark.parametrize("argv, words", [
    (["inspect", "not_a_model"], "Unknown model"),
    (["demo", "--model", "not_a_model"], "Unknown model"),
    (["inspect", "no_such_package.module:factory"], "cannot load"),
    (["visualize", "missing.png"], "cannot read image 'missing.png'"),
])
def test_user_mistakes_exit_2_with_one_line(capsys, argv, words):
    assert cli.main(argv) == 2
    out = capsys.readouterr().out
    assert words in out and "Traceback" not in out
