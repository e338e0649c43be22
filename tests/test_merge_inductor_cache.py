"""benchmarks/sessions/merge_inductor_cache.py: a carried autotune cache merged into a warm one loses
neither side's GEMM benchmarks (session 20 lost 7 shapes untarring an older copy over a newer one)."""
import json

from benchmarks.sessions.merge_inductor_cache import merge_dicts, merge_tree

SYSTEM = {"device": {"name": "NVIDIA H200"}, "version": {"triton": "3.6.0"}}


def _write(root, name, cache, best_configs):
    (root / "cache").mkdir(parents=True)
    (root / "cache" / name).write_text(json.dumps({"system": SYSTEM, "cache": cache}))
    for rel in best_configs:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel)


def test_merge_dicts_adds_missing_leaves_and_keeps_destination_values():
    dst = {"a": {"x": 1}, "b": 2}
    added = merge_dicts(dst, {"a": {"x": 9, "y": 3}, "b": 7, "c": {"z": 4}})
    assert dst == {"a": {"x": 1, "y": 3}, "b": 2, "c": {"z": 4}}
    assert added == 2  # a.y and the subtree c


def test_merge_tree_keeps_both_sides_choices(tmp_path):
    carried, warm = tmp_path / "carried", tmp_path / "warm"
    # The carried copy is older: it lacks shape "s3", and has "s1" with a stale timing.
    _write(carried, "h", {"mm": {"s1": {"choice": 0.9}, "s2": {"choice": 1.0}}}, ["ab/old.best_config"])
    _write(warm, "h", {"mm": {"s1": {"choice": 0.5}, "s3": {"choice": 2.0}}}, ["cd/new.best_config"])
    copied, added = merge_tree(carried, warm)
    merged = json.loads((warm / "cache" / "h").read_text())
    assert merged["cache"]["mm"] == {"s1": {"choice": 0.5}, "s2": {"choice": 1.0}, "s3": {"choice": 2.0}}
    assert merged["system"] == SYSTEM
    assert (warm / "ab" / "old.best_config").read_text() == "ab/old.best_config"
    assert (warm / "cd" / "new.best_config").exists()
    assert (copied, added) == (1, 1)
    assert merge_tree(carried, warm) == (0, 0)  # idempotent


def test_merge_tree_keeps_a_different_machines_cache_apart(tmp_path):
    carried, warm = tmp_path / "carried", tmp_path / "warm"
    _write(carried, "h", {"mm": {"s2": 1.0}}, [])
    _write(warm, "h", {"mm": {"s1": 0.5}}, [])
    other = json.loads((carried / "cache" / "h").read_text())
    other["system"] = {"device": {"name": "NVIDIA H100"}}
    (carried / "cache" / "h").write_text(json.dumps(other))
    assert merge_tree(carried, warm) == (0, 0)
    assert json.loads((warm / "cache" / "h").read_text())["cache"] == {"mm": {"s1": 0.5}}
