"""The windowed attention of one 64K-token sequence (6 heads of 128, bf16) on this machine's first GPU:
FlexAttention with train_gpt.block_masks (attention_flex) against train_gpt's Triton kernels with document_windows
(attention_windows), each compiled as in training. Documents of lognormal length (mean ~1000 tokens, as
data/synthetic.py makes them).

Prints, for every long window of the schedule (1..14 blocks), the GPU kernel time (torch.profiler) of the forward
and of the backward, for the long mask and for the short one, and a step's worth for one sequence: 3 long and 8
short layers (the 8th layer has none); for the kernels also their useful work in TFLOP/s: the matmul FLOPs of the
query-key pairs the mask keeps (4 a pair and head dimension forward, 10 backward, as FlashAttention counts), not of
the masked parts of their tiles. Then the mean over the schedule's windows, which the run spends about
equal steps in, and the largest difference between the two paths' outputs and gradients at the last window.
With --forward=, --grad_kv=, --grad_q= (tiles as rows x keys x warps x stages, comma separated), first the time of
that kernel alone at windows 7 and 14 for each tile; the comparison then uses the committed tiles.

With --block, instead: the backward of attention_block (attention_inputs, then attention) of one layer, as the
separate ops run it (window_attention_grad, then qkv_prep_grad, which reads back the gradients of q, k and v that
the first wrote) against the one op window_attention_inputs_grad, which does attention_inputs' backward in the
attention kernels' epilogues. For every long window of the schedule, the GPU kernel time of each, for the long and
the short mask, with and without a value embedding, and a step's worth for one sequence: the 11 attention layers
(long with ve: 2, long: 1, short with ve: 4, short: 4); then the mean over the windows, and how far apart the two
paths' gradients are at windows 1 and 14. --grad_q= and --grad_kv= then give the tile both paths use (the first).

Usage: python benchmarks/window_attention_bench.py [--forward=128x64x8x3,...] [--grad_kv=...] [--grad_q=...]
       python benchmarks/window_attention_bench.py --block [--grad_kv=64x64x8x2] [--grad_q=...]
"""
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt  # noqa: E402
from attention_inputs_bench import kernel_ms, kernel_times  # noqa: E402

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


def useful_tflop(mask: train_gpt.DocumentWindows) -> float:
    """The forward's matmul TFLOP over the query-key pairs the mask keeps (counted from each query's first key,
    without building the (T, T) matrix); the backward's is 2.5 times this."""
    pos = torch.arange(T, device=mask.starts.device)
    first = train_gpt.window_first_keys(mask.starts, mask.window_blocks)
    return 4 * (pos - first + 1).sum().item() * H * HEAD_DIM / 1e12


def tiles(name: str) -> list[train_gpt.Tile]:
    given = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith(f"--{name}=")]
    sizes = [[int(x) for x in t.split("x")] for t in given[-1].split(",")] if given else []
    return [train_gpt.Tile((rows, keys), warps, stages) for rows, keys, warps, stages in sizes]


