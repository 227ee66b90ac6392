"""Speed lead 4, round 10: where do the fused ReLU^2 MLP's matmuls lose to cuBLAS, and which Triton kernel shape
gets closer? One 64K-token sequence at the model's shapes, the up-projection with its ReLU^2 epilogue (forward)
and the down-projection's backward with ReLU^2's derivative (backward), each variant checked for train_gpt.py's
bits and timed as calls queued back to back (benchmarks/matmul_peak.median_ms).

The variant kernel is train_gpt.py's _matmul_relu2_kernel (as of 4d094c0) with these switches:
- PERSISTENT: one program per SM walking the tiles (train_gpt.py), or one program per tile;
- FLATTEN / WS: the tile loop flattened into the k loop's pipeline, or warp-specialised (a producer warp group
  loads while the others multiply and store), as Triton's persistent-matmul tutorial does;
- TMA_EPILOGUE: the epilogue through shared memory and the tensor-memory accelerator (train_gpt.py), or plain
  stores from registers, which need no shared memory, so more pipeline stages or two programs an SM fit, and
  which the warps issue without waiting for them to land;
- PREFETCH_A: the backward loads its tile of a before the k loop rather than after it.

Usage: python records/2026-12-03_mlp_kernel_x1/mlp_variants.py [SWEEP: 1, 2 or 3, by default the last]
"""
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
from matmul_peak import median_ms  # noqa: E402
from train_gpt import _tile, matmul_relu2, matmul_relu2_grad  # noqa: E402

T, D, H = 64 * 1024, 768, 4 * 768


@triton.jit
def _mainloop(x_desc, w_desc, off_m, off_n, K, W_KN: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
              BK: tl.constexpr):
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K, BK):
        if W_KN:
            acc = tl.dot(x_desc.load([off_m, k]), w_desc.load([k, off_n]), acc)
        else:
            acc = tl.dot(x_desc.load([off_m, k]), w_desc.load([off_n, k]).T, acc)
    return acc


@triton.jit
def _load_a(a_ptr, off_m, off_n, M, N, BM: tl.constexpr, BN: tl.constexpr):
    rows, cols = off_m + tl.arange(0, BM), off_n + tl.arange(0, BN)
    ok = (rows < M)[:, None] & (cols < N)[None, :]
    return tl.load(a_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], mask=ok)


@triton.jit
def _epilogue(acc, a_ptr, out_ptr, a_desc, out_desc, off_m, off_n, M, N, BACKWARD: tl.constexpr, BM: tl.constexpr,
              BN: tl.constexpr, TMA_EPILOGUE: tl.constexpr, PREFETCH_A: tl.constexpr, a_tile):
    y = acc.to(tl.bfloat16)
    if TMA_EPILOGUE:
        if BACKWARD:
            relu_a = tl.maximum(a_desc.load([off_m, off_n]).to(tl.float32), 0.0)
            out_desc.store([off_m, off_n], (y.to(tl.float32) * 2 * relu_a).to(tl.bfloat16))
        else:
            a_desc.store([off_m, off_n], y)
            relu_y = tl.maximum(y.to(tl.float32), 0.0)
            out_desc.store([off_m, off_n], (relu_y * relu_y).to(tl.bfloat16))
    else:
        rows, cols = off_m + tl.arange(0, BM), off_n + tl.arange(0, BN)
        ok = (rows < M)[:, None] & (cols < N)[None, :]
        at = rows.to(tl.int64)[:, None] * N + cols[None, :]
        if BACKWARD:
            if not PREFETCH_A:
                a_tile = tl.load(a_ptr + at, mask=ok)
            relu_a = tl.maximum(a_tile.to(tl.float32), 0.0)
            tl.store(out_ptr + at, (y.to(tl.float32) * 2 * relu_a).to(tl.bfloat16), mask=ok)
        else:
            tl.store(a_ptr + at, y, mask=ok)
            relu_y = tl.maximum(y.to(tl.float32), 0.0)
            tl.store(out_ptr + at, (relu_y * relu_y).to(tl.bfloat16), mask=ok)


