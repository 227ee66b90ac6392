"""Speed lead 1, round 13: the attention kernels' key (or query) range in one pipelined loop, and two trims.

train_gpt.py's three attention kernels (as of ba60224) walk a tile's range in three loops: the masked tiles before
the tile's document, the unmasked middle and the masked diagonal (or, over query tiles, the end of the key's
document), each loop pipelined on its own. Variants, each against train_gpt.py's kernels of ba60224, which this
script imports:

- max_first (forward): the row maximum of the raw scores, scaled once a row (the scale is positive, so it commutes
  with the maximum); the exponent is scores * scale - max in one multiply-add, as the unmasked loop compiles now.
- lazy (forward): the accumulator rescaled only when some row's maximum grew in the tile (else every factor is
  exp2(0) = 1).
- one loop: the whole range in one loop, the mask applied in every tile (where it keeps a score, the score is
  unchanged) or only in the tiles at the ends ("where needed", a branch a tile). In the forward either on the
  scaled scores, as train_gpt.py does, or on the raw scores before max_first's scaling ("raw scores").
- fused delta (backward): the row sums delta = sum(grad_out * out), computed by the kernel over query tiles, which
  then runs first, instead of by a kernel of their own; the kernel over key tiles reads them as before.

One 64K-token sequence, 6 heads of 128, lognormal documents (benchmarks/attention_sweep.py). Each variant: its
largest difference from train_gpt.py's kernels at windows 14 and 7 (out and lse; grad_q and delta; grad_k and
grad_v), then ms a call at windows 1..14, timed in turns, and a step's worth for one sequence (3 long-window and 8
short-window layers, mean over windows 1..14). Tiles are (query rows, key rows, warps, stages).

Usage, beside ba60224's train_gpt.py (the README beside this file says how):
    python attention_loop_variants.py [ROUNDS, by default 3] [NAMES: only the variants whose names contain one of
    these, comma separated; train_gpt.py's own always run]
"""
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
import train_gpt as tg  # noqa: E402
from attention_sweep import documents  # noqa: E402
from matmul_peak import median_ms  # noqa: E402
from train_gpt import _grad_q_tiles, _key_range, _tiles_of  # noqa: E402

T, H, HEAD_DIM = 64 * 1024, 6, 128
LONG_LAYERS, SHORT_LAYERS = 3, 8
QK_SCALE = tg.ATTENTION_SCALE * tg.LOG2E


@triton.jit
def _attend(acc, row_sum, row_max, q, k_desc, v_desc, col, rows, starts_q, lo, hi, qk_scale, BLOCK_N: tl.constexpr,
            MASKED: tl.constexpr, MAX_FIRST: tl.constexpr, LAZY: tl.constexpr):
    cols = tl.arange(0, BLOCK_N)
    for n in tl.range(lo, hi, BLOCK_N):
        keys = n + cols
        scores = tl.dot(q, k_desc.load([n, col]).T)
        if MASKED or not MAX_FIRST:
            scores = scores * qk_scale
            if MASKED:
                seen = (keys[None, :] >= starts_q[:, None]) & (keys[None, :] <= rows[:, None])
                scores = tl.where(seen, scores, -1.0e6)
            new_max = tl.maximum(row_max, tl.max(scores, 1))
            p = tl.math.exp2(scores - new_max[:, None])
        else:
            new_max = tl.maximum(row_max, tl.max(scores, 1) * qk_scale)
            p = tl.math.exp2(scores * qk_scale - new_max[:, None])
        alpha = tl.math.exp2(row_max - new_max)
        row_sum = row_sum * alpha + tl.sum(p, 1)
        values = v_desc.load([n, col])
        if LAZY:
            if tl.max(new_max - row_max, 0) > 0:
                acc = acc * alpha[:, None]
            acc = tl.dot(p.to(values.dtype), values, acc)
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(values.dtype), values)
        row_max = new_max
    return acc, row_sum, row_max


