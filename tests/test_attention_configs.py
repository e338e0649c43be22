"""benchmarks/attention_configs.py: its switch flipping and its table, on the CPU (the timing needs a GPU)."""
import pytest

from benchmarks.attention_configs import flipped, parse_config, table


def test_flipped_negates_every_named_switch_and_puts_them_back():
    from ats_fx.kernels import attention_rows

    before = (attention_rows.Q_FIRST, attention_rows.ONE_RUN_LOOP)
    with flipped("attention_rows.Q_FIRST+attention_rows.ONE_RUN_LOOP"):
        assert (attention_rows.Q_FIRST, attention_rows.ONE_RUN_LOOP) == (not before[0], not before[1])
    assert (attention_rows.Q_FIRST, attention_rows.ONE_RUN_LOOP) == before
    with pytest.raises(RuntimeError), flipped("attention_rows.Q_FIRST"):
        raise RuntimeError("a failed timing")
    assert attention_rows.Q_FIRST == before[0]  # put back after an error too
    with pytest.raises(AttributeError):
        with flipped("attention_rows.NO_SUCH_SWITCH"):
            pass


def test_table_has_a_column_per_flip_and_one_without_the_mask():
    config = parse_config("64x32w4s3")
    rows = [dict(batch=256, heads=6, tokens=172, rows=150, masked=True, default=config, default_ms=0.0691,
                 best=config, best_ms=0.0691, **{"default, a.X+a.Y flipped": 0.0715, "default, no mask": 0.0663}),
            dict(batch=256, heads=6, tokens=197, rows=172, masked=False, default=config, default_ms=0.0762,
                 best=config, best_ms=0.0762, **{"default, a.X+a.Y flipped": 0.0753})]
    text = table({"env": dict(device="GPU", torch="t", triton="3", date="today"), "graphs": True,
                  "compare": ["a.X+a.Y"], "unmasked": True, "rows": rows})
    header, _, masked, unmasked = text.splitlines()[2:]
    assert header.endswith("| a.X+a.Y flipped us | default without the mask us |")
    assert masked.endswith("| 71.50 | 66.30 |")
    assert unmasked.endswith("| 75.30 | |")  # no mask: nothing to take away
    assert all(line.count("|") == header.count("|") for line in (masked, unmasked))
