"""The windowed attention of one 64K-token sequence (6 heads of 128, bf16) on this machine's first GPU:
FlexAttention with train_gpt.block_masks (attention_flex) against train_gpt's Triton kernels with document_windows
(attention_windows), each compiled as in training. Documents of lognormal length (mean ~1000 tokens, as
data/synthetic.py makes them).

Prints, for every long window of the schedule (1..14 blocks), the GPU kernel time (torch.profiler) of the forward
and of the backward, for the long mask and for the short one, and a step's worth for one sequence: 3 long and 8
short layers (the 8th layer has none). Then the mean over the schedule's windows, which the run spends about
equal steps in, and the largest difference between the two paths' outputs and gradients at the last window.
With --forward=, --grad_kv=, --grad_q= (tiles as rows x keys x warps x stages, comma separated), first the time of
that kernel alone at windows 7 and 14 for each tile; the comparison then uses the committed tiles.

Usage: python benchmarks/window_attention_bench.py [--forward=128x64x8x3,...] [--grad_kv=...] [--grad_q=...]
"""
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt  # noqa: E402
from attention_inputs_bench import kernel_times  # noqa: E402

T, H, HEAD_DIM = 64 * 1024, 6, 128
LONG_LAYERS, SHORT_LAYERS = 3, 8


def documents(tokens: int, seed: int = 0) -> torch.Tensor:
    """Document ids, as the model derives them from end-of-text tokens, for documents of lognormal length."""
    rng = np.random.default_rng(seed)
    lengths = np.maximum(1, rng.lognormal(np.log(1000) - 0.5, 1.0, size=tokens)).astype(np.int64)
    starts = np.cumsum(lengths)
    ids = torch.zeros(tokens, dtype=torch.int64)
    ids[torch.from_numpy(starts[starts < tokens])] = train_gpt.EOT_TOKEN
    return train_gpt.document_ids(ids, train_gpt.EOT_TOKEN).cuda()


def tiles(name: str) -> list[train_gpt.Tile]:
    given = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith(f"--{name}=")]
    sizes = [[int(x) for x in t.split("x")] for t in given[-1].split(",")] if given else []
    return [train_gpt.Tile((rows, keys), warps, stages) for rows, keys, warps, stages in sizes]


def main():
    docs = documents(T)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, T, H, HEAD_DIM, device="cuda", generator=gen).bfloat16().requires_grad_()
               for _ in range(3))
    grad = torch.randn(1, T, H, HEAD_DIM, device="cuda", generator=gen).bfloat16()
    flex = torch.compile(train_gpt.attention_flex, dynamic=False)
    kernels = torch.compile(train_gpt.attention_windows, dynamic=False)

    def attend(q, k, v, mask):
        return (kernels if isinstance(mask, train_gpt.DocumentWindows) else flex)(q, k, v, mask)

    def masks(fused: bool, window: int):
        w = torch.tensor(window, dtype=torch.int32, device="cuda")
        return train_gpt.document_windows(docs, w) if fused else train_gpt.block_masks(docs, w)

    def forward(mask):
        with torch.no_grad():
            attend(q, k, v, mask)

    def forward_backward(mask):
        q.grad = k.grad = v.grad = None
        attend(q, k, v, mask).backward(grad)

    def timed(fn, mask) -> float:
        return sum(kernel_times(lambda: fn(mask), calls=10).values())

    kernel_names = dict(forward="_window_attention_kernel", grad_kv="_window_attention_grad_kv_kernel",
                        grad_q="_window_attention_grad_q_kernel")
    settings = dict(forward="ATTENTION_FORWARD", grad_kv="ATTENTION_GRAD_KV", grad_q="ATTENTION_GRAD_Q")
    for kernel, name in kernel_names.items():
        committed = getattr(train_gpt, settings[kernel])
        for tile in tiles(kernel):
            setattr(train_gpt, settings[kernel], tile)
            for window in (7, 14):
                long_mask = masks(True, window)[0]
                try:
                    ms = f"{kernel_times(lambda: forward_backward(long_mask), calls=10)[name]:.3f} ms"
                except Exception as e:  # a tile that does not fit: say so and go on with the next
                    ms = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}"
                print(f"{kernel} tile {tile}: window {window:2d}, long mask {ms}", flush=True)
        setattr(train_gpt, settings[kernel], committed)
    print("tiles:", {kernel: getattr(train_gpt, setting) for kernel, setting in settings.items()})

    step_ms = {False: [], True: []}
    for window in range(1, 15):
        line = f"window {window:2d}:"
        for fused in (False, True):
            long_mask, short_mask = masks(fused, window)
            fwd = [timed(forward, m) for m in (long_mask, short_mask)]
            bwd = [timed(forward_backward, m) - f for m, f in zip((long_mask, short_mask), fwd)]
            step = LONG_LAYERS * (fwd[0] + bwd[0]) + SHORT_LAYERS * (fwd[1] + bwd[1])
            step_ms[fused].append(step)
            line += (f"  {'kernels' if fused else 'flex'}: fwd {fwd[0]:.3f}/{fwd[1]:.3f} bwd {bwd[0]:.3f}/{bwd[1]:.3f}"
                     f" (long/short) a step {step:.2f} ms")
        print(line + f"  ratio {step_ms[True][-1] / step_ms[False][-1]:.3f}", flush=True)
    flex_ms, kernels_ms = (sum(step_ms[f]) / len(step_ms[f]) for f in (False, True))
    print(f"mean over the schedule, one sequence's 11 layers: flex {flex_ms:.2f} ms, kernels {kernels_ms:.2f} ms, "
          f"ratio {kernels_ms / flex_ms:.3f}")

    results = {}
    for is_fused in (False, True):
        for m in masks(is_fused, 14):
            q.grad = k.grad = v.grad = None
            out = attend(q, k, v, m)
            out.backward(grad)
            results.setdefault(is_fused, []).extend(t.detach().clone() for t in (out, q.grad, k.grad, v.grad))
    names = [f"{mask} {t}" for mask in ("long", "short") for t in ("out", "grad_q", "grad_k", "grad_v")]
    for name, a, b in zip(names, results[False], results[True]):
        print(f"{name}: max |flex - kernels| {(a.float() - b.float()).abs().max().item():.3e}, "
              f"max |flex| {a.float().abs().max().item():.3e}")


if __name__ == "__main__":
    main()
