"""Speed lead 1, round 11: the attention's backward in one kernel, the gradient of q added up across key tiles with
atomic adds, against train_gpt.py's two kernels (one over key tiles for the gradients of k and v, one over query
tiles for that of q). One kernel does 5 tile matmuls a (key tile, query tile) pair where the two do 7, but adds
BLOCK_M x HEAD_DIM float32 partial sums a pair into a zeroed (T, H, HEAD_DIM) buffer, then rounds it to bf16.

The variant kernel is train_gpt.py's _window_attention_grad_kv_kernel (as of a8e0fa3) plus the gradient of q, with
one switch: TMA_ADD, the partial sums added by the tensor-memory accelerator from shared memory (a bulk reduction,
as FlashAttention-3 does), or by one atomic add an element from registers. The tile is (query rows, key rows,
warps, stages). One 64K-token sequence, 6 heads of 128, lognormal documents (benchmarks/attention_sweep.py).

Prints each variant's largest difference from train_gpt.py's gradients at windows 14 and 7, then ms a backward
call (the row sums, and the zeroing and rounding where the variant has them, included) at every window 1..14,
timed in turns (each round times every variant once at every window), and a step's worth for one sequence:
3 long-window and 8 short-window layers, mean over the schedule's windows.

Usage: python records/2026-12-03_attention_dq_x1/attention_dq_variants.py [ROUNDS, by default 5] [TILES: only these
tiles, comma separated, as 64x128x8x3]
"""
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
import train_gpt  # noqa: E402
from attention_sweep import documents  # noqa: E402
from matmul_peak import median_ms  # noqa: E402
from train_gpt import ATTENTION_SCALE, BLOCK_SIZE, LOG2E, _attention_delta_kernel  # noqa: E402

T, H, HEAD_DIM = 64 * 1024, 6, 128
LONG_LAYERS, SHORT_LAYERS = 3, 8
VARIANTS = [(tma, tile) for tma in (False, True)
            for tile in ((64, 64, 4, 2), (32, 64, 4, 2), (64, 128, 8, 2), (32, 128, 8, 2), (64, 128, 8, 3))]


@triton.jit
def _grad_tiles(grad_k, grad_v, k_tile, v_tile, q, grad_out, lse, delta, grad_q, grad_q_desc, head, keys, ends_k,
                lo, hi, qk_scale, scale, H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                MASKED: tl.constexpr, TMA_ADD: tl.constexpr):
    cols, dims = tl.arange(0, BLOCK_M), tl.arange(0, HEAD_DIM)
    for m in tl.range(lo, hi, BLOCK_M):
        rows = m + cols
        q_t = tl.load(q + rows[None, :] * (H * HEAD_DIM) + dims[:, None])
        p_t = tl.math.exp2(tl.dot(k_tile, q_t) * qk_scale - tl.load(lse + rows)[None, :])
        if MASKED:
            p_t = tl.where((rows[None, :] >= keys[:, None]) & (rows[None, :] < ends_k[:, None]), p_t, 0.0)
        grad_o = tl.load(grad_out + rows[:, None] * (H * HEAD_DIM) + dims[None, :])
        grad_v += tl.dot(p_t.to(grad_o.dtype), grad_o)
        grad_p_t = tl.dot(v_tile, tl.trans(grad_o))
        grad_s_t = (p_t * (grad_p_t - tl.load(delta + rows)[None, :])).to(q_t.dtype)
        grad_k += tl.dot(grad_s_t, tl.trans(q_t))
        grad_q_part = tl.dot(tl.trans(grad_s_t), k_tile) * scale
        if TMA_ADD:
            grad_q_desc.atomic_add([m, head * HEAD_DIM], grad_q_part)
        else:
            tl.atomic_add(grad_q + rows[:, None] * (H * HEAD_DIM) + dims[None, :], grad_q_part, sem="relaxed")
    return grad_k, grad_v