@triton.jit
def _variant_kernel(x_ptr, w_ptr, a_ptr, out_ptr, M, N, K, W_KN: tl.constexpr, BACKWARD: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr, NUM_SMS: tl.constexpr,
                    PERSISTENT: tl.constexpr, FLATTEN: tl.constexpr, WS: tl.constexpr, TMA_EPILOGUE: tl.constexpr,
                    PREFETCH_A: tl.constexpr):
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
    if W_KN:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[K, N], strides=[N, 1], block_shape=[BK, BN])
    else:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[K, 1], block_shape=[BN, BK])
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, N], strides=[N, 1], block_shape=[BM, BN])
    out_desc = tl.make_tensor_descriptor(out_ptr, shape=[M, N], strides=[N, 1], block_shape=[BM, BN])
    num_m, num_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    if PERSISTENT:
        tile_c = tl.program_id(0) - NUM_SMS  # the epilogue's own tile counter, as the tutorial keeps it
        for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, flatten=FLATTEN, warp_specialize=WS):
            pid_m, pid_n = _tile(tile, num_m, num_n, GROUP)
            a_tile = 0  # unused unless PREFETCH_A
            if PREFETCH_A:
                a_tile = _load_a(a_ptr, pid_m * BM, pid_n * BN, M, N, BM, BN)
            acc = _mainloop(x_desc, w_desc, pid_m * BM, pid_n * BN, K, W_KN, BM, BN, BK)
            tile_c += NUM_SMS
            pid_m, pid_n = _tile(tile_c, num_m, num_n, GROUP)
            _epilogue(acc, a_ptr, out_ptr, a_desc, out_desc, pid_m * BM, pid_n * BN, M, N, BACKWARD, BM, BN,
                      TMA_EPILOGUE, PREFETCH_A, a_tile)
    else:
        pid_m, pid_n = _tile(tl.program_id(0), num_m, num_n, GROUP)
        acc = _mainloop(x_desc, w_desc, pid_m * BM, pid_n * BN, K, W_KN, BM, BN, BK)
        _epilogue(acc, a_ptr, out_ptr, a_desc, out_desc, pid_m * BM, pid_n * BN, M, N, BACKWARD, BM, BN,
                  TMA_EPILOGUE, False, 0)


def run_variant(cfg: dict, x, w, a, backward: bool):
    """The forward (a and h = relu(a)^2 from x, w (N, K)) or the backward (from grad_y, w (K, N) and a)."""
    M, K = x.shape
    N = w.size(1) if backward else w.size(0)
    out = x.new_empty(M, N)
    if not backward:
        a = x.new_empty(M, N)
    num_sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    tiles = triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"])
    grid = (min(num_sms, tiles) if cfg["persistent"] else tiles,)
    _variant_kernel[grid](x, w, a, out, M, N, K, backward, backward, cfg["BM"], cfg["BN"], cfg["BK"], cfg["group"],
                          grid[0], cfg["persistent"], cfg["flatten"], cfg["ws"], cfg["tma"], cfg["prefetch"] and backward,
                          num_warps=cfg["warps"], num_stages=cfg["stages"])
    return out if backward else (a, out)


def config(name, BM=128, BN=256, BK=64, stages=3, warps=8, persistent=True, flatten=False, ws=False, tma=True,
           group=8, prefetch=False):
    return name, dict(BM=BM, BN=BN, BK=BK, stages=stages, warps=warps, persistent=persistent, flatten=flatten, ws=ws,
                      tma=tma, group=group, prefetch=prefetch)


# The first sweep (mlp_variants_1.txt) ran every variant of the first block; the second (mlp_variants_2.txt) the
# second block, around the first sweep's fastest: flattened for the forward, 4 stages for the backward. Their
# spread (the same variant 0.05 ms apart between them) asked for the third (mlp_variants_3.txt): the finalists,
# timed in turns, 15 rounds.
SWEEPS = [[
    config("train_gpt.py's shape: persistent 128x256x64, 3 stages, 8 warps, TMA epilogue"),
    config("persistent, register epilogue", tma=False),
    config("persistent, register epilogue, 4 stages", tma=False, stages=4),
    config("persistent, register epilogue, group 1", tma=False, group=1),
    config("persistent flattened, register epilogue", tma=False, flatten=True),
    config("persistent flattened, register epilogue, 4 stages", tma=False, flatten=True, stages=4),
    config("persistent warp-specialised, TMA epilogue", ws=True),
    config("persistent warp-specialised, register epilogue", ws=True, tma=False),
    config("persistent warp-specialised, register epilogue, 4 stages", ws=True, tma=False, stages=4),
    config("persistent warp-specialised 128x128, 4 warps, 4 stages", BN=128, warps=4, stages=4, ws=True),
    config("a program a tile 128x256, register epilogue", persistent=False, tma=False),
    config("a program a tile 128x128, 2 stages, 4 warps, register epilogue (2 programs an SM)", BN=128, stages=2,
           warps=4, persistent=False, tma=False),
    config("a program a tile 128x128, 3 stages, 4 warps, register epilogue (2 programs an SM)", BN=128, stages=3,
           warps=4, persistent=False, tma=False),
    config("a program a tile 128x128, 2 stages, 8 warps, register epilogue (2 programs an SM)", BN=128, stages=2,
           warps=8, persistent=False, tma=False),
    config("persistent 128x256x32, 6 stages, register epilogue", BK=32, stages=6, tma=False),
], [
    config("train_gpt.py's shape: persistent 128x256x64, 3 stages, 8 warps, TMA epilogue"),
    config("persistent flattened, TMA epilogue", flatten=True),
    config("persistent flattened, register epilogue", tma=False, flatten=True),
    config("persistent flattened, register epilogue, group 1", tma=False, flatten=True, group=1),
    config("persistent flattened, register epilogue, group 4", tma=False, flatten=True, group=4),
    config("persistent flattened, register epilogue, 2 stages", tma=False, flatten=True, stages=2),
    config("persistent flattened 128x256x32, 6 stages, register epilogue", BK=32, stages=6, tma=False, flatten=True),
    config("persistent flattened, register epilogue, a prefetched", tma=False, flatten=True, prefetch=True),
    config("persistent flattened, register epilogue, 4 stages, a prefetched", tma=False, flatten=True, stages=4,
           prefetch=True),
    config("persistent, register epilogue, 4 stages", tma=False, stages=4),
    config("persistent, register epilogue, 4 stages, group 1", tma=False, stages=4, group=1),
    config("persistent, register epilogue, 4 stages, a prefetched", tma=False, stages=4, prefetch=True),
    config("persistent, register epilogue, 3 stages, a prefetched", tma=False, prefetch=True),
    config("persistent 128x256x32, 8 stages, register epilogue, a prefetched", BK=32, stages=8, tma=False,
           prefetch=True),
], [
    config("train_gpt.py's shape before: persistent 128x256x64, 3 stages, 8 warps, TMA epilogue"),
    config("persistent flattened, register epilogue", tma=False, flatten=True),
    config("persistent flattened, register epilogue, group 4", tma=False, flatten=True, group=4),
    config("persistent flattened, register epilogue, group 1", tma=False, flatten=True, group=1),
    config("persistent, register epilogue, 4 stages", tma=False, stages=4),
    config("persistent, register epilogue, 4 stages, group 4", tma=False, stages=4, group=4),
]]
ROUNDS = [1, 1, 15]  # the first two sweeps timed each variant once


