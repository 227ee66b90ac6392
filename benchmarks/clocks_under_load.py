"""At what clock and power train_gpt.py's matmuls and attention kernels run when they run for seconds, as in
training, and the energy a call takes.

A GPU at its power limit lowers its clock until it draws no more: then a kernel's time follows the energy its
work takes, not only its cycles, and work that a warp-specialised kernel would hide behind the tensor cores still
costs time. Each case runs back to back for --seconds while `nvidia-smi` samples the SM clock, the power draw and
whether the software power cap holds the clock; per case: ms a call, the cycles a call at the mean clock (ms x
MHz), the energy a call at the mean power (ms x W = mJ), the mean clock and power over the run (its first 0.5 s
and last 0.2 s left out), and the share of samples under the power cap. "idle" is a pause between rounds.

The cases, at a 1-GPU sequence's shapes (64K tokens): the MLP's forward and backward, the qkv matmul with its
prep and the FP8 logits of a chunk, each by cuBLAS and by train_gpt's op; the MLP's ping-pong loop with a plain
bf16 store, and with 16 multiply or 4 square-root passes before it (gluon_matmul_diag.py's --busy); one attention
layer's forward and backward (the gradients of q, k and v) at the longest long window, 14 blocks, with
window_attention_bench.py's documents. --train_gpt=FILE times another version's ops (e.g. from
`git show REV:train_gpt.py > FILE`); a case that fails says so and the others go on.

With --trace=FILE, instead: a summary of the samples that `SMI_LOG=FILE benchmarks/cold_run.sh ...` wrote during
a training run, per GPU: of the samples above 300 W (the GPU at work, not compiling or waiting), the share under
the power cap, the clock's 10th, 50th and 90th percentiles and the mean power.

    python3 benchmarks/clocks_under_load.py [--seconds=3] [--rounds=2] [--only=attention] [--train_gpt=FILE]
    python3 benchmarks/clocks_under_load.py --trace=FILE
"""
import datetime
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

QUERY = "timestamp,clocks.sm,power.draw,power.limit,temperature.gpu,clocks_event_reasons.sw_power_cap"


def cases(gd) -> list[tuple[str, object]]:
    """-> (name, a call) for each case, with gluon_matmul_diag gd (and its train_gpt, gd.tg): its ops' cuBLAS and
    train_gpt calls, and the MLP's ping-pong loop with a bf16 store (forward: also after extra passes)."""
    calls = []
    for name, a, b, w_kn, _, _, tile, cublas, op, _ in gd.op_cases():
        calls += [(f"{name}, cuBLAS", cublas), (f"{name}, train_gpt's op", op)]
        if name.startswith("MLP"):
            calls.append((f"{name}, bf16 store", lambda a=a, b=b, w_kn=w_kn, tile=tile:
                          gd.diag_matmul(a, b, gd.BF16_STORE, w_kn, False, tile)))
        if name == "MLP forward":
            for n, kind in ((16, 0), (4, 1)):
                def busy(a=a, b=b, tile=tile, n=n, kind=kind):
                    return gd.diag_matmul(a, b, gd.BF16_STORE, False, False, tile, n, kind)
                calls.append((f"{name}, store after {n} {gd.BUSY_OPS[kind]}", busy))
    return calls + attention_cases(gd.tg)


def attention_cases(tg) -> list[tuple[str, object]]:
    import window_attention_bench as wab
    mask = tg.document_windows(wab.documents(wab.T), torch.tensor(14, dtype=torch.int32, device="cuda"))[0]
    q, k, v, grad_out = (torch.randn(1, wab.T, wab.H, wab.HEAD_DIM, device="cuda").bfloat16() for _ in range(4))
    out, lse = tg.window_attention(q, k, v, mask.starts, mask.window_blocks)
    return [("attention forward, window 14", lambda: tg.window_attention(q, k, v, mask.starts, mask.window_blocks)),
            ("attention backward, window 14", lambda: tg.window_attention_grad(grad_out, q, k, v, out, lse, *mask))]