@triton.jit
def _grad_kernel(q, k, v, grad_out, lse, delta, ends, window_blocks, grad_k, grad_v, grad_q, grad_q_desc, T,
                 qk_scale, scale, H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, TMA_ADD: tl.constexpr):
    n0, head = tl.program_id(0) * BLOCK_N, tl.program_id(1)
    keys, dims = n0 + tl.arange(0, BLOCK_N), tl.arange(0, HEAD_DIM)
    offset = head * HEAD_DIM
    q, grad_out, grad_q, lse, delta = q + offset, grad_out + offset, grad_q + offset, lse + head * T, delta + head * T
    at = keys[:, None] * (H * HEAD_DIM) + offset + dims[None, :]
    k_tile, v_tile = tl.load(k + at), tl.load(v + at)
    ends_k = tl.load(ends + keys)
    window = tl.maximum(tl.load(window_blocks), 1)
    hi = tl.minimum(tl.minimum((n0 // BLOCK + window) * BLOCK, T), tl.cdiv(tl.load(ends + n0 + BLOCK_N - 1),
                                                                         BLOCK_M) * BLOCK_M)
    unmasked = tl.maximum(tl.minimum(hi, tl.load(ends + n0) // BLOCK_M * BLOCK_M), n0 + BLOCK_N)
    grad_k_tile = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    grad_v_tile = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    grad_k_tile, grad_v_tile = _grad_tiles(grad_k_tile, grad_v_tile, k_tile, v_tile, q, grad_out, lse, delta, grad_q,
                                           grad_q_desc, head, keys, ends_k, n0, n0 + BLOCK_N, qk_scale, scale, H,
                                           HEAD_DIM, BLOCK_M, True, TMA_ADD)
    grad_k_tile, grad_v_tile = _grad_tiles(grad_k_tile, grad_v_tile, k_tile, v_tile, q, grad_out, lse, delta, grad_q,
                                           grad_q_desc, head, keys, ends_k, n0 + BLOCK_N, unmasked, qk_scale, scale, H,
                                           HEAD_DIM, BLOCK_M, False, TMA_ADD)
    grad_k_tile, grad_v_tile = _grad_tiles(grad_k_tile, grad_v_tile, k_tile, v_tile, q, grad_out, lse, delta, grad_q,
                                           grad_q_desc, head, keys, ends_k, unmasked, hi, qk_scale, scale, H,
                                           HEAD_DIM, BLOCK_M, True, TMA_ADD)
    tl.store(grad_k + at, (grad_k_tile * scale).to(k_tile.dtype))
    tl.store(grad_v + at, grad_v_tile.to(k_tile.dtype))


def one_kernel_grad(tma_add: bool, tile, grad_out, q, k, v, out, lse, starts, ends, window_blocks):
    block_m, block_n, warps, stages = tile
    delta = torch.empty_like(lse)
    _attention_delta_kernel[(T // BLOCK_SIZE, H)](out, grad_out, delta, T, H, HEAD_DIM, BLOCK_SIZE)
    grad_k, grad_v = torch.empty_like(k), torch.empty_like(v)
    grad_q = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    grad_q_desc = TensorDescriptor(grad_q, [T, H * HEAD_DIM], [H * HEAD_DIM, 1], [block_m, HEAD_DIM])
    _grad_kernel[(T // block_n, H)](q, k, v, grad_out, lse, delta, ends, window_blocks, grad_k, grad_v, grad_q,
                                    grad_q_desc, T, ATTENTION_SCALE * LOG2E, ATTENTION_SCALE, H, HEAD_DIM, BLOCK_SIZE,
                                    block_m, block_n, tma_add, num_warps=warps, num_stages=stages)
    return grad_q.bfloat16(), grad_k, grad_v


def name_of(tma_add: bool, tile) -> str:
    return f"one kernel, {'TMA adds' if tma_add else 'atomic adds'}, {'x'.join(map(str, tile))}"


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    chosen = sys.argv[2].split(",") if len(sys.argv) > 2 else None
    variants = [(tma, tile) for tma, tile in VARIANTS if chosen is None or "x".join(map(str, tile)) in chosen]
    docs = documents(T)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, grad_out = (torch.randn(1, T, H, HEAD_DIM, device="cuda", generator=gen).bfloat16() for _ in range(4))
    args = {}  # window -> the backward's inputs
    for window in range(1, 15):
        mask = train_gpt.document_windows(docs, torch.tensor(window, dtype=torch.int32, device="cuda"))[0]
        out, lse = train_gpt.window_attention(q, k, v, mask.starts, mask.window_blocks)
        args[window] = (grad_out, q, k, v, out, lse, *mask)
    candidates = [("train_gpt.py's two kernels", lambda a: train_gpt.window_attention_grad(*a))]
    candidates += [(name_of(*variant), lambda a, variant=variant: one_kernel_grad(*variant, *a)) for variant in variants]
    runnable = []
    for name, fn in candidates:
        try:
            line = f"{name}:"
            for window in (14, 7):
                expected = train_gpt.window_attention_grad(*args[window])
                got, again = fn(args[window]), fn(args[window])
                line += f" window {window:2d} max |diff| from train_gpt.py" + "".join(
                    f" {g} {(a.float() - b.float()).abs().max().item():.2e}"
                    for g, a, b in zip(("q", "k", "v"), got, expected))
                line += f", q between two calls {(got[0].float() - again[0].float()).abs().max().item():.2e};"
            print(line + f" largest |grad q| {expected[0].float().abs().max().item():.2e}", flush=True)
            runnable.append((name, fn, {w: [] for w in args}))
        except Exception as e:  # a variant that does not compile or run here is a finding too
            print(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
    for _ in range(rounds):
        for name, fn, times in runnable:
            for window, a in args.items():
                times[window].append(median_ms(lambda: fn(a), reps=5, calls=10))
    print(f"\nms a backward call, median of {rounds} rounds (each the median of 5 x 10 calls queued)")
    print("window " + " ".join(f"{w:6d}" for w in args) + "   a step's worth, mean over windows 1..14")
    baseline = None
    for name, fn, times in runnable:
        ms = {w: sorted(t)[len(t) // 2] for w, t in times.items()}
        step = sum(LONG_LAYERS * ms[w] + SHORT_LAYERS * ms[max(w // 2, 1)] for w in args) / len(args)
        baseline = baseline or step
        print("       " + " ".join(f"{ms[w]:6.3f}" for w in args) + f"   {step:6.2f} ms ({step / baseline:.3f})  {name}")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)


if __name__ == "__main__":
    main()
