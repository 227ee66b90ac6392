"""Speed lead 1, round 12: the attention's kernels loading their tiles through the tensor-memory accelerator (TMA).

train_gpt.py's three attention kernels (the forward, and the backward's kernels over key tiles and over query tiles)
load q, k, v and grad_out tiles with pointer loads, which the pipeline turns into cp.async copies, every thread
computing its addresses. Here each kernel is copied with its tiles loaded by TMA instead, from descriptors of the
(T, H * head_dim) tensors; the masks, the math and the order of the sums are train_gpt.py's (as of b082346). Also
timed: train_gpt.py's own kernels with other tiles (the forward's 64x32x4x3 was an open lead).

One 64K-token sequence, 6 heads of 128, lognormal documents (benchmarks/attention_sweep.py). For each kernel alone
(the row sums of the backward computed once beforehand): its largest difference from train_gpt.py's kernel at
windows 14 and 7, then ms a call at every window 1..14, timed in turns (each round times every variant once at every
window), and a step's worth for one sequence: 3 long-window and 8 short-window layers, mean over the schedule's
windows. A tile is (query rows, key rows, warps, stages).

It imports train_gpt.py's pointer-load kernels as of b082346, so it runs beside that train_gpt.py (the README
beside this file says how).

Usage: python records/2026-12-04_attention_tma_x1/attention_tma_variants.py [ROUNDS, by default 3] [VARIANTS: these
instead of the list below, comma separated, as grad_q:tma:64x64x4x2 or forward:pointer:64x32x4x3]
"""
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
import train_gpt as tg  # noqa: E402
from attention_sweep import documents  # noqa: E402
from matmul_peak import median_ms  # noqa: E402
from train_gpt import _key_range  # noqa: E402

T, H, HEAD_DIM = 64 * 1024, 6, 128
LONG_LAYERS, SHORT_LAYERS = 3, 8
QK_SCALE = tg.ATTENTION_SCALE * tg.LOG2E
VARIANTS = {  # kernel -> (TMA or not, tile) to time beside train_gpt.py's own
    "forward": [(False, (64, 32, 4, 3)), (True, (64, 64, 4, 3)), (True, (64, 32, 4, 3)), (True, (128, 64, 8, 3)),
                (True, (128, 128, 8, 3)), (True, (64, 64, 4, 4)), (True, (128, 64, 8, 2))],
    "grad_kv": [(True, (64, 64, 4, 2)), (True, (64, 64, 4, 3)), (True, (64, 128, 8, 2)), (True, (64, 128, 8, 3)),
                (True, (32, 64, 4, 3))],
    "grad_q": [(False, (64, 32, 4, 3)), (True, (64, 64, 4, 2)), (True, (64, 64, 4, 3)), (True, (128, 64, 8, 2)),
               (True, (64, 32, 4, 3)), (True, (128, 128, 8, 2))],
}


