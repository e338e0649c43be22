"""The ImageNet harness on a tiny generated ImageFolder (random-init model, no downloads)."""
import json

import pytest
import torch
from PIL import Image

from benchmarks import imagenet_eval

MODEL = "deit_tiny_patch16_224"


def _images(root, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(n):
        arr = (torch.rand(48, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
        path = root / f"ILSVRC2012_val_{i:08d}.JPEG"
        Image.fromarray(arr).save(path, format="JPEG")
        paths.append(path)
    return paths


def test_imagefolder_dense_and_paper_configs(tmp_path):
    for c, wnid in enumerate(["n01440764", "n01443537"]):
        (tmp_path / "val" / wnid).mkdir(parents=True)
        _images(tmp_path / "val" / wnid, 2, seed=c)
    out = tmp_path / "r.json"
    rc = imagenet_eval.main(["--model", MODEL, "--data", str(tmp_path / "val"), "--no-pretrained",
                             "--batch-size", "3", "--workers", "0", "--flops-images", "3", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    rows = {r["config"]: r for r in report["results"]}
    assert list(rows) == imagenet_eval.DEFAULT_CONFIGS
    assert all(r["images"] == 4 and 0 <= r["top1"] <= r["top5"] <= 100 for r in rows.values())
    assert rows["dense"]["gflops"] == pytest.approx(1.26, abs=0.02)  # DeiT-Ti: 1.3 GFLOPs
    assert rows["3:k=108"]["gflops"] < rows["dense"]["gflops"] and rows["3:k=108"]["flops_images"] == 3
    assert len(rows["3-11:rho=1.0"]["kprime"]) == 9 and rows["3:k=108"]["kprime"][0] <= 108
    assert report["meta"]["pretrained"] is False


def test_flat_folder_with_a_ground_truth_file(tmp_path):
    _images(tmp_path, 3)
    (tmp_path / "labels.txt").write_text("0\n5\n7\n")
    out = tmp_path / "r.json"
    assert imagenet_eval.main(["--model", MODEL, "--data", str(tmp_path), "--labels", str(tmp_path / "labels.txt"),
                               "--no-pretrained", "--config", "3-11:rho=0.87", "--workers", "0",
                               "--flops-images", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["config"] for r in rows] == ["3-11:rho=0.87"] and rows[0]["images"] == 3
    ds = imagenet_eval.FlatFolder(tmp_path, tmp_path / "labels.txt", lambda im: im.size)
    assert [label for _, label in ds.items] == [0, 5, 7]


def test_bad_inputs_say_what_to_do(tmp_path):
    _images(tmp_path, 2)
    with pytest.raises(SystemExit, match="--labels"):
        imagenet_eval.make_dataset(tmp_path, None, None)
    (tmp_path / "labels.txt").write_text("1\n")
    with pytest.raises(SystemExit, match="1 labels for 2 images"):
        imagenet_eval.FlatFolder(tmp_path, tmp_path / "labels.txt", None)
    with pytest.raises(SystemExit, match="STAGES:rho=R"):
        imagenet_eval.parse_config("3-11:0.87")
