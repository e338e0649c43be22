"""What users do with a converted model: copy, save, hook, fine-tune with drop path, odd batches and
option spellings. Each behaves as the user expects or fails with a message that names the fix."""
from __future__ import annotations

import copy
import logging
import pickle

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ats_fx
from ats_fx import ATSConfigError, ATSInputError, ATSUnsupportedModel
from ats_fx.testing import eager as ref
from conftest import timm_model


@pytest.fixture(scope="module")
def tiny():
    return timm_model("deit_tiny_patch16_224", img_size=64, num_classes=10)


X = torch.randn(4, 3, 64, 64)


def test_per_stage_values_pair_with_the_layers_as_written(tiny):
    ats = ats_fx.transform(tiny, stages=[3, 1], k=[5, 9])
    assert {s.layer: s.k for s in ats.ats_options.stages} == {3: 5, 1: 9}
    assert {s.layer: s.k for s in ats_fx.transform(tiny, stages="3,1", k=[5, 9]).ats_options.stages} == {3: 5, 1: 9}
    with pytest.raises(ATSConfigError, match="no order"):
        ats_fx.transform(tiny, stages={3, 1}, k=[5, 9])


def test_deepcopy_keeps_the_checks_and_the_options(tiny):
    ats = ats_fx.transform(tiny, stages="1-3", ratio=0.5)
    twin = copy.deepcopy(ats)
    assert isinstance(twin, ats_fx.ATSGraphModule) and twin.ats_options == ats.ats_options
    torch.testing.assert_close(twin(X), ats(X))
    with pytest.raises(ATSInputError, match="image"):
        twin(torch.full_like(X, float("nan")))
    with pytest.raises(ATSInputError, match="captured for"):
        twin(torch.randn(2, 3, 32, 32))


def test_copy_of_an_eval_capture_warns_in_train_mode(tiny, caplog):
    twin = copy.deepcopy(ats_fx.transform(tiny, stages=1, ratio=0.5))
    with caplog.at_level(logging.WARNING, logger="ats_fx.api"):
        twin.train()
    assert "captured in eval mode" in caplog.text


def test_hooks_are_refused_by_name(tiny):
    model = copy.deepcopy(tiny)
    handle = model.blocks[2].register_forward_hook(lambda m, i, o: o * 2)
    with pytest.raises(ATSUnsupportedModel, match=r"blocks\.2 .*hooks"):
        ats_fx.transform(model, stages=1)
    handle.remove()
    ats_fx.transform(model, stages=1)  # without the hook it converts


def test_pickling_names_save_and_load_round_trips(tiny, tmp_path):
    ats = ats_fx.transform(tiny, stages=[3, 1], k=[5, 9], padding="static")
    with pytest.raises(TypeError, match="ats_fx.save"):
        pickle.dumps(ats)
    with pytest.raises(TypeError, match="ats_fx.save"):
        torch.save(ats, tmp_path / "model.pt")
    with torch.no_grad():  # a fine-tuned weight must survive the round trip
        ats.get_parameter("head.weight").add_(1.0)
    path = tmp_path / "ats.pt"
    ats_fx.save(ats, path)
    back = ats_fx.load(path, tiny)
    assert back.ats_options == ats.ats_options
    torch.testing.assert_close(back(X), ats(X))
    with pytest.raises(ATSConfigError, match="not written by ats_fx.save"):
        torch.save({"a": torch.ones(1)}, tmp_path / "other.pt")
        ats_fx.load(tmp_path / "other.pt", tiny)


@pytest.mark.parametrize("padding", ["auto", "batch_max", "static"])
def test_an_empty_batch_gives_empty_outputs(tiny, padding):
    ats = ats_fx.transform(tiny, stages="1-3", ratio=0.5, padding=padding)
    out = ats(X[:0])
    assert out.shape == tiny(X[:0]).shape == (0, 10)
    assert ats_fx.kept_tokens(ats)[0].kept.shape == (0,)
    torch.testing.assert_close(ats(X[:2]), ats(X)[:2])  # the model is unchanged after it


class _FixedDropPath(TorchDispatchMode):
    """Every ``bernoulli_`` (timm's drop path) fills a fixed pattern: image ``offset + b`` at the c-th
    draw is dropped when (c + offset + b) % 3 == 0. The batched and the per-image runs draw the same."""

    def __init__(self, offset: int = 0):
        super().__init__()
        self.offset, self.calls = offset, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._overloadpacket is torch.ops.aten.bernoulli_:
            t = args[0]
            images = torch.arange(t.shape[0]) + self.offset
            keep = ((self.calls + images) % 3 != 0).to(t.dtype).reshape(t.shape)
            self.calls += 1
            return t.copy_(keep)
        return func(*args, **(kwargs or {}))


