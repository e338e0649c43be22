"""Every supported model, rewritten by ats_fx, equals an independent per-image ATS (float64)."""
from __future__ import annotations

import pytest
import torch

import ats_fx
from conftest import MODELS, logits

# (stages, options, the same stages for the reference)
OPERATING_POINTS = {
    "multi_stage_rho": (range(1, 4), dict(ratio=0.5)),
    "single_stage_k": (1, dict(k=12)),
    "per_stage_rho": ([0, 2], dict(ratio=[0.7, 0.4])),
}


def reference_stages(stages, opts):
    stages = [stages] if isinstance(stages, int) else list(stages)
    out = {}
    for i, s in enumerate(stages):
        entry = {}
        for key in ("ratio", "k"):
            if key in opts:
                v = opts[key]
                entry[key] = v[i] if isinstance(v, (list, tuple)) else v
        out[s] = entry
    return out


@pytest.mark.parametrize("point", sorted(OPERATING_POINTS))
@pytest.mark.parametrize("padding", ["batch_max", "static"])
def test_matches_independent_reference(model_case, point, padding):
    factory, reference, shape = MODELS[model_case]
    torch.manual_seed(1)
    model = factory().double()
    stages, opts = OPERATING_POINTS[point]
    ats = ats_fx.transform(model, stages, padding=padding, **opts)
    images = torch.randn(5, *shape, dtype=torch.float64)
    got = logits(ats(images))
    ref_stages = reference_stages(stages, opts)
    with torch.no_grad():
        want = torch.stack([reference(model, img, ref_stages) for img in images])
    # HF's eager attention computes its softmax in float32 even in a float64 model.
    tol = dict(atol=1e-5, rtol=1e-4) if model_case == "hf_vit_eager" else {}
    torch.testing.assert_close(got.detach(), want, **tol)
    kept = torch.stack([t.kept for t in ats_fx.kept_tokens(ats)])
    if point == "multi_stage_rho":
        # the test must exercise padding: images keep different numbers of tokens
        assert (kept.max(dim=1).values > kept.min(dim=1).values).any(), kept


def test_state_dict_keys_and_input_not_mutated(model_case):
    factory, _, shape = MODELS[model_case]
    model = factory()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, *shape)
    dense = logits(model(x))
    ats = ats_fx.transform(model, range(1, 4), ratio=0.6)
    assert list(ats.state_dict()) == list(model.state_dict()) or sorted(ats.state_dict()) == sorted(model.state_dict())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    torch.testing.assert_close(logits(model(x)), dense)
    # the copy is independent: loading a checkpoint into it leaves the original alone
    ats.load_state_dict({k: torch.zeros_like(v) for k, v in model.state_dict().items()})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_rho_one_at_last_layer_traces_budget(model_case):
    """rho = 1 at the last layer: K = N_in - p (all scored tokens), K' <= K, outputs finite."""
    factory, _, shape = MODELS[model_case]
    model = factory()
    ats = ats_fx.transform(model, 3, ratio=1.0)
    x = torch.randn(3, *shape)
    assert torch.isfinite(logits(ats(x))).all()
    trace = ats_fx.kept_tokens(ats)[0]
    assert trace.layer == 3
    prefix = {"timm_deit_distilled": 2, "hf_deit_teacher": 2, "timm_vit_registers": 5,
              "hf_dinov2_registers": 5, "timm_cait": 0, "timm_cait_unfused": 0, "timm_vit_gap": 0,
              "timm_vit_no_class_token": 0, "timm_siglip_map": 0, "timm_relpos_gap": 0, "hf_siglip_pooled": 0,
              "timm_vit_registers_gap": 4, "timm_rope_registers_gap": 1}.get(model_case, 1)
    assert (trace.budget == trace.tokens_in - prefix).all()
    assert ((trace.kept >= 1) & (trace.kept <= trace.budget)).all()


@pytest.mark.parametrize("model_case", ["torchvision_vit", "timm_deit_small", "hf_vit_sdpa"])
def test_views_after_a_stage_do_not_rely_on_the_captured_strides(model_case):
    """A captured ``view`` was valid for the strides the original attention produced; the ATS
    attention lays its rows out differently. On torch 2.11, export drops torchvision MHA's
    ``.contiguous()`` before ``.view(B*T, E)`` (SDPA's output already had that layout), and the
    rewritten model failed shape propagation. Every view fed by a stage is now a reshape (a view
    when the strides allow, a copy otherwise)."""
    factory, _, chw = MODELS[model_case]
    ats = ats_fx.transform(factory(), "1-3", ratio=0.6)
    graph = ats.graph
    fed = set()
    for node in graph.nodes:  # topological order: a node is fed by a stage if any input is
        if node.op == "call_module" and node.target.startswith("ats_stage_"):
            fed.add(node)
        elif any(a in fed for a in node.all_input_nodes):
            fed.add(node)
    assert len(fed) > 10
    views = [n for n in fed if n.op == "call_function" and n.target is torch.ops.aten.view.default]
    assert not views, views
    x = torch.randn(2, *chw)
    assert logits(ats(x)).shape[0] == 2
