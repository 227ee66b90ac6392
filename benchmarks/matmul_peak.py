"""The ceilings a step is measured against, on this machine's first GPU: bf16 and FP8 matmul TFLOP/s and
device-memory bandwidth (a 1 GiB copy). Prints one line each. Also median_ms, the timer the other benchmarks use.

Usage: python benchmarks/matmul_peak.py
"""
import torch


def median_ms(fn, reps: int = 50, calls: int = 1) -> float:
    """Median time of fn() in ms, from CUDA events, after a warm-up. With calls > 1, each of the reps times that
    many calls queued back to back and counts the mean per call: the launch latency is then hidden, as in
    training, where the CPU runs ahead of the GPU."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def main():
    n = 8192
    a, b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda",
                                                                               dtype=torch.bfloat16)
    ms = median_ms(lambda: a @ b)
    print(f"bf16 matmul {n}^3: {2 * n**3 / ms / 1e9:.0f} TFLOP/s ({ms:.3f} ms)")
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).T.contiguous().T
    one = torch.ones((), device="cuda")
    ms = median_ms(lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16,
                                            use_fast_accum=True))
    print(f"fp8 matmul {n}^3: {2 * n**3 / ms / 1e9:.0f} TFLOP/s ({ms:.3f} ms)")
    src = torch.randn(2**30 // 4, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    print(f"device copy 1 GiB: {2 * src.numel() * 4 / ms / 1e6:.0f} GB/s read + write ({ms:.3f} ms)")
    print(torch.cuda.get_device_name(), "torch", torch.__version__)


if __name__ == "__main__":
    main()
