"""The shipped digits ViT, its training/fine-tuning/curve scripts (tiny settings), on the CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ats_fx
from ats_fx.zoo import DIGITS_CHECKPOINT, DIGITS_GAP_CHECKPOINT, digits_split, digits_vit
from benchmarks import digits_curves, digits_train
from benchmarks.flops import mean_gflops

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data():
    return digits_split()


def test_split_is_fixed_and_stratified(data):
    assert data.train_x.shape == (1437, 1, 32, 32) and data.test_x.shape == (360, 1, 32, 32)
    assert torch.bincount(data.test_y).tolist() == [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]
    again = digits_split()
    assert torch.equal(again.test_x, data.test_x) and torch.equal(again.train_y, data.train_y)


def test_shipped_checkpoint_reaches_97_percent(data):
    assert DIGITS_CHECKPOINT.stat().st_size < 2_000_000
    acc = digits_train.accuracy(digits_vit(pretrained=True), data.test_x, data.test_y)
    assert acc >= 0.97, acc


def test_ats_on_the_shipped_model_is_cheaper_and_stays_accurate(data):
    ats = ats_fx.transform(digits_vit(), "1-5", ratio=1.0)
    acc = digits_train.accuracy(ats, data.test_x, data.test_y)
    gflops, kprime = mean_gflops(ats, data.test_x[:64])
    dense = float(ats_fx.count_flops(digits_vit(), data.test_x[:1])[0])
    assert acc >= 0.95 and gflops < 0.6 * dense
    assert kprime[0] < 64 and all(a >= b for a, b in zip(kprime, kprime[1:]))


def test_shipped_model_without_a_class_token_converts_cheaper_and_accurate(data):
    """The average-pool digits ViT: no class token, so its stages score by the mean query row."""
    assert DIGITS_GAP_CHECKPOINT.stat().st_size < 2_000_000
    dense = digits_vit(pool="avg")
    assert dense.cls_token is None and digits_train.accuracy(dense, data.test_x, data.test_y) >= 0.97
    ats = ats_fx.transform(dense, "1-5", ratio=0.8)
    assert not ats.get_submodule("ats_stage_1").class_token
    acc = digits_train.accuracy(ats, data.test_x, data.test_y)
    gflops, _ = mean_gflops(ats, data.test_x[:32])
    assert acc >= 0.9 and gflops < 0.9 * float(ats_fx.count_flops(dense, data.test_x[:1])[0])  # 94.2% measured


def test_mean_gflops_equals_per_image_flop_counts(data):
    ats = ats_fx.transform(digits_vit(), "1-5", ratio=0.8)
    x = data.test_x[:12]
    gflops, _ = mean_gflops(ats, x)
    assert gflops == pytest.approx(float(ats_fx.count_flops(ats, x).mean()), rel=1e-12)


def test_train_script_writes_a_loadable_checkpoint(tmp_path):
    out, report = tmp_path / "m.safetensors", tmp_path / "r.json"
    digits_train.main(["--epochs", "1", "--out", str(out), "--report", str(report)])
    from safetensors.torch import load_file

    state = load_file(str(out))
    assert set(state) == set(digits_vit(pretrained=False).state_dict())
    r = json.loads(report.read_text())
    assert r["epochs"] == 1 and 0.0 <= r["test_accuracy"] <= 1.0 and r["train_images"] == 1437
    again, _ = digits_train.train(epochs=1, seed=0)  # the same seed gives the same weights
    for name, value in again.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_finetune_runs_under_torchrun_ddp_with_two_processes(tmp_path):
    report = tmp_path / "ft.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "benchmarks.digits_finetune", "--stages", "1-5", "--ratio", "0.6", "--epochs", "1",
           "--limit", "128", "--report", str(report)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(report.read_text())
    assert r["world_size"] == 2 and r["replicas_identical"] is True
    assert r["max_weight_change"] > 0 and r["train_images"] == 128


def test_curves_cover_every_variant_with_and_without_finetuning(tmp_path):
    rows = digits_curves.run(finetune_epochs=1, ratios=[0.6], ks=[16], limit=64)
    variants = {(r["family"], r["variant"], r["finetuned"]) for r in rows}
    assert len(rows) == 2 * (1 + 2 * len(digits_curves.VARIANTS)) == len(variants)
    dense = next(r for r in rows if r["family"] == "dense")
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0
        if r["family"] != "dense":
            assert r["gflops"] < dense["gflops"] and len(r["kprime"]) == (5 if r["family"].startswith("multi") else 1)
    single = {r["variant"]: r for r in rows if r["family"].startswith("single") and not r["finetuned"]}
    assert single["top-K"]["kprime"] == [16.0] and single["random"]["kprime"] == [16.0]
    assert single["ATS"]["kprime"][0] <= 16.0
    path = tmp_path / "curves.png"
    digits_curves.plot(rows, path)
    assert path.stat().st_size > 10_000
    assert "| multi-stage 1-5 | ATS | rho=0.6 | yes |" in digits_curves.markdown(rows)