@triton.jit
def forward_kernel(q_desc, k_desc, v_desc, out, lse, starts, window_blocks, T, qk_scale, H: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   MAX_FIRST: tl.constexpr, LAZY: tl.constexpr):
    m0, head = tl.program_id(0) * BLOCK_M, tl.program_id(1)
    rows, dims, col = m0 + tl.arange(0, BLOCK_M), tl.arange(0, HEAD_DIM), head * HEAD_DIM
    q_tile = q_desc.load([m0, col])
    starts_q = tl.load(starts + rows)
    window = tl.maximum(tl.load(window_blocks), 1)
    lo, unmasked = _key_range(tl.load(starts + m0), tl.load(starts + m0 + BLOCK_M - 1), m0, window, BLOCK, BLOCK_N)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    row_max = tl.full((BLOCK_M,), -float("inf"), dtype=tl.float32)
    acc, row_sum, row_max = _attend(acc, row_sum, row_max, q_tile, k_desc, v_desc, col, rows, starts_q, lo, unmasked,
                                    qk_scale, BLOCK_N, True, MAX_FIRST, LAZY)
    acc, row_sum, row_max = _attend(acc, row_sum, row_max, q_tile, k_desc, v_desc, col, rows, starts_q, unmasked, m0,
                                    qk_scale, BLOCK_N, False, MAX_FIRST, LAZY)
    acc, row_sum, row_max = _attend(acc, row_sum, row_max, q_tile, k_desc, v_desc, col, rows, starts_q, m0,
                                    m0 + BLOCK_M, qk_scale, BLOCK_N, True, MAX_FIRST, LAZY)
    tl.store(out + rows[:, None] * (H * HEAD_DIM) + col + dims[None, :], (acc / row_sum[:, None]).to(q_tile.dtype))
    tl.store(lse + head * T + rows, row_max + tl.math.log2(row_sum))


@triton.jit
def grad_q_delta_kernel(q_desc, k_desc, v_desc, grad_out_desc, grad_out, out, lse, delta, starts, window_blocks,
                        grad_q, T, qk_scale, scale, H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DELTA_FROM_DESC: tl.constexpr):
    m0, head = tl.program_id(0) * BLOCK_M, tl.program_id(1)
    rows, dims, col = m0 + tl.arange(0, BLOCK_M), tl.arange(0, HEAD_DIM), head * HEAD_DIM
    q_tile, grad_o = q_desc.load([m0, col]), grad_out_desc.load([m0, col])
    at = rows[:, None] * (H * HEAD_DIM) + col + dims[None, :]
    if DELTA_FROM_DESC:  # grad_out as the tile already loaded
        delta_q = tl.sum(tl.load(out + at).to(tl.float32) * grad_o.to(tl.float32), 1)
    else:  # both with pointer loads, as _attention_delta_kernel reads them
        delta_q = tl.sum(tl.load(out + at).to(tl.float32) * tl.load(grad_out + at).to(tl.float32), 1)
    tl.store(delta + head * T + rows, delta_q)
    lse_q = tl.load(lse + head * T + rows)
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
    tl.store(grad_q + at, (grad_q_tile * scale).to(q_tile.dtype))