def differ(got: torch.Tensor, expected: torch.Tensor) -> str:
    n = (got != expected).sum().item()
    return "same bits" if n == 0 else f"{n} of {got.numel()} values differ"


def main():
    sweep = int(sys.argv[1]) if len(sys.argv) > 1 else len(SWEEPS)
    device = "cuda"
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=device))
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(T, D, device=device, generator=gen).bfloat16()
    grad_y = (1e-3 * torch.randn(T, D, device=device, generator=gen)).bfloat16()
    w_fc = (0.02 * torch.randn(H, D, device=device, generator=gen)).bfloat16()
    w_proj = (0.02 * torch.randn(D, H, device=device, generator=gen)).bfloat16()
    flop = 2 * T * D * H
    a_ref, h_ref = matmul_relu2(x, w_fc)
    grad_a_ref = matmul_relu2_grad(grad_y, w_proj, a_ref)
    fwd_check = lambda out: f"a: {differ(out[0], a_ref)}, h: {differ(out[1], h_ref)}"  # noqa: E731
    bwd_check = lambda out: f"grad_a: {differ(out, grad_a_ref)}"  # noqa: E731
    candidates = [("forward ", "cuBLAS matmul alone (no epilogue)", lambda: x @ w_fc.T, lambda out: "-"),
                  ("forward ", "train_gpt.py's op", lambda: matmul_relu2(x, w_fc), fwd_check),
                  ("backward", "cuBLAS matmul alone (no epilogue)", lambda: grad_y @ w_proj, lambda out: "-"),
                  ("backward", "train_gpt.py's op", lambda: matmul_relu2_grad(grad_y, w_proj, a_ref), bwd_check)]
    for name, cfg in SWEEPS[sweep - 1]:
        candidates.append(("forward ", name, lambda cfg=cfg: run_variant(cfg, x, w_fc, None, False), fwd_check))
        candidates.append(("backward", name, lambda cfg=cfg: run_variant(cfg, grad_y, w_proj, a_ref, True),
                           bwd_check))
    runnable = []
    for direction, name, fn, check in candidates:
        try:
            start = time.perf_counter()
            verdict = check(fn())
            torch.cuda.synchronize()
            print(f"{direction} {name}: {verdict}; first call {time.perf_counter() - start:.1f} s", flush=True)
            runnable.append((direction, name, fn, []))
        except Exception as e:  # a variant that does not compile or run here is a finding too
            print(f"{direction} {name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
    # Each round times every variant once, in turn, so that a drift of the GPU's clocks reaches all of them alike
    for _ in range(ROUNDS[sweep - 1]):
        for direction, name, fn, times in runnable:
            times.append(median_ms(fn, reps=10, calls=20))
    print(f"\nms a call, median of {ROUNDS[sweep - 1]} rounds (each the median of 10 x 20 calls queued), fastest first:")
    for direction, name, fn, times in sorted(runnable, key=lambda r: (r[0], sorted(r[3])[len(r[3]) // 2])):
        ms = sorted(times)[len(times) // 2]
        print(f"{direction} {ms:7.3f} ms ({min(times):.3f} to {max(times):.3f}) {flop / ms / 1e9:4.0f} TFLOP/s  {name}")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)


if __name__ == "__main__":
    main()
