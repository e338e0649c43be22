"""benchmarks/stack_dump.py: each dump names every other thread and shows where it is."""
import io
import threading
import time

from benchmarks.stack_dump import dump_stacks, start_dumping


def _wait_here(event):
    event.wait(5)


def test_dump_names_threads_and_their_frames():
    event = threading.Event()
    worker = threading.Thread(target=_wait_here, args=(event,), name="compile-worker")
    worker.start()
    try:
        out = io.StringIO()
        dump_stacks(out, time.perf_counter())
        text = out.getvalue()
    finally:
        event.set()
        worker.join()
    assert text.startswith("=== ")
    assert "--- thread compile-worker" in text and "_wait_here" in text
    assert "--- thread MainThread" not in text  # the dumping thread (here the caller) leaves itself out


def test_start_dumping_writes_repeatedly(tmp_path):
    path = tmp_path / "stacks.txt"
    start_dumping(str(path), 0.05)
    deadline = time.time() + 5
    while time.time() < deadline and path.read_text().count("=== ") < 2:
        time.sleep(0.05)
    assert path.read_text().count("=== ") >= 2