@triton.jit
def _attend_one_loop(acc, row_sum, row_max, q, k_desc, v_desc, col, rows, starts_q, lo, unmasked, m0, hi, qk_scale,
                     BLOCK_N: tl.constexpr, BRANCH: tl.constexpr, MAX_FIRST: tl.constexpr):
    """All of a query tile's key tiles in one pipelined loop; the mask either in every tile (where it keeps a
    score, the score is unchanged: the same bits) or only in the tiles that need it (BRANCH)."""
    cols = tl.arange(0, BLOCK_N)
    for n in tl.range(lo, hi, BLOCK_N):
        keys = n + cols
        scores = tl.dot(q, k_desc.load([n, col]).T)
        if BRANCH:
            if (n < unmasked) | (n >= m0):
                scores = scores * qk_scale
                seen = (keys[None, :] >= starts_q[:, None]) & (keys[None, :] <= rows[:, None])
                scores = tl.where(seen, scores, -1.0e6)
                new_max = tl.maximum(row_max, tl.max(scores, 1))
                p = tl.math.exp2(scores - new_max[:, None])
            else:
                if MAX_FIRST:
                    new_max = tl.maximum(row_max, tl.max(scores, 1) * qk_scale)
                    p = tl.math.exp2(scores * qk_scale - new_max[:, None])
                else:
                    scores = scores * qk_scale
                    new_max = tl.maximum(row_max, tl.max(scores, 1))
                    p = tl.math.exp2(scores - new_max[:, None])
        else:
            scores = scores * qk_scale
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
def forward_one_loop_kernel(q_desc, k_desc, v_desc, out, lse, starts, window_blocks, T, qk_scale, H: tl.constexpr,
                            HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BRANCH: tl.constexpr, MAX_FIRST: tl.constexpr):
    m0, head = tl.program_id(0) * BLOCK_M, tl.program_id(1)
    rows, dims, col = m0 + tl.arange(0, BLOCK_M), tl.arange(0, HEAD_DIM), head * HEAD_DIM
    q_tile = q_desc.load([m0, col])
    starts_q = tl.load(starts + rows)
    window = tl.maximum(tl.load(window_blocks), 1)
    lo, unmasked = _key_range(tl.load(starts + m0), tl.load(starts + m0 + BLOCK_M - 1), m0, window, BLOCK, BLOCK_N)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    row_max = tl.full((BLOCK_M,), -float("inf"), dtype=tl.float32)
    acc, row_sum, row_max = _attend_one_loop(acc, row_sum, row_max, q_tile, k_desc, v_desc, col, rows, starts_q, lo,
                                             unmasked, m0, m0 + BLOCK_M, qk_scale, BLOCK_N, BRANCH, MAX_FIRST)
    tl.store(out + rows[:, None] * (H * HEAD_DIM) + col + dims[None, :], (acc / row_sum[:, None]).to(q_tile.dtype))
    tl.store(lse + head * T + rows, row_max + tl.math.log2(row_sum))


@triton.jit
def grad_q_one_loop_kernel(q_desc, k_desc, v_desc, grad_out_desc, out, lse, delta, starts, window_blocks, grad_q, T,
                           qk_scale, scale, H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BRANCH: tl.constexpr):
    m0, head = tl.program_id(0) * BLOCK_M, tl.program_id(1)
    rows, dims, col = m0 + tl.arange(0, BLOCK_M), tl.arange(0, HEAD_DIM), head * HEAD_DIM
    q_tile, grad_o = q_desc.load([m0, col]), grad_out_desc.load([m0, col])
    at = rows[:, None] * (H * HEAD_DIM) + col + dims[None, :]
    delta_q = tl.sum(tl.load(out + at).to(tl.float32) * grad_o.to(tl.float32), 1)
    tl.store(delta + head * T + rows, delta_q)
    lse_q = tl.load(lse + head * T + rows)
    starts_q = tl.load(starts + rows)
    window = tl.maximum(tl.load(window_blocks), 1)
    lo, unmasked = _key_range(tl.load(starts + m0), tl.load(starts + m0 + BLOCK_M - 1), m0, window, BLOCK, BLOCK_N)
    grad_q_tile = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    cols = tl.arange(0, BLOCK_N)
    for n in tl.range(lo, m0 + BLOCK_M, BLOCK_N):
        keys = n + cols
        k_tile = k_desc.load([n, col])
        p = tl.math.exp2(tl.dot(q_tile, k_tile.T) * qk_scale - lse_q[:, None])
        if BRANCH:
            if (n < unmasked) | (n >= m0):
                p = tl.where((keys[None, :] >= starts_q[:, None]) & (keys[None, :] <= rows[:, None]), p, 0.0)
        else:
            p = tl.where((keys[None, :] >= starts_q[:, None]) & (keys[None, :] <= rows[:, None]), p, 0.0)
        grad_p = tl.dot(grad_o, v_desc.load([n, col]).T)
        grad_s = p * (grad_p - delta_q[:, None])
        grad_q_tile += tl.dot(grad_s.to(k_tile.dtype), k_tile)
    tl.store(grad_q + at, (grad_q_tile * scale).to(q_tile.dtype))


