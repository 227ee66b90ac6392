"""The blocks' cuBLAS matmuls at the model's shapes for one 64K-token sequence, in the layouts autograd gives them
(y = x @ W.T; grad_x = grad_y @ W; grad_W = grad_y.T @ x), each timed alone, with its TFLOP/s and cuBLAS kernel;
then other ways to get the weight gradients (the (out, in) products over K = 65536 tokens) with float32 sums.

Usage: python records/2026-12-04_baseline_direct_x1/matmul_shapes_bench.py
(it ran from the repository's root, as a copy there)
"""
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
from matmul_peak import median_ms  # noqa: E402

T, D = 64 * 1024, 768


def kernels(fn) -> str:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return ", ".join(sorted({e.name[:60] for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}))


def report(name, fn, flop, ref=None):
    ms = median_ms(fn, reps=10, calls=20)
    diff = ""
    if ref is not None:
        out = fn()
        diff = f"  max diff {(out.float() - ref.float()).abs().max().item():.3g} of max {ref.float().abs().max().item():.3g}"
    print(f"{ms:7.3f} ms  {flop / ms / 1e9:4.0f} TFLOP/s  {name}{diff}  [{kernels(fn)}]", flush=True)


def main():
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, device="cuda", generator=gen)).bfloat16()

    print(torch.cuda.get_device_name(), torch.__version__)
    for name, d_in, d_out in [("qkv", D, 3 * D), ("attention out", D, D), ("MLP down", 4 * D, D),
                              ("MLP up (grad_W, grad_x only)", D, 4 * D)]:
        x, w, g = randn(T, d_in), randn(d_out, d_in, scale=0.02), randn(T, d_out, scale=1e-3)
        flop = 2 * T * d_in * d_out
        print(f"--- {name}: in {d_in}, out {d_out}")
        if not name.startswith("MLP up"):
            report("forward x @ W.T", lambda: x @ w.T, flop)
        report("grad_x = g @ W", lambda: g @ w, flop)
        ref = g.T @ x
        report("grad_W = g.T @ x", lambda: g.T @ x, flop)
        report("grad_W = (x.T @ g).T", lambda: (x.T @ g).T, flop, ref)
        report("grad_W = mm(g.T, x, out_dtype=float32)", lambda: torch.mm(g.T, x, out_dtype=torch.float32), flop, ref)
        for splits in (2, 4, 8, 16):
            gs, xs = g.view(splits, T // splits, d_out).transpose(1, 2), x.view(splits, T // splits, d_in)
            report(f"grad_W = bmm over {splits} token slices, float32, summed",
                   lambda: torch.bmm(gs, xs, out_dtype=torch.float32).sum(0).bfloat16(), flop, ref)


if __name__ == "__main__":
    main()