def test_fine_tuning_with_drop_path_matches_the_reference_gradients():
    torch.manual_seed(0)
    model = timm_model("deit_tiny_patch16_224", img_size=64, num_classes=10, drop_path_rate=0.2).double().train()
    ats = ats_fx.transform(model, stages="1-3", ratio=0.5, example_inputs=X.double())
    images = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    weights = torch.randn(3, 10, dtype=torch.float64)
    with _FixedDropPath():
        loss = (ats(images) * weights).sum()
    loss.backward()
    stages = {s: {"ratio": 0.5} for s in (1, 2, 3)}
    for i, image in enumerate(images):
        with _FixedDropPath(offset=i):
            (ref.timm_forward(model, image, stages) * weights[i]).sum().backward()
    got = dict(ats.named_parameters())
    compared = 0
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[name].grad, p.grad, msg=name)
            compared += 1
    assert compared > 20
    # The masks really dropped something: without them the loss differs.
    assert not torch.allclose(loss, (ats(images) * weights).sum())
    opt = torch.optim.SGD(ats.parameters(), lr=0.01)  # a few training steps run
    for _ in range(2):
        opt.zero_grad()
        (ats(images) * weights).sum().backward()
        opt.step()


def test_a_nan_image_is_named(tiny):
    ats = ats_fx.transform(tiny, stages=1, ratio=0.5)
    bad = X.clone()
    bad[2, 0, 5, 5] = float("inf")
    with pytest.raises(ATSInputError, match=r"image\(s\) 2 of the batch"):
        ats(bad)


@pytest.mark.parametrize("kw", [dict(ratio=np.float32(0.5)), dict(ratio=torch.tensor(0.5)), dict(k=np.int64(8)),
                                dict(k=torch.tensor(8))])
def test_numpy_and_tensor_scalars_are_accepted(tiny, kw):
    opts = ats_fx.transform(tiny, stages=np.int64(1), **kw).ats_options
    assert opts.layers == (1,) and type(opts.stages[0].ratio or opts.stages[0].k) in (int, float)


@pytest.mark.parametrize("kw, match", [
    (dict(stages=[1, 2], k=[10, None]), r"k=None \(stage 2\)"),
    (dict(stages=1, ratio="0.5"), "give a number"),
    (dict(stages=[3.7]), "3.7 is not a layer index"),
    (dict(stages=[True]), "True is not a layer index"),
    (dict(stages=(s for s in [1, 2.5])), "2.5 is not a layer index"),  # a generator is read once
    (dict(stages=1, k=2.5), "must be an int"),
])
def test_bad_options_are_refused_clearly(tiny, kw, match):
    with pytest.raises(ATSConfigError, match=match):
        ats_fx.transform(tiny, **kw)


def test_wrapped_models_are_refused_with_what_to_do(tiny):
    ats = ats_fx.transform(tiny, stages=1)
    with pytest.raises(ATSConfigError, match="already an ATS model"):
        ats_fx.transform(ats, stages=2)
    with pytest.raises(ATSConfigError, match="_orig_mod"):
        ats_fx.transform(torch.compile(tiny), stages=1)


def test_static_padding_warning_names_each_stages_cause(caplog):
    """The warning once blamed "ratio=1.0, or k >= N - prefix" whatever the cause."""
    model = timm_model("vit_tiny_patch16_224", img_size=64, depth=12)  # 16 patches
    with caplog.at_level(logging.WARNING, logger="ats_fx.api"):
        ats_fx.transform(model, stages="3-11", ratio=0.87, padding="static")
    assert "layer 9: ratio=0.87 of 11 tokens is 10 >= its 10 non-prefix tokens" in caplog.text
    assert "ratio=1.0" not in caplog.text
    caplog.clear()
    small = timm_model("vit_tiny_patch16_224", img_size=48)  # 9 patches: 0.5 x 9 is under the floor of 8
    with caplog.at_level(logging.WARNING, logger="ats_fx.api"):
        ats_fx.transform(small, stages="1-2", ratio=0.5, padding="static")
    assert "layer 2: ratio=0.5 of 9 tokens is 5, under the floor of 8 tokens" in caplog.text