def run_for(fn, seconds: float) -> float:
    """Calls fn back to back for about `seconds` -> ms a call."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0, calls = time.time(), 0
    start.record()
    while time.time() - t0 < seconds:
        for _ in range(50):
            fn()
        calls += 50
        torch.cuda.synchronize()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def samples(path: Path) -> list[tuple[float, list[str]]]:
    """nvidia-smi's lines -> (seconds since the epoch, the other fields); its timestamps are in local time."""
    rows = []
    for line in path.read_text().splitlines():
        stamp, *fields = (v.strip() for v in line.split(","))
        try:
            rows.append((datetime.datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").timestamp(), fields))
        except ValueError:
            continue
    return rows


def trace(path: Path):
    """Prints --trace's summary of cold_run.sh's SMI_LOG (fields: index, clock, power, power cap)."""
    by_gpu = {}
    for _, (gpu, mhz, watts, cap) in samples(path):
        if float(watts) > 300:
            by_gpu.setdefault(gpu, []).append((float(mhz), float(watts), cap == "Active"))
    for gpu, rows in sorted(by_gpu.items()):
        clocks = sorted(mhz for mhz, _, _ in rows)
        p10, p50, p90 = (clocks[int(q * (len(clocks) - 1))] for q in (0.1, 0.5, 0.9))
        print(f"GPU {gpu}: {len(rows)} samples above 300 W, {sum(c for _, _, c in rows) / len(rows):.0%} under the "
              f"power cap; clock p10/p50/p90 {p10:.0f}/{p50:.0f}/{p90:.0f} MHz; "
              f"mean {sum(w for _, w, _ in rows) / len(rows):.0f} W")


def main():
    def option(name: str, default: str) -> str:
        return next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith(f"--{name}=")), default)
    if option("trace", ""):
        return trace(Path(option("trace", "")))
    seconds, rounds, only = float(option("seconds", "3")), int(option("rounds", "2")), option("only", "")
    if option("train_gpt", ""):  # before the diag bench imports train_gpt: it takes this one
        spec = importlib.util.spec_from_file_location("train_gpt", option("train_gpt", ""))
        sys.modules["train_gpt"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["train_gpt"])
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gluon_matmul_diag as gd

    todo = []
    for name, fn in [case for case in cases(gd) if only in case[0]] + [("idle", None)]:
        try:  # compile everything before the clocks count
            if fn:
                fn()
            todo.append((name, fn))
        except Exception as e:  # e.g. an older train_gpt.py without this op: say so and go on
            print(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
    torch.cuda.synchronize()
    log = Path(tempfile.mkdtemp()) / "smi.csv"
    with open(log, "w") as out:
        smi = subprocess.Popen(["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits", "-lms", "50"],
                               stdout=out)
        time.sleep(1)
        spans = []
        for name, fn in todo * rounds:
            t0 = time.time()
            ms = run_for(fn, seconds) if fn else time.sleep(seconds / 1.5)
            spans.append((name, t0, time.time(), ms))
        time.sleep(0.3)
        smi.terminate()
        smi.wait()
    rows = samples(log)
    print(f"{torch.cuda.get_device_name()}, torch {torch.version.__version__}, {gd.tg.__file__}; "
          f"{seconds:g} s a case, each round in turn")
    for name, t0, t1, ms in spans:
        got = [fields for t, fields in rows if t0 + 0.5 <= t <= t1 - 0.2]
        if not got:
            print(f"{name:<40} no samples")
            continue
        mhz = sum(float(f[0]) for f in got) / len(got)
        watts = sum(float(f[1]) for f in got) / len(got)
        capped = sum(f[4] == "Active" for f in got)
        timed = f"{ms:7.4f} ms {ms * mhz:6.0f} kcycles {ms * watts:6.1f} mJ" if ms else " " * 35
        print(f"{name:<40} {timed}  {mhz:5.0f} MHz {watts:6.1f} W (limit {got[0][2]}), {got[-1][3]} C, "
              f"power cap {capped}/{len(got)} samples")


if __name__ == "__main__":
    main()