def block_backward():
    """--block: window_attention_grad then qkv_prep_grad against window_attention_inputs_grad."""
    docs = documents(T)
    settings = dict(grad_q="ATTENTION_GRAD_Q", grad_kv="ATTENTION_GRAD_KV")
    for kernel, setting in settings.items():
        for tile in tiles(kernel)[:1]:
            setattr(train_gpt, setting, tile)
    print("tiles:", {kernel: getattr(train_gpt, setting) for kernel, setting in settings.items()})
    gen = torch.Generator(device="cuda").manual_seed(0)
    qkv = (3 * torch.randn(1, T, 3 * H, HEAD_DIM, device="cuda", generator=gen)).bfloat16()
    value_embed = torch.randn(T, H * HEAD_DIM, device="cuda", generator=gen).bfloat16()
    grad_out = torch.randn(1, T, H, HEAD_DIM, device="cuda", generator=gen).bfloat16()
    lambdas = torch.tensor([0.7, 0.4], device="cuda")
    x_scale = torch.ones(1, T, 1, device="cuda")  # the norm's row scales, which the one op's gradient of qkv takes
    rotary = train_gpt.Rotary(HEAD_DIM, T).cuda()
    value_embeds, windows = train_gpt.layer_tables(12)
    layers = Counter((windows[i], value_embeds[i] is not None) for i in range(12) if i != train_gpt.NO_ATTENTION_LAYER)
    kinds = [(window, with_ve) for window in ("long", "short") for with_ve in (True, False)]
    print(f"gradients of q, k, v the one op neither stores nor reads back: {6 * T * H * HEAD_DIM * 2 / 1e6:.0f} MB a "
          f"layer; layers a step: " + ", ".join(f"{w}{' with ve' * ve} {n}" for (w, ve), n in layers.items()))

    def backward_args(mask: train_gpt.DocumentWindows, with_ve: bool) -> tuple:
        ve = value_embed if with_ve else None
        q, k, v = train_gpt.qkv_prep(qkv, ve, lambdas, rotary.cos, rotary.sin)
        out, lse = train_gpt.window_attention(q, k, v, mask.starts, mask.window_blocks)
        raw_v, rstd = qkv[:, :, 2 * H:].contiguous(), train_gpt.qk_rstd(qkv)  # qkv's v, the QK norms' rstd
        return grad_out, raw_v, ve, lambdas, rotary.cos, rotary.sin, q, k, v, rstd, out, lse, *mask, x_scale

    def separate(args: tuple) -> tuple:
        grad_out, _, ve, lambdas, cos, sin, q, k, v, _, out, lse, *mask, _ = args
        grads = train_gpt.window_attention_grad(grad_out, q, k, v, out, lse, *mask)
        return train_gpt.qkv_prep_grad(*grads, qkv, ve, lambdas, cos, sin)

    def fused(args: tuple) -> tuple:
        return train_gpt.window_attention_inputs_grad(*args)

    def ms(path, args: tuple) -> float:
        try:
            return kernel_ms(lambda: path(args), calls=10)
        except Exception as e:  # a tile that does not fit, a kernel that fails: say so and go on
            print(f"  {path.__name__} failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}", flush=True)
            return float("nan")

    def row(first: str | int, cells: list) -> str:  # the table's columns: a label, then (separate, fused, ratio) groups
        return f"{first:>6} |" + "".join(f" {a:>8} {b:>8} {c:>6} |" for a, b, c in cells)

    groups = [f"{window}{', ve' * with_ve}" for window, with_ve in kinds] + ["a step"]
    print(f"backward of one layer, GPU kernel time in ms; a step: {sum(layers.values())} layers of one sequence")
    print(f"{'':>6} |" + "".join(f" {group:<24} |" for group in groups))
    print(row("window", [("separate", "fused", "ratio")] * len(groups)))
    steps = []
    for window in range(1, 15):
        w = torch.tensor(window, dtype=torch.int32, device="cuda")
        masks = dict(zip(("long", "short"), train_gpt.document_windows(docs, w)))
        cells, step = [], [0.0, 0.0]
        for kind in kinds:
            args = backward_args(masks[kind[0]], kind[1])
            times = [ms(separate, args), ms(fused, args)]
            step = [total + layers[kind] * t for total, t in zip(step, times)]
            cells.append(times)
        steps.append(step)
        print(row(window, [(f"{a:.3f}", f"{b:.3f}", f"{b / a:.3f}") for a, b in cells + [step]]), flush=True)
    mean = [sum(step[i] for step in steps) / len(steps) for i in (0, 1)]
    print(f"mean over the schedule's windows, a step: separate {mean[0]:.3f} ms, fused {mean[1]:.3f} ms, "
          f"ratio {mean[1] / mean[0]:.3f}")

    for window in (1, 14):
        masks = train_gpt.document_windows(docs, torch.tensor(window, dtype=torch.int32, device="cuda"))
        for name, mask in zip(("long", "short"), masks):
            for with_ve in (True, False):
                args = backward_args(mask, with_ve)
                line = f"window {window:2d} {name}{', ve' * with_ve}:"
                for part, a, b in zip(("grad_qkv", "grad_ve", "grad_lambdas"), separate(args), fused(args)):
                    if a.numel():
                        diff = (a.double() - b.double()).abs()
                        line += (f" {part} max |separate - fused| {diff.max().item():.3e} ({(diff > 0).sum().item()}"
                                 f" differ), max |separate| {a.double().abs().max().item():.3e};")
                print(line, flush=True)


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
            if fused:  # TFLOP / ms * 1000 = TFLOP/s
                work = [useful_tflop(m) * 1000 for m in (long_mask, short_mask)]
                line += (f" (useful TFLOP/s: fwd {work[0] / fwd[0]:.0f}/{work[1] / fwd[1]:.0f}"
                         f" bwd {2.5 * work[0] / bwd[0]:.0f}/{2.5 * work[1] / bwd[1]:.0f})")
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
    block_backward() if "--block" in sys.argv[1:] else main()
