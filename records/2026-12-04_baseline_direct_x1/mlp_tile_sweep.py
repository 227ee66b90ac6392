"""The fused MLP's Triton matmul (train_gpt.py's _matmul_relu2_kernel, copied here with switches) at other tiles,
programs per SM and, for the backward, h loaded before the tile's k loop instead of in its epilogue. Each variant
is checked bit for bit against train_gpt.py's op and timed with benchmarks/mlp_epilogue_bench.py's timer.

Usage: python records/2026-12-04_baseline_direct_x1/mlp_tile_sweep.py
(it ran from the repository's root, as a copy there)
"""
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
from matmul_peak import median_ms  # noqa: E402
from train_gpt import _tile, matmul_relu2, matmul_relu2_grad  # noqa: E402

T, D, H = 64 * 1024, 768, 4 * 768


@triton.jit
def _variant_kernel(x_desc, w_desc, h, out, M, N, K, W_KN: tl.constexpr, BACKWARD: tl.constexpr, BM: tl.constexpr,
                    BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr, NUM_SMS: tl.constexpr,
                    FLATTEN: tl.constexpr, PREFETCH: tl.constexpr):
    num_m, num_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    tile_c = tl.program_id(0) - NUM_SMS
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, flatten=FLATTEN):
        pid_m, pid_n = _tile(tile, num_m, num_n, GROUP)
        if PREFETCH:
            rows_p, cols_p = pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN)
            h_tile = tl.load(h + rows_p.to(tl.int64)[:, None] * N + cols_p[None, :])
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            if W_KN:
                acc = tl.dot(x_desc.load([pid_m * BM, k]), w_desc.load([k, pid_n * BN]), acc)
            else:
                acc = tl.dot(x_desc.load([pid_m * BM, k]), w_desc.load([pid_n * BN, k]).T, acc)
        tile_c += NUM_SMS
        pid_m, pid_n = _tile(tile_c, num_m, num_n, GROUP)
        rows, cols = pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN)
        ok = (rows < M)[:, None] & (cols < N)[None, :]
        at = rows.to(tl.int64)[:, None] * N + cols[None, :]
        y = acc.to(tl.bfloat16)
        if BACKWARD:
            if not PREFETCH:
                h_tile = tl.load(h + at, mask=ok)
            relu_a = tl.sqrt(h_tile.to(tl.float32)).to(tl.bfloat16).to(tl.float32)
            tl.store(out + at, (y.to(tl.float32) * 2 * relu_a).to(tl.bfloat16), mask=ok)
        else:
            relu_y = tl.maximum(y.to(tl.float32), 0.0)
            tl.store(out + at, (relu_y * relu_y).to(tl.bfloat16), mask=ok)


def variant(x, w, h, w_kn, BM, BN, BK, warps, stages, per_sm, flatten, prefetch):
    M, K = x.shape
    N = w.size(1) if w_kn else w.size(0)
    out = x.new_empty(M, N)
    descs = [TensorDescriptor.from_tensor(x, [BM, BK]), TensorDescriptor.from_tensor(w, [BK, BN] if w_kn else [BN, BK])]
    num_sms = torch.cuda.get_device_properties(x.device).multi_processor_count * per_sm
    grid = (min(num_sms, triton.cdiv(M, BM) * triton.cdiv(N, BN)),)
    backward = h is not None
    _variant_kernel[grid](*descs, h if backward else out, out, M, N, K, w_kn, backward, BM, BN, BK, GROUP=8,
                          NUM_SMS=grid[0], FLATTEN=flatten, PREFETCH=prefetch, num_warps=warps, num_stages=stages)
    return out


def main():
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, D, device="cuda", generator=gen).bfloat16()
    grad_y = (1e-3 * torch.randn(T, D, device="cuda", generator=gen)).bfloat16()
    w_fc = (0.02 * torch.randn(H, D, device="cuda", generator=gen)).bfloat16()
    w_proj = (0.02 * torch.randn(D, H, device="cuda", generator=gen)).bfloat16()
    h = matmul_relu2(x, w_fc)
    grad_a = matmul_relu2_grad(grad_y, w_proj, h)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    # (BM, BN, BK, warps, stages, programs per SM, flatten)
    configs = [(128, 256, 64, 8, 3, 1, True), (128, 256, 64, 8, 3, 1, False), (256, 128, 64, 8, 3, 1, True),
               (128, 128, 64, 8, 3, 2, True), (128, 128, 64, 8, 3, 2, False), (128, 128, 64, 4, 3, 2, True),
               (128, 128, 64, 4, 4, 2, False), (128, 128, 64, 8, 4, 1, True), (128, 256, 32, 8, 5, 1, True),
               (128, 128, 128, 8, 2, 2, False)]
    for turn in (1, 2):
        print(f"turn {turn}: op as committed: forward "
              f"{median_ms(lambda: matmul_relu2(x, w_fc), reps=10, calls=20):.3f} ms, backward "
              f"{median_ms(lambda: matmul_relu2_grad(grad_y, w_proj, h), reps=10, calls=20):.3f} ms", flush=True)
        for config in configs:
            for backward, prefetch in [(False, False), (True, False), (True, True)]:
                name = f"turn {turn} {'backward' if backward else 'forward '} {config}{' h first' if prefetch else ''}"
                try:
                    if backward:
                        fn = lambda: variant(grad_y, w_proj, h, True, *config, prefetch)  # noqa: E731
                        same = torch.equal(fn(), grad_a)
                    else:
                        fn = lambda: variant(x, w_fc, None, False, *config, prefetch)  # noqa: E731
                        same = torch.equal(fn(), h)
                    print(f"{name}: {median_ms(fn, reps=10, calls=20):.3f} ms  same bits: {same}", flush=True)
                except Exception as e:  # noqa: BLE001 (a variant that does not fit is reported, not fatal)
                    print(f"{name}: {type(e).__name__}: {str(e)[:100]}", flush=True)


if __name__ == "__main__":
    main()