@triton.jit
def _attend_tiles(acc, row_sum, row_max, q, k_desc, v_desc, col, rows, starts_q, lo, hi, qk_scale,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    cols = tl.arange(0, BLOCK_N)
    for n in tl.range(lo, hi, BLOCK_N):
        keys = n + cols
        scores = tl.dot(q, k_desc.load([n, col]).T) * qk_scale
        if MASKED:
            seen = (keys[None, :] >= starts_q[:, None]) & (keys[None, :] <= rows[:, None])
            scores = tl.where(seen, scores, -1.0e6)
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        p = tl.math.exp2(scores - new_max[:, None])
        alpha = tl.math.exp2(row_max - new_max)
        row_sum = row_sum * alpha + tl.sum(p, 1)
        values = v_desc.load([n, col])
        acc = acc * alpha[:, None] + tl.dot(p.to(values.dtype), values)
        row_max = new_max
    return acc, row_sum, row_max


@triton.jit
def forward_kernel(q_desc, k_desc, v_desc, out, lse, starts, window_blocks, T, qk_scale, H: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    m0, head = tl.program_id(0) * BLOCK_M, tl.program_id(1)
    rows, dims, col = m0 + tl.arange(0, BLOCK_M), tl.arange(0, HEAD_DIM), head * HEAD_DIM
    q_tile = q_desc.load([m0, col])
    starts_q = tl.load(starts + rows)
    window = tl.maximum(tl.load(window_blocks), 1)
    lo, unmasked = _key_range(tl.load(starts + m0), tl.load(starts + m0 + BLOCK_M - 1), m0, window, BLOCK, BLOCK_N)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    row_max = tl.full((BLOCK_M,), -float("inf"), dtype=tl.float32)
    acc, row_sum, row_max = _attend_tiles(acc, row_sum, row_max, q_tile, k_desc, v_desc, col, rows, starts_q, lo,
                                          unmasked, qk_scale, BLOCK_N, True)
    acc, row_sum, row_max = _attend_tiles(acc, row_sum, row_max, q_tile, k_desc, v_desc, col, rows, starts_q,
                                          unmasked, m0, qk_scale, BLOCK_N, False)
    acc, row_sum, row_max = _attend_tiles(acc, row_sum, row_max, q_tile, k_desc, v_desc, col, rows, starts_q, m0,
                                          m0 + BLOCK_M, qk_scale, BLOCK_N, True)
    tl.store(out + rows[:, None] * (H * HEAD_DIM) + col + dims[None, :], (acc / row_sum[:, None]).to(q_tile.dtype))
    tl.store(lse + head * T + rows, row_max + tl.math.log2(row_sum))


@triton.jit
def _grad_kv_tiles(grad_k, grad_v, k_tile, v_tile, q_desc, grad_out_desc, lse, delta, col, keys, ends_k, lo, hi,
                   qk_scale, BLOCK_M: tl.constexpr, MASKED: tl.constexpr):
    cols = tl.arange(0, BLOCK_M)
    for m in tl.range(lo, hi, BLOCK_M):
        rows = m + cols
        q_tile = q_desc.load([m, col])
        p_t = tl.math.exp2(tl.dot(k_tile, q_tile.T) * qk_scale - tl.load(lse + rows)[None, :])
        if MASKED:
            p_t = tl.where((rows[None, :] >= keys[:, None]) & (rows[None, :] < ends_k[:, None]), p_t, 0.0)
        grad_o = grad_out_desc.load([m, col])
        grad_v += tl.dot(p_t.to(grad_o.dtype), grad_o)
        grad_p_t = tl.dot(v_tile, grad_o.T)
        grad_s_t = p_t * (grad_p_t - tl.load(delta + rows)[None, :])
        grad_k += tl.dot(grad_s_t.to(q_tile.dtype), q_tile)
    return grad_k, grad_v


@triton.jit
def grad_kv_kernel(q_desc, k_desc, v_desc, grad_out_desc, lse, delta, ends, window_blocks, grad_k, grad_v, T,
                   qk_scale, scale, H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    n0, head = tl.program_id(0) * BLOCK_N, tl.program_id(1)
    keys, dims, col = n0 + tl.arange(0, BLOCK_N), tl.arange(0, HEAD_DIM), head * HEAD_DIM
    lse, delta = lse + head * T, delta + head * T
    k_tile, v_tile = k_desc.load([n0, col]), v_desc.load([n0, col])
    ends_k = tl.load(ends + keys)
    window = tl.maximum(tl.load(window_blocks), 1)
    hi = tl.minimum(tl.minimum((n0 // BLOCK + window) * BLOCK, T), tl.cdiv(tl.load(ends + n0 + BLOCK_N - 1),
                                                                         BLOCK_M) * BLOCK_M)
    unmasked = tl.maximum(tl.minimum(hi, tl.load(ends + n0) // BLOCK_M * BLOCK_M), n0 + BLOCK_N)
    grad_k_tile = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    grad_v_tile = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    grad_k_tile, grad_v_tile = _grad_kv_tiles(grad_k_tile, grad_v_tile, k_tile, v_tile, q_desc, grad_out_desc, lse,
                                              delta, col, keys, ends_k, n0, n0 + BLOCK_N, qk_scale, BLOCK_M, True)
    grad_k_tile, grad_v_tile = _grad_kv_tiles(grad_k_tile, grad_v_tile, k_tile, v_tile, q_desc, grad_out_desc, lse,
                                              delta, col, keys, ends_k, n0 + BLOCK_N, unmasked, qk_scale, BLOCK_M,
                                              False)
    grad_k_tile, grad_v_tile = _grad_kv_tiles(grad_k_tile, grad_v_tile, k_tile, v_tile, q_desc, grad_out_desc, lse,
                                              delta, col, keys, ends_k, unmasked, hi, qk_scale, BLOCK_M, True)
    at = keys[:, None] * (H * HEAD_DIM) + col + dims[None, :]
    tl.store(grad_k + at, (grad_k_tile * scale).to(k_tile.dtype))
    tl.store(grad_v + at, grad_v_tile.to(k_tile.dtype))


@triton.jit
def _grad_q_tiles(grad_q, q_tile, grad_o, lse_q, delta_q, k_desc, v_desc, col, rows, starts_q, lo, hi, qk_scale,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    cols = tl.arange(0, BLOCK_N)
    for n in tl.range(lo, hi, BLOCK_N):
        keys = n + cols
        k_tile = k_desc.load([n, col])
        p = tl.math.exp2(tl.dot(q_tile, k_tile.T) * qk_scale - lse_q[:, None])
        if MASKED:
            p = tl.where((keys[None, :] >= starts_q[:, None]) & (keys[None, :] <= rows[:, None]), p, 0.0)
        grad_p = tl.dot(grad_o, v_desc.load([n, col]).T)
        grad_s = p * (grad_p - delta_q[:, None])
        grad_q += tl.dot(grad_s.to(k_tile.dtype), k_tile)
    return grad_q


@triton.jit
def grad_q_kernel(q_desc, k_desc, v_desc, grad_out_desc, lse, delta, starts, window_blocks, grad_q, T, qk_scale,
                  scale, H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    m0, head = tl.program_id(0) * BLOCK_M, tl.program_id(1)
    rows, dims, col = m0 + tl.arange(0, BLOCK_M), tl.arange(0, HEAD_DIM), head * HEAD_DIM
    q_tile, grad_o = q_desc.load([m0, col]), grad_out_desc.load([m0, col])
    lse_q, delta_q = tl.load(lse + head * T + rows), tl.load(delta + head * T + rows)
    starts_q = tl.load(starts + rows)
    window = tl.maximum(tl.load(window_blocks), 1)
    lo, unmasked = _key_range(tl.load(starts + m0), tl.load(starts + m0 + BLOCK_M - 1), m0, window, BLOCK, BLOCK_N)
    grad_q_tile = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    grad_q_tile = _grad_q_tiles(grad_q_tile, q_tile, grad_o, lse_q, delta_q, k_desc, v_desc, col, rows, starts_q, lo,
                                unmasked, qk_scale, BLOCK_N, True)
    grad_q_tile = _grad_q_tiles(grad_q_tile, q_tile, grad_o, lse_q, delta_q, k_desc, v_desc, col, rows, starts_q,
                                unmasked, m0, qk_scale, BLOCK_N, False)
    grad_q_tile = _grad_q_tiles(grad_q_tile, q_tile, grad_o, lse_q, delta_q, k_desc, v_desc, col, rows, starts_q, m0,
                                m0 + BLOCK_M, qk_scale, BLOCK_N, True)
    tl.store(grad_q + rows[:, None] * (H * HEAD_DIM) + col + dims[None, :], (grad_q_tile * scale).to(q_tile.dtype))


def desc(t, rows):
    return TensorDescriptor.from_tensor(t.view(T, H * HEAD_DIM), [rows, HEAD_DIM])


def run(kernel, tma, tile, a):
    """One call of a kernel on window a's inputs: a dict of q, k, v, grad_out, out, lse, delta, starts, ends,
    window_blocks. Returns its outputs."""
    block_m, block_n, warps, stages = tile
    q, k, v, grad_out, lse, delta = a["q"], a["k"], a["v"], a["grad_out"], a["lse"], a["delta"]
    opts = dict(num_warps=warps, num_stages=stages)
    if kernel == "forward":
        out, lse = torch.empty_like(q), q.new_empty(H, T, dtype=torch.float32)
        if tma:
            forward_kernel[(T // block_m, H)](desc(q, block_m), desc(k, block_n), desc(v, block_n), out, lse,
                                              a["starts"], a["window_blocks"], T, QK_SCALE, H, HEAD_DIM,
                                              tg.BLOCK_SIZE, block_m, block_n, **opts)
        else:
            tg._window_attention_kernel[(T // block_m, H)](q, k, v, out, lse, a["starts"], a["window_blocks"], T,
                                                           QK_SCALE, H, HEAD_DIM, tg.BLOCK_SIZE, block_m, block_n,
                                                           **opts)
        return out, lse
    if kernel == "grad_kv":
        grad_k, grad_v = torch.empty_like(k), torch.empty_like(v)
        if tma:
            grad_kv_kernel[(T // block_n, H)](desc(q, block_m), desc(k, block_n), desc(v, block_n),
                                              desc(grad_out, block_m), lse, delta, a["ends"], a["window_blocks"],
                                              grad_k, grad_v, T, QK_SCALE, tg.ATTENTION_SCALE, H, HEAD_DIM,
                                              tg.BLOCK_SIZE, block_m, block_n, **opts)
        else:
            tg._window_attention_grad_kv_kernel[(T // block_n, H)](
                q, k, v, grad_out, lse, delta, a["ends"], a["window_blocks"], grad_k, grad_v, T, QK_SCALE,
                tg.ATTENTION_SCALE, H, HEAD_DIM, tg.BLOCK_SIZE, block_m, block_n, **opts)
        return grad_k, grad_v
    grad_q = torch.empty_like(q)
    if tma:
        grad_q_kernel[(T // block_m, H)](desc(q, block_m), desc(k, block_n), desc(v, block_n),
                                         desc(grad_out, block_m), lse, delta, a["starts"], a["window_blocks"], grad_q,
                                         T, QK_SCALE, tg.ATTENTION_SCALE, H, HEAD_DIM, tg.BLOCK_SIZE, block_m,
                                         block_n, **opts)
    else:
        tg._window_attention_grad_q_kernel[(T // block_m, H)](
            q, k, v, grad_out, lse, delta, a["starts"], a["window_blocks"], grad_q, T, QK_SCALE, tg.ATTENTION_SCALE,
            H, HEAD_DIM, tg.BLOCK_SIZE, block_m, block_n, **opts)
    return (grad_q,)


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    variants = VARIANTS
    if len(sys.argv) > 2:
        variants = {kernel: [] for kernel in VARIANTS}
        for given in sys.argv[2].split(","):
            kernel, loads, tile = given.split(":")
            variants[kernel].append((loads == "tma", tuple(int(x) for x in tile.split("x"))))
    docs = documents(T)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, grad_out = (torch.randn(1, T, H, HEAD_DIM, device="cuda", generator=gen).bfloat16() for _ in range(4))
    args = {}  # window -> the kernels' inputs
    for window in range(1, 15):
        mask = tg.document_windows(docs, torch.tensor(window, dtype=torch.int32, device="cuda"))[0]
        out, lse = tg.window_attention(q, k, v, mask.starts, mask.window_blocks)
        delta = torch.empty_like(lse)
        tg._attention_delta_kernel[(T // tg.BLOCK_SIZE, H)](out, grad_out, delta, T, H, HEAD_DIM, tg.BLOCK_SIZE)
        args[window] = dict(q=q, k=k, v=v, grad_out=grad_out, out=out, lse=lse, delta=delta, **mask._asdict())
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    for kernel, tiles in variants.items():
        ours = (False, tg.ATTENTION_TILES[kernel])
        runnable = []
        for tma, tile in [ours] + tiles:
            name = f"{kernel} {'TMA loads' if tma else 'pointer loads'} {'x'.join(map(str, tile))}" + \
                   (" (train_gpt.py's)" if (tma, tile) == ours else "")
            try:
                line = f"{name}:"
                for window in (14, 7):
                    expected, got = run(kernel, *ours, args[window]), run(kernel, tma, tile, args[window])
                    line += f" window {window:2d} max |diff| " + " ".join(
                        f"{(a.float() - b.float()).abs().max().item():.2e}" for a, b in zip(got, expected)) + ";"
                print(line, flush=True)
                runnable.append((name, tma, tile, {w: [] for w in args}))
            except Exception as e:  # a variant that does not compile or fit here is a finding too
                print(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
        for _ in range(rounds):
            for name, tma, tile, times in runnable:
                for window, a in args.items():
                    times[window].append(median_ms(lambda: run(kernel, tma, tile, a), reps=3, calls=10))
        print(f"\n{kernel}: ms a call, median of {rounds} rounds (each the median of 3 x 10 calls queued)")
        print("window " + " ".join(f"{w:6d}" for w in args) + "   a step's worth, mean over windows 1..14")
        baseline = None
        for name, tma, tile, times in runnable:
            ms = {w: sorted(t)[len(t) // 2] for w, t in times.items()}
            step = sum(LONG_LAYERS * ms[w] + SHORT_LAYERS * ms[max(w // 2, 1)] for w in args) / len(args)
            baseline = baseline or step
            print("       " + " ".join(f"{ms[w]:6.3f}" for w in args) + f"   {step:6.3f} ms ({step / baseline:.3f})"
                  f"  {name}", flush=True)
        print(flush=True)


if __name__ == "__main__":
    main()
