"""Run a benchmark module with periodic Python stack dumps (where does a long compile spend its time?).

    python -m benchmarks.stack_dump OUT_FILE SECONDS benchmarks.compiled --models ...
"""
import faulthandler
import runpy
import sys

if __name__ == "__main__":
    out, every, module = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    faulthandler.dump_traceback_later(every, repeat=True, file=open(out, "w"))
    sys.argv = [module, *sys.argv[4:]]
    runpy.run_module(module, run_name="__main__")