@triton.jit
def grad_kv_one_loop_kernel(q_desc, k_desc, v_desc, grad_out_desc, lse, delta, ends, window_blocks, grad_k, grad_v, T,
                            qk_scale, scale, H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BRANCH: tl.constexpr):
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
    cols = tl.arange(0, BLOCK_M)
    for m in tl.range(n0, hi, BLOCK_M):
        rows = m + cols
        q_tile = q_desc.load([m, col])
        p_t = tl.math.exp2(tl.dot(k_tile, q_tile.T) * qk_scale - tl.load(lse + rows)[None, :])
        if BRANCH:
            if (m < n0 + BLOCK_N) | (m >= unmasked):
                p_t = tl.where((rows[None, :] >= keys[:, None]) & (rows[None, :] < ends_k[:, None]), p_t, 0.0)
        else:
            p_t = tl.where((rows[None, :] >= keys[:, None]) & (rows[None, :] < ends_k[:, None]), p_t, 0.0)
        grad_o = grad_out_desc.load([m, col])
        grad_v_tile += tl.dot(p_t.to(grad_o.dtype), grad_o)
        grad_p_t = tl.dot(v_tile, grad_o.T)
        grad_s_t = p_t * (grad_p_t - tl.load(delta + rows)[None, :])
        grad_k_tile += tl.dot(grad_s_t.to(q_tile.dtype), q_tile)
    at = keys[:, None] * (H * HEAD_DIM) + col + dims[None, :]
    tl.store(grad_k + at, (grad_k_tile * scale).to(k_tile.dtype))
    tl.store(grad_v + at, grad_v_tile.to(k_tile.dtype))


@triton.jit
def _attend_raw_select(acc, row_sum, row_max, q, k_desc, v_desc, col, rows, starts_q, lo, unmasked, m0, hi, qk_scale,
                       BLOCK_N: tl.constexpr, BRANCH: tl.constexpr):
    """One loop; the mask selects among the raw scores (before the scale), only in the tiles that need it (BRANCH)
    or in all; the row maximum of the raw scores scaled once a row, the exponent one multiply-add everywhere."""
    cols = tl.arange(0, BLOCK_N)
    for n in tl.range(lo, hi, BLOCK_N):
        keys = n + cols
        scores = tl.dot(q, k_desc.load([n, col]).T)
        if BRANCH:
            if (n < unmasked) | (n >= m0):
                seen = (keys[None, :] >= starts_q[:, None]) & (keys[None, :] <= rows[:, None])
                scores = tl.where(seen, scores, -1.0e6)
        else:
            seen = (keys[None, :] >= starts_q[:, None]) & (keys[None, :] <= rows[:, None])
            scores = tl.where(seen, scores, -1.0e6)
        new_max = tl.maximum(row_max, tl.max(scores, 1) * qk_scale)
        p = tl.math.exp2(scores * qk_scale - new_max[:, None])
        alpha = tl.math.exp2(row_max - new_max)
        row_sum = row_sum * alpha + tl.sum(p, 1)
        values = v_desc.load([n, col])
        acc = acc * alpha[:, None] + tl.dot(p.to(values.dtype), values)
        row_max = new_max
    return acc, row_sum, row_max


@triton.jit
def forward_raw_select_kernel(q_desc, k_desc, v_desc, out, lse, starts, window_blocks, T, qk_scale, H: tl.constexpr,
                              HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, BRANCH: tl.constexpr):
    m0, head = tl.program_id(0) * BLOCK_M, tl.program_id(1)
    rows, dims, col = m0 + tl.arange(0, BLOCK_M), tl.arange(0, HEAD_DIM), head * HEAD_DIM
    q_tile = q_desc.load([m0, col])
    starts_q = tl.load(starts + rows)
    window = tl.maximum(tl.load(window_blocks), 1)
    lo, unmasked = _key_range(tl.load(starts + m0), tl.load(starts + m0 + BLOCK_M - 1), m0, window, BLOCK, BLOCK_N)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    row_max = tl.full((BLOCK_M,), -float("inf"), dtype=tl.float32)
    acc, row_sum, row_max = _attend_raw_select(acc, row_sum, row_max, q_tile, k_desc, v_desc, col, rows, starts_q, lo,
                                               unmasked, m0, m0 + BLOCK_M, qk_scale, BLOCK_N, BRANCH)
    tl.store(out + rows[:, None] * (H * HEAD_DIM) + col + dims[None, :], (acc / row_sum[:, None]).to(q_tile.dtype))
    tl.store(lse + head * T + rows, row_max + tl.math.log2(row_sum))


