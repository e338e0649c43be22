"""Run a benchmark module with periodic Python stack dumps (where does a long compile spend its time?).

    python -m benchmarks.stack_dump OUT_FILE SECONDS benchmarks.compiled --models ...

A daemon thread writes every thread's stack (``sys._current_frames``) each SECONDS, with the thread's
name. It holds the GIL while it reads them. The first version used ``faulthandler.dump_traceback_later``,
which reads other threads' frames without the GIL. In session 20 it crashed the process (a segmentation
fault) 6 s in, while torch was importing. A thread busy in C code that holds the GIL delays the next dump
instead; the dump's time stamp shows that.
"""
from __future__ import annotations

import runpy
import sys
import threading
import time
import traceback
from typing import TextIO


def dump_stacks(out: TextIO, start: float) -> None:
    """Write one dump of every thread but this one's, stamped with the seconds since ``start``."""
    names = {t.ident: t.name for t in threading.enumerate()}
    me = threading.get_ident()
    out.write(f"=== {time.perf_counter() - start:.1f} s\n")
    for ident, frame in sys._current_frames().items():
        if ident == me:
            continue
        out.write(f"--- thread {names.get(ident, '?')} ({ident})\n")
        out.write("".join(traceback.format_stack(frame)))
    out.flush()


def start_dumping(path: str, every: float) -> threading.Thread:
    """Start the daemon thread that dumps every ``every`` seconds into ``path``."""
    out = open(path, "w")
    start = time.perf_counter()

    def loop() -> None:
        while True:
            time.sleep(every)
            dump_stacks(out, start)

    thread = threading.Thread(target=loop, name="stack_dump", daemon=True)
    thread.start()
    return thread


if __name__ == "__main__":
    path, every, module = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    start_dumping(path, every)
    sys.argv = [module, *sys.argv[4:]]
    runpy.run_module(module, run_name="__main__")
