"""Time of attention_inputs (QK norm, rotary and the value mix of one layer) for one 64K-token sequence at the
record's sizes on this machine's first GPU: the plain path as torch.compile makes it, against the fused Triton
ops (at each row block and warp count given), each compiled as in training. The time is the GPU's: the kernels'
own time under torch.profiler, per forward and per backward (a lone call of this size waits on the CPU). The
bandwidth counts the bytes each must move at least: forward, bf16 qkv and ve in, q, k, v out; backward, the three
gradients, qkv and ve in, the gradients of qkv and ve out. Also the largest difference between the two paths'
outputs and gradients.

Usage: python benchmarks/attention_inputs_bench.py [--rows=16,32] [--warps=4,8]
"""
import sys
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt  # noqa: E402


def kernel_times(fn, calls: int = 20) -> dict[str, float]:
    """ms a call of fn by GPU kernel name, after a warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    times = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            times[e.name] = times.get(e.name, 0.0) + e.time_range.elapsed_us() / calls / 1e3
    assert times, "the profiler saw no GPU kernel"
    return times


def kernel_ms(fn, calls: int = 20) -> float:
    """The GPU kernels' summed time per call of fn, after a warm-up."""
    return sum(kernel_times(fn, calls).values())


def option(name: str, default: list[int]) -> list[int]:
    given = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith(f"--{name}=")]
    return [int(v) for v in given[-1].split(",")] if given else default


def main():
    T, H, head_dim = 64 * 1024, 6, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    qkv = (3 * torch.randn(1, T, 3 * H, head_dim, device="cuda", generator=gen)).bfloat16().requires_grad_()
    ve = torch.randn(T, H * head_dim, device="cuda", generator=gen).bfloat16().requires_grad_()
    lambdas = torch.tensor([0.7, 0.4], device="cuda", requires_grad=True)
    grads = [torch.randn(1, T, H, head_dim, device="cuda", generator=gen).bfloat16()
             for _ in range(3)]  # contiguous, as the attention kernels' backward gives them
    rotary = train_gpt.Rotary(head_dim, T).cuda()
    act_bytes = T * H * head_dim * 2
    results = {}
    (default_rows,), default_warps, stages = train_gpt.QKV
    variants = [(False, 0, 0)] + [(True, r, w) for r in option("rows", [default_rows])
                                  for w in option("warps", [default_warps])]
    for fused, rows, warps in variants:
        implementation = train_gpt.attention_inputs_fused if fused else train_gpt.attention_inputs_reference
        step = torch.compile(lambda *a: implementation(*a, rotary), dynamic=False)
        train_gpt.QKV = train_gpt.Tile((rows or default_rows,), warps or default_warps, stages)
        torch._dynamo.reset()

        def forward():
            with torch.no_grad():
                return step(qkv, ve, lambdas)

        def forward_backward():
            for t in (qkv, ve, lambdas):
                t.grad = None
            torch.autograd.backward(step(qkv, ve, lambdas), grads)

        forward_backward()
        results[fused] = [t.detach().clone() for t in step(qkv, ve, lambdas)] + [
            t.grad.clone() for t in (qkv, ve, lambdas)]
        fwd = kernel_ms(forward)
        bwd = kernel_ms(forward_backward) - fwd
        name = f"fused, {rows} rows, {warps} warps" if fused else "plain (torch.compile)"
        print(f"{name}: forward {fwd:.3f} ms ({7 * act_bytes / fwd / 1e6:.0f} GB/s), backward {bwd:.3f} ms "
              f"({11 * act_bytes / bwd / 1e6:.0f} GB/s), both {fwd + bwd:.3f} ms", flush=True)
    for name, plain, fused in zip(["q", "k", "v", "grad_qkv", "grad_ve", "grad_lambdas"], results[False],
                                  results[True]):
        diff = (plain.double() - fused.double()).abs().max().item()
        print(f"{name}: max |plain - fused| {diff:.3e}, max |plain| {plain.double().abs().max().item():.3e}")


if __name__ == "__main__":
    main()
