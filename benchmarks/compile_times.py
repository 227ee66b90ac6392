"""Where a cold compile goes: runs a train_gpt.py as torchrun would, then prints on rank 0 the seconds torch.compile
spent in each of its phases, summed over every compiled function and recompile, largest first; phases nest, so the
rows do not add up. Then the seconds of each compiled frame (a function, or a recompile of one) in the order they
were compiled, and inductor's kernels compiled in this process because its worker processes were not yet up. Run it
with an empty cache (as benchmarks/cold_run.sh does) to see what a user pays on a fresh machine, and with
TORCH_LOGS=recompiles to see why anything compiled twice. Last, the seconds of each Triton or Gluon kernel of ours
compiled in this process, in order, with when it began (seconds from the script's start) and its thread: each
compiles at its first launch (inductor's own go through triton.compile and are not in this list).

Usage: torchrun --standalone --nproc_per_node=N benchmarks/compile_times.py [SCRIPT.py] [--name=value ...]
SCRIPT defaults to this repository's train_gpt.py; another (say an older version from `git show`) is compared so.
"""
import os
import runpy
import sys
import threading
import time
from pathlib import Path

import torch._dynamo.utils

start = time.perf_counter()
kernel_compiles = []  # (began at, seconds, name, thread) of each compile of a @triton.jit or @gluon.jit kernel
try:
    import triton.compiler

    def timed_compile(src, *args, _compile=triton.compiler.compile, **kwargs):
        t0 = time.perf_counter()
        kernel = _compile(src, *args, **kwargs)
        kernel_compiles.append((t0 - start, time.perf_counter() - t0, getattr(src, "name", "?"),
                                threading.current_thread().name))
        return kernel

    triton.compiler.compile = timed_compile  # what a jit kernel's first launch calls (not triton.compile)
except ImportError:
    pass

args = sys.argv[1:]
script = args.pop(0) if args and args[0].endswith(".py") else str(Path(__file__).resolve().parents[1] / "train_gpt.py")
sys.argv = [script, *args]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    if os.environ.get("RANK", "0") == "0":
        metrics = torch._dynamo.utils.compilation_time_metrics
        print("compile phases: seconds, calls, name")
        for name, times in sorted(metrics.items(), key=lambda item: -sum(item[1]))[:30]:
            print(f"{sum(times):9.2f} {len(times):5d}  {name}")
        print("compiled frames, in order: " + ", ".join(f"{t:.1f}" for t in metrics.get("_compile.compile_inner", [])))
        in_process = metrics.get("async_compile.precompile", [])  # inductor compiles here while its workers start
        print(f"inductor's kernels compiled in this process, not its workers: {len(in_process)}, "
              f"{sum(in_process):.2f} s")
        total = sum(seconds for _, seconds, _, _ in kernel_compiles)
        print(f"our Triton kernels compiled in this process: {len(kernel_compiles)}, {total:.2f} s; in order: "
              f"began at, seconds, name, thread")
        for began, seconds, name, thread in kernel_compiles:
            print(f"{began:9.2f} {seconds:9.2f}  {name}  {thread}")
        sys.stdout.flush()
