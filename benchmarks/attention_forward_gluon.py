"""A lead set aside (see the speed record's leads table): the windowed attention's forward as a warp-specialised
Gluon kernel for Hopper, two warpgroups of 64 queries a program and one loading warp, beside train_gpt's Triton
forward, at windows 1, 4, 7 and 14 of one 64K-token sequence (6 heads of 128). Prints each variant's time against
the Triton kernel's and the largest difference of their outputs.

Usage: python benchmarks/attention_forward_gluon.py
"""
import sys
from pathlib import Path

import torch
import triton
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_gpt  # noqa: E402
from matmul_peak import median_ms  # noqa: E402
from window_attention_bench import documents  # noqa: E402
from train_gpt import (gluon, gl, mbarrier, tma, fence_async_shared, warpgroup_mma, warpgroup_mma_wait, _tma_load,
                       _tma_store, _gluon_tiles, ATTENTION_SCALE, LOG2E, BLOCK_SIZE)


@gluon.jit
def _attention_key_range(starts, window_blocks, m0, first_row, BLOCK: gl.constexpr, BN: gl.constexpr):
    # the key tiles the queries from first_row to m0 + BLOCK see: from lo (the window's start or the first query's
    # document's tile, whichever is later) to the diagonal tile at m0
    window = gl.maximum(gl.load(window_blocks), 1)
    return gl.maximum((m0 // BLOCK - window + 1) * BLOCK, gl.load(starts + first_row) // BN * BN)


@gluon.jit
def _attention_forward_loads(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_ready, k_ready, k_empty, v_ready,
                             v_empty, starts, window_blocks, HEAD_DIM: gl.constexpr, BLOCK: gl.constexpr,
                             BM: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr):
    # the loading warp: the two query tiles, then the key and value tiles of the program's range, in order
    m0, col = gl.program_id(0) * BLOCK, gl.program_id(1) * HEAD_DIM
    for i in gl.static_range(2):
        mbarrier.expect(q_ready.index(i), q_desc.block_type.nbytes)
        _tma_load(q_desc, [m0 + i * BM, col], q_ready.index(i), q_bufs.index(i))
    count = 0
    for n in range(_attention_key_range(starts, window_blocks, m0, m0, BLOCK, BN), m0 + BLOCK, BN):
        stage, phase = count % STAGES, (count // STAGES & 1) ^ 1
        mbarrier.wait(k_empty.index(stage), phase)
        mbarrier.expect(k_ready.index(stage), k_desc.block_type.nbytes)
        _tma_load(k_desc, [n, col], k_ready.index(stage), k_bufs.index(stage))
        mbarrier.wait(v_empty.index(stage), phase)
        mbarrier.expect(v_ready.index(stage), v_desc.block_type.nbytes)
        _tma_load(v_desc, [n, col], v_ready.index(stage), v_bufs.index(stage))
        count += 1


@gluon.jit
def _attention_forward_consumer(o_desc, lse, starts, window_blocks, q_bufs, k_bufs, v_bufs, q_ready, k_ready,
                                k_empty, v_ready, v_empty, T, qk_scale, HEAD_DIM: gl.constexpr, BLOCK: gl.constexpr,
                                BM: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr, WHICH: gl.constexpr):
    # warpgroup WHICH: the program's WHICH-th tile of BM queries, online softmax over its keys (flash attention's
    # forward, by Tri Dao); tiles before its own range are passed on unread
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    m0, head = gl.program_id(0) * BLOCK, gl.program_id(1)
    first = m0 + WHICH * BM
    rows = first + gl.arange(0, BM, layout=gl.SliceLayout(1, s_layout))
    cols = gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout))
    starts_q = gl.load(starts + rows)
    lo = _attention_key_range(starts, window_blocks, m0, first, BLOCK, BN)
    unmasked = gl.minimum(gl.maximum(lo, (gl.load(starts + first + BM - 1) + BN - 1) // BN * BN), m0)
    acc = gl.zeros((BM, HEAD_DIM), dtype=gl.float32, layout=o_layout)
    row_sum = gl.zeros((BM,), dtype=gl.float32, layout=gl.SliceLayout(1, s_layout))
    row_max = gl.full((BM,), -float("inf"), dtype=gl.float32, layout=gl.SliceLayout(1, s_layout))
    q_tile = q_bufs.index(WHICH)
    mbarrier.wait(q_ready.index(WHICH), 0)
    count = 0
    for n in range(_attention_key_range(starts, window_blocks, m0, m0, BLOCK, BN), m0 + BLOCK, BN):
        stage, phase = count % STAGES, count // STAGES & 1
        mbarrier.wait(k_ready.index(stage), phase)
        if n >= lo:
            scores = warpgroup_mma(q_tile, k_bufs.index(stage).permute((1, 0)),
                                   gl.zeros((BM, BN), dtype=gl.float32, layout=s_layout), use_acc=False)
            mbarrier.arrive(k_empty.index(stage), count=1)
            if (n < unmasked) | (n >= m0):  # -1e6 rather than -inf, as in the Triton kernel
                keys = n + cols
                seen = (keys[None, :] >= starts_q[:, None]) & (keys[None, :] <= rows[:, None])
                scores = gl.where(seen, scores, -1.0e6)
            new_max = gl.maximum(row_max, gl.max(scores, 1) * qk_scale)
            p = gl.exp2(scores * qk_scale - new_max[:, None])
            alpha = gl.exp2(row_max - new_max)
            row_sum = row_sum * alpha + gl.sum(p, 1)
            row_max = new_max
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
            mbarrier.wait(v_ready.index(stage), phase)
            acc = warpgroup_mma(gl.convert_layout(p.to(gl.bfloat16), p_layout), v_bufs.index(stage), acc)
            mbarrier.arrive(v_empty.index(stage), count=1)
        else:
            mbarrier.arrive(k_empty.index(stage), count=1)
            mbarrier.wait(v_ready.index(stage), phase)
            mbarrier.arrive(v_empty.index(stage), count=1)
        count += 1
    out = acc / gl.convert_layout(row_sum, gl.SliceLayout(1, o_layout))[:, None]
    q_tile.store(out.to(gl.bfloat16))
    fence_async_shared()
    _tma_store(o_desc, [first, head * HEAD_DIM], q_tile)
    gl.store(lse + head * T + rows, row_max + gl.log2(row_sum))
    tma.store_wait(0)


@gluon.jit
def _attention_softmax_step(scores, n, rows, cols, starts_q, unmasked, m0, row_max, row_sum, qk_scale):
    if (n < unmasked) | (n >= m0):  # -1e6 rather than -inf, as in the Triton kernel
        keys = n + cols
        seen = (keys[None, :] >= starts_q[:, None]) & (keys[None, :] <= rows[:, None])
        scores = gl.where(seen, scores, -1.0e6)
    new_max = gl.maximum(row_max, gl.max(scores, 1) * qk_scale)
    p = gl.exp2(scores * qk_scale - new_max[:, None])
    alpha = gl.exp2(row_max - new_max)
    return p, alpha, new_max, row_sum * alpha + gl.sum(p, 1)


@gluon.jit
def _attention_forward_overlap(o_desc, lse, starts, window_blocks, q_bufs, k_bufs, v_bufs, q_ready, k_ready,
                               k_empty, v_ready, v_empty, T, qk_scale, HEAD_DIM: gl.constexpr, BLOCK: gl.constexpr,
                               BM: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr, WHICH: gl.constexpr):
    # as _attention_forward_consumer, with the scores of key tile j+1 and the values' matmul of tile j in flight
    # while tile j+1's softmax runs (FlashAttention-3's intra-warpgroup overlap)
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    m0, head = gl.program_id(0) * BLOCK, gl.program_id(1)
    first = m0 + WHICH * BM
    rows = first + gl.arange(0, BM, layout=gl.SliceLayout(1, s_layout))
    cols = gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout))
    starts_q = gl.load(starts + rows)
    lo = _attention_key_range(starts, window_blocks, m0, first, BLOCK, BN)
    unmasked = gl.minimum(gl.maximum(lo, (gl.load(starts + first + BM - 1) + BN - 1) // BN * BN), m0)
    count = 0
    for n in range(_attention_key_range(starts, window_blocks, m0, m0, BLOCK, BN), lo, BN):  # not this tile's
        stage, phase = count % STAGES, count // STAGES & 1
        mbarrier.wait(k_ready.index(stage), phase)
        mbarrier.arrive(k_empty.index(stage), count=1)
        mbarrier.wait(v_ready.index(stage), phase)
        mbarrier.arrive(v_empty.index(stage), count=1)
        count += 1
    q_tile = q_bufs.index(WHICH)
    mbarrier.wait(q_ready.index(WHICH), 0)
    zeros = gl.zeros((BM, BN), dtype=gl.float32, layout=s_layout)
    stage = count % STAGES
    mbarrier.wait(k_ready.index(stage), count // STAGES & 1)
    scores = warpgroup_mma(q_tile, k_bufs.index(stage).permute((1, 0)), zeros, use_acc=False)
    mbarrier.arrive(k_empty.index(stage), count=1)
    row_sum = gl.zeros((BM,), dtype=gl.float32, layout=gl.SliceLayout(1, s_layout))
    row_max = gl.full((BM,), -float("inf"), dtype=gl.float32, layout=gl.SliceLayout(1, s_layout))
    p, alpha, row_max, row_sum = _attention_softmax_step(scores, lo, rows, cols, starts_q, unmasked, m0, row_max,
                                                         row_sum, qk_scale)
    acc = gl.zeros((BM, HEAD_DIM), dtype=gl.float32, layout=o_layout)
    for n in range(lo + BN, m0 + BLOCK, BN):
        last, count = count, count + 1
        stage = count % STAGES
        mbarrier.wait(k_ready.index(stage), count // STAGES & 1)
        scores = warpgroup_mma(q_tile, k_bufs.index(stage).permute((1, 0)), zeros, use_acc=False, is_async=True)
        mbarrier.wait(v_ready.index(last % STAGES), last // STAGES & 1)
        acc = warpgroup_mma(gl.convert_layout(p.to(gl.bfloat16), p_layout), v_bufs.index(last % STAGES), acc,
                            is_async=True)
        scores = warpgroup_mma_wait(num_outstanding=1, deps=(scores,))
        mbarrier.arrive(k_empty.index(stage), count=1)
        p, alpha, row_max, row_sum = _attention_softmax_step(scores, n, rows, cols, starts_q, unmasked, m0, row_max,
                                                             row_sum, qk_scale)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(v_empty.index(last % STAGES), count=1)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    stage = count % STAGES
    mbarrier.wait(v_ready.index(stage), count // STAGES & 1)
    acc = warpgroup_mma(gl.convert_layout(p.to(gl.bfloat16), p_layout), v_bufs.index(stage), acc)
    mbarrier.arrive(v_empty.index(stage), count=1)
    out = acc / gl.convert_layout(row_sum, gl.SliceLayout(1, o_layout))[:, None]
    q_tile.store(out.to(gl.bfloat16))
    fence_async_shared()
    _tma_store(o_desc, [first, head * HEAD_DIM], q_tile)
    gl.store(lse + head * T + rows, row_max + gl.log2(row_sum))
    tma.store_wait(0)


@gluon.jit
def _attention_forward_kernel(q_desc, k_desc, v_desc, o_desc, lse, starts, window_blocks, T, qk_scale,
                              HEAD_DIM: gl.constexpr, BLOCK: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
                              STAGES: gl.constexpr, OVERLAP: gl.constexpr):
    gl.static_assert(2 * BM == BLOCK)
    q_bufs = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    k_bufs = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_bufs = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_ready.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(v_empty.index(i), count=2)
    if OVERLAP:
        gl.warp_specialize([
            (_attention_forward_overlap, (o_desc, lse, starts, window_blocks, q_bufs, k_bufs, v_bufs, q_ready, k_ready,
                                          k_empty, v_ready, v_empty, T, qk_scale, HEAD_DIM, BLOCK, BM, BN, STAGES, 0)),
            (_attention_forward_overlap, (o_desc, lse, starts, window_blocks, q_bufs, k_bufs, v_bufs, q_ready, k_ready,
                                          k_empty, v_ready, v_empty, T, qk_scale, HEAD_DIM, BLOCK, BM, BN, STAGES, 1)),
            (_attention_forward_loads, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_ready, k_ready, k_empty,
                                        v_ready, v_empty, starts, window_blocks, HEAD_DIM, BLOCK, BM, BN, STAGES)),
        ], [4, 1], [240, 24])
    else:
        gl.warp_specialize([
            (_attention_forward_consumer, (o_desc, lse, starts, window_blocks, q_bufs, k_bufs, v_bufs, q_ready, k_ready,
                                           k_empty, v_ready, v_empty, T, qk_scale, HEAD_DIM, BLOCK, BM, BN, STAGES, 0)),
            (_attention_forward_consumer, (o_desc, lse, starts, window_blocks, q_bufs, k_bufs, v_bufs, q_ready, k_ready,
                                           k_empty, v_ready, v_empty, T, qk_scale, HEAD_DIM, BLOCK, BM, BN, STAGES, 1)),
            (_attention_forward_loads, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_ready, k_ready, k_empty,
                                        v_ready, v_empty, starts, window_blocks, HEAD_DIM, BLOCK, BM, BN, STAGES)),
        ], [4, 1], [240, 24])


def attention_forward(q, k, v, starts, window_blocks, BN=128, STAGES=2, OVERLAP=False):
    _, T, H, head_dim = q.shape
    q, k, v = (t.contiguous() for t in (q, k, v))
    out, lse = torch.empty_like(q), q.new_empty(H, T, dtype=torch.float32)
    BM = BLOCK_SIZE // 2
    flat = lambda t: t.view(T, H * head_dim)
    _attention_forward_kernel[(T // BLOCK_SIZE, H)](
        _gluon_tiles(flat(q), [BM, head_dim]), _gluon_tiles(flat(k), [BN, head_dim]),
        _gluon_tiles(flat(v), [BN, head_dim]), _gluon_tiles(flat(out), [BM, head_dim]), lse, starts, window_blocks,
        T, ATTENTION_SCALE * LOG2E, head_dim, BLOCK_SIZE, BM, BN, STAGES, OVERLAP, num_warps=4, maxnreg=168)
    return out, lse


def main():
    T, H, D = 64 * 1024, 6, 128
    docs = documents(T)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, T, H, D, device="cuda", generator=gen).bfloat16() for _ in range(3))
    for window in (1, 4, 7, 14):
        w = torch.tensor(window, dtype=torch.int32, device="cuda")
        for name, mask in zip(("long", "short"), train_gpt.document_windows(docs, w)):
            if name == "short" and window != 14:
                continue
            ref_o, ref_lse = train_gpt._window_attention_triton(q, k, v, mask.starts, mask.window_blocks)
            t_old = median_ms(lambda: train_gpt._window_attention_triton(q, k, v, mask.starts, mask.window_blocks), reps=10, calls=20)
            for bn, stages, ov in ((128, 2, False), (64, 3, False), (128, 2, True), (64, 3, True)):
                try:
                    o, lse = attention_forward(q, k, v, mask.starts, mask.window_blocks, bn, stages, ov)
                    torch.cuda.synchronize()
                    err = (o.float() - ref_o.float()).abs().max().item(); lerr = (lse - ref_lse).abs().max().item()
                    t_new = median_ms(lambda: attention_forward(q, k, v, mask.starts, mask.window_blocks, bn, stages, ov), reps=10, calls=20)
                    print(f"window {window:2d} {name:5s} BN={bn} stages={stages} overlap={ov}: triton {t_old:.3f} ms, gluon {t_new:.3f} ms ({t_new / t_old:.3f}); max |diff| out {err:.3g} lse {lerr:.3g}", flush=True)
                except Exception as e:
                    print(f"window {window} BN={bn} failed: {type(e).__name__} {str(e)[:300]}", flush=True)


if __name__ == "__main__":
    main()
