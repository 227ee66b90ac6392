"""The attention's three Triton kernels with e^x as inline PTX `ex2.approx.ftz.f32` against the same kernels
with `tl.math.exp2`, on one 64K-token sequence (6 heads of 128, bf16, documents of lognormal length as
data/synthetic.py makes them) on this machine's first GPU. "new" is the checkout's train_gpt.py, "old" the one
given as OLD. The committed output ran with 5a800a2 and attention_exp2.diff applied as new and 5a800a2 as old:
    git checkout 5a800a2 && git show HEAD:train_gpt.py > old_train_gpt.py
    git apply records/2026-12-04_attention_exp2_x1/attention_exp2.diff

For every long window of the schedule (1..14 blocks), and its short window: whether the two give the same bits
(output, log-sum-exp, the three gradients), and a step's worth of time for one sequence, 3 long and 8 short
layers, of the forward and of the backward. Old and new are timed in turns, ROUNDS rounds of the whole schedule,
each the median of 10 x 10 queued calls; printed are the medians over rounds and the mean over the windows (the
run spends about equal steps in each). Then the exp2 instructions in each kernel's PTX.

Usage: python records/2026-12-04_attention_exp2_x1/attention_exp2.py old_train_gpt.py
"""
import importlib.util
import re
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
import train_gpt as new  # noqa: E402
from attention_sweep import documents  # noqa: E402
from matmul_peak import median_ms  # noqa: E402

T, H, HEAD_DIM = 64 * 1024, 6, 128
LONG_LAYERS, SHORT_LAYERS, ROUNDS = 3, 8, 5
KERNELS = ("_window_attention_kernel", "_window_attention_grad_q_kernel", "_window_attention_grad_kv_kernel")


def load_old(path: str):
    """The old train_gpt.py as a module, its ops renamed so that they register beside the new ones."""
    source = Path(path).read_text().replace('"speedrun::', '"speedrun_old::')
    copy = Path(tempfile.mkdtemp()) / "old_train_gpt.py"
    copy.write_text(source)
    spec = importlib.util.spec_from_file_location("old_train_gpt", copy)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    old = load_old(sys.argv[1])
    versions = dict(old=old, new=new)
    docs = documents(T)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, grad = (torch.randn(1, T, H, HEAD_DIM, device="cuda", generator=gen).bfloat16() for _ in range(4))
    step_ms = {name: {"fwd": [], "bwd": []} for name in versions}
    same = True
    for window in range(1, 15):
        masks = new.document_windows(docs, torch.tensor(window, dtype=torch.int32, device="cuda"))
        results, fns = {}, {}
        for name, mod in versions.items():
            results[name], fwd, bwd = [], [], []
            for m in masks:
                out, lse = mod._window_attention_triton(q, k, v, m.starts, m.window_blocks)
                grads = mod._window_attention_grad_triton(grad, q, k, v, out, lse, m.starts, m.ends, m.window_blocks)
                results[name] += [out, lse, *grads]
                fwd.append(lambda mod=mod, m=m: mod._window_attention_triton(q, k, v, m.starts, m.window_blocks))
                bwd.append(lambda mod=mod, m=m, out=out, lse=lse: mod._window_attention_grad_triton(
                    grad, q, k, v, out, lse, m.starts, m.ends, m.window_blocks))
            fns[name] = fwd, bwd
        equal = [torch.equal(a, b) for a, b in zip(results["old"], results["new"])]
        same &= all(equal)
        times = {name: {"fwd": [], "bwd": []} for name in versions}
        for _ in range(ROUNDS):
            for name in versions:
                for part, (long_fn, short_fn) in zip(("fwd", "bwd"), fns[name]):
                    times[name][part].append(LONG_LAYERS * median_ms(long_fn, reps=10, calls=10)
                                             + SHORT_LAYERS * median_ms(short_fn, reps=10, calls=10))
        line = f"window {window:2d}: same bits {'yes' if all(equal) else 'NO ' + str(equal)}"
        for name in versions:
            for part in ("fwd", "bwd"):
                ms = sorted(times[name][part])[ROUNDS // 2]
                step_ms[name][part].append(ms)
                line += f"  {name} {part} {ms:.3f}"
        print(line + " ms", flush=True)
    for part in ("fwd", "bwd"):
        o, n = (sum(step_ms[name][part]) / 14 for name in versions)
        print(f"mean over windows 1..14, one sequence's 11 layers, {part}: old {o:.3f} ms, new {n:.3f} ms, "
              f"ratio {n / o:.3f}")
    o, n = (sum(map(sum, step_ms[name].values())) / 14 for name in versions)
    print(f"mean over windows 1..14, forward and backward: old {o:.3f} ms, new {n:.3f} ms, ratio {n / o:.3f}")
    print(f"same bits at every window, long and short: {'yes' if same else 'NO'}")
    for name, mod in versions.items():
        for kernel in KERNELS:
            ptx = [c.asm["ptx"] for caches in getattr(mod, kernel).device_caches.values() for c in caches[0].values()]
            ops = sorted({op for p in ptx for op in re.findall(r"ex2\.approx[.\w]*", p)})
            counts = {op: sum(p.count(op + " ") for p in ptx) for op in ops}
            print(f"{name} {kernel}: {counts} in {len(ptx)} compiled variant(s)")


if __name__ == "__main__":
    main()