def forward(a, variant):
    """variant: None (train_gpt.py's kernel), ("three loops", tile, max_first, lazy) or ("one loop", tile, branch,
    max_first)."""
    q, k, v = a["q"], a["k"], a["v"]
    out, lse = torch.empty_like(q), q.new_empty(H, T, dtype=torch.float32)
    kind, (block_m, block_n, warps, stages), *flags = variant or ("train_gpt.py", tg.ATTENTION_TILES["forward"])
    kernel = {"train_gpt.py": tg._window_attention_kernel, "three loops": forward_kernel,
              "one loop": forward_one_loop_kernel, "raw select": forward_raw_select_kernel}[kind]
    kernel[(T // block_m, H)](_tiles_of(q, block_m), _tiles_of(k, block_n), _tiles_of(v, block_n), out, lse,
                              a["starts"], a["window_blocks"], T, QK_SCALE, H, HEAD_DIM, tg.BLOCK_SIZE, block_m,
                              block_n, *flags, num_warps=warps, num_stages=stages)
    return out, lse


def grad_q(a, variant):
    """variant: None (train_gpt.py's delta kernel, then its kernel over query tiles), ("fused delta", by pointer
    loads or not) or ("one loop", branch): one kernel computing the row sums too."""
    q, k, v, grad_out, out, lse = a["q"], a["k"], a["v"], a["grad_out"], a["out"], a["lse"]
    delta, result = torch.empty_like(lse), torch.empty_like(q)
    block_m, block_n, warps, stages = tg.ATTENTION_TILES["grad_q"]
    descs = [_tiles_of(q, block_m), _tiles_of(k, block_n), _tiles_of(v, block_n), _tiles_of(grad_out, block_m)]
    tail = (a["starts"], a["window_blocks"], result, T, QK_SCALE, tg.ATTENTION_SCALE, H, HEAD_DIM, tg.BLOCK_SIZE,
            block_m, block_n)
    opts = dict(num_warps=warps, num_stages=stages)
    if variant is None:
        tg._attention_delta_kernel[(T // tg.BLOCK_SIZE, H)](out, grad_out, delta, T, H, HEAD_DIM, tg.BLOCK_SIZE)
        tg._window_attention_grad_q_kernel[(T // block_m, H)](*descs, lse, delta, *tail, **opts)
    elif variant[0] == "fused delta":
        grad_q_delta_kernel[(T // block_m, H)](*descs, grad_out, out, lse, delta, *tail, not variant[1], **opts)
    else:
        grad_q_one_loop_kernel[(T // block_m, H)](*descs, out, lse, delta, *tail, variant[1], **opts)
    return result, delta


def grad_kv(a, variant):
    """variant: None (train_gpt.py's kernel over key tiles) or ("one loop", branch)."""
    q, k, v, grad_out, lse, delta = a["q"], a["k"], a["v"], a["grad_out"], a["lse"], a["delta"]
    grad_k, grad_v = torch.empty_like(k), torch.empty_like(v)
    block_m, block_n, warps, stages = tg.ATTENTION_TILES["grad_kv"]
    args = (_tiles_of(q, block_m), _tiles_of(k, block_n), _tiles_of(v, block_n), _tiles_of(grad_out, block_m), lse,
            delta, a["ends"], a["window_blocks"], grad_k, grad_v, T, QK_SCALE, tg.ATTENTION_SCALE, H, HEAD_DIM,
            tg.BLOCK_SIZE, block_m, block_n)
    opts = dict(num_warps=warps, num_stages=stages)
    if variant is None:
        tg._window_attention_grad_kv_kernel[(T // block_n, H)](*args, **opts)
    else:
        grad_kv_one_loop_kernel[(T // block_n, H)](*args, variant[1], **opts)
    return grad_k, grad_v


TILE = tg.ATTENTION_TILES["forward"]
FORWARD = {"train_gpt.py's forward": None,  # sweep 1 ran max_first and the lazy ones, sweep 2 added the rest
           "max_first": ("three loops", TILE, True, False),
           "lazy": ("three loops", TILE, False, True),
           "max_first + lazy": ("three loops", TILE, True, True),
           "max_first + lazy, 64x32x4x3": ("three loops", (64, 32, 4, 3), True, True),
           "one loop, masks everywhere": ("one loop", TILE, False, False),
           "one loop, masks where needed": ("one loop", TILE, True, False),
           "one loop, masks where needed, max_first": ("one loop", TILE, True, True),
           "one loop, masks where needed, max_first, 64x32x4x3": ("one loop", (64, 32, 4, 3), True, True),
           "one loop, raw scores masked everywhere": ("raw select", TILE, False),
           "one loop, raw scores masked where needed": ("raw select", TILE, True),
           "one loop, raw scores masked where needed, 64x32x4x3": ("raw select", (64, 32, 4, 3), True)}
GRAD_Q = {"train_gpt.py's delta kernel + grad_q kernel": None,
          "fused delta, grad_out by pointer loads": ("fused delta", True),
          "fused delta, grad_out from the descriptor's tile": ("fused delta", False),
          "fused delta, one loop, masks everywhere": ("one loop", False),
          "fused delta, one loop, masks where needed": ("one loop", True)}
GRAD_KV = {"train_gpt.py's grad_kv kernel": None,
           "one loop, masks everywhere": ("one loop", False),
           "one loop, masks where needed": ("one loop", True)}


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    chosen = sys.argv[2].split(",") if len(sys.argv) > 2 else [""]
    docs = documents(T)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, grad_out = (torch.randn(1, T, H, HEAD_DIM, device="cuda", generator=gen).bfloat16() for _ in range(4))
    args = {}
    for window in range(1, 15):
        mask = tg.document_windows(docs, torch.tensor(window, dtype=torch.int32, device="cuda"))[0]
        out, lse = tg.window_attention(q, k, v, mask.starts, mask.window_blocks)
        delta = torch.empty_like(lse)
        tg._attention_delta_kernel[(T // tg.BLOCK_SIZE, H)](out, grad_out, delta, T, H, HEAD_DIM, tg.BLOCK_SIZE)
        args[window] = dict(q=q, k=k, v=v, grad_out=grad_out, out=out, lse=lse, delta=delta, **mask._asdict())
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    for kind, fn, variants in (("forward", forward, FORWARD), ("grad_q", grad_q, GRAD_Q),
                               ("grad_kv", grad_kv, GRAD_KV)):
        runnable = []
        for name, variant in variants.items():
            if variant is not None and not any(part in name for part in chosen):
                continue
            try:
                line = f"{name}:"
                for window in (14, 7):
                    expected, got = fn(args[window], None), fn(args[window], variant)
                    line += f" window {window:2d} max |diff| " + " ".join(
                        f"{(x.float() - y.float()).abs().max().item():.2e}" for x, y in zip(got, expected)) + ";"
                print(line, flush=True)
                runnable.append((name, variant, {w: [] for w in args}))
            except Exception as e:
                print(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
        for _ in range(rounds):
            for name, variant, times in runnable:
                for window, a in args.items():
                    times[window].append(median_ms(lambda: fn(a, variant), reps=3, calls=10))
        print(f"\n{kind}: ms a call, median of {rounds} rounds (each the median of 3 x 10 calls queued)")
        print("window " + " ".join(f"{w:6d}" for w in args) + "   a step's worth, mean over windows 1..14")
        baseline = None
        for name, variant, times in runnable:
            ms = {w: sorted(t)[len(t) // 2] for w, t in times.items()}
            step = sum(LONG_LAYERS * ms[w] + SHORT_LAYERS * ms[max(w // 2, 1)] for w in args) / len(args)
            baseline = baseline or step
            print("       " + " ".join(f"{ms[w]:6.3f}" for w in args) + f"   {step:6.3f} ms ({step / baseline:.3f})"
                  f"  {name}", flush=True)
        print(flush=True)


if __name__ == "__main__":
    main()
