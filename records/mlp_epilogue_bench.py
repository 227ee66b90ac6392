"""Would a fused ReLU^2 MLP pay? The two matmuls of an MLP layer that have elementwise work beside them, for one
64K-token sequence at the model's shapes. Each runs two ways: as torch.compile makes it today (a cuBLAS matmul,
then an inductor kernel), and as one Triton matmul that does the elementwise work in its epilogue:
- forward: a = x @ w_fc.T and h = relu(a)^2; a is kept for the backward, and h feeds the down-projection;
- backward: grad_a = (grad_y @ w_proj) * 2 relu(a).
Prints the median ms of each, of the cuBLAS matmul alone, and how many output values differ from the compiled
path. The same rounding is intended: the matmul rounds to bf16, the epilogue computes in float32 and rounds once.
The fused matmul runs as one program per output tile (autotuned over CONFIGS), and as a persistent kernel: one
program per SM that walks its tiles, so that a tile's epilogue can overlap the next tile's loads (each config of
PERSISTENT, timed one by one).

Usage: python records/mlp_epilogue_bench.py
"""
import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from matmul_peak import median_ms

T, D, H = 64 * 1024, 768, 4 * 768


def _block_shapes(nargs):  # the descriptors' block shapes follow the config that autotuning tries
    BM, BN, BK = nargs["BM"], nargs["BN"], nargs["BK"]
    nargs["x_desc"].block_shape = [BM, BK]
    nargs["w_desc"].block_shape = [BK, BN] if nargs["W_KN"] else [BN, BK]
    nargs["pre_desc"].block_shape = nargs["out_desc"].block_shape = [BM, BN]


CONFIGS = [triton.Config(dict(BM=bm, BN=bn, BK=64, GROUP=8), num_stages=stages, num_warps=warps,
                         pre_hook=_block_shapes)
           for bm, bn, stages, warps in [(128, 256, 3, 8), (128, 256, 4, 8), (128, 128, 4, 8), (128, 128, 3, 4),
                                         (256, 128, 3, 8), (128, 128, 5, 8)]]


@triton.autotune(configs=CONFIGS, key=["M", "N", "K", "W_KN", "BACKWARD"])
@triton.jit
def _matmul_epilogue(x_desc, w_desc, pre_desc, out_desc, M, N, K, W_KN: tl.constexpr, BACKWARD: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
    # y = x @ w (w stored (K, N): W_KN) or x @ w.T (w stored (N, K)), rounded to bf16. Forward: stores y as
    # pre and relu(y)^2 as out. Backward: loads pre and stores y * 2 relu(pre) as out.
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    first_m = pid // (GROUP * num_n) * GROUP  # GROUP row-blocks at a time, for reuse of w in L2
    rows = min(num_m - first_m, GROUP)
    pid_m = first_m + (pid % (GROUP * num_n)) % rows
    pid_n = (pid % (GROUP * num_n)) // rows
    off_m, off_n = pid_m * BM, pid_n * BN
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K, BK):
        x = x_desc.load([off_m, k])
        if W_KN:
            acc = tl.dot(x, w_desc.load([k, off_n]), acc)
        else:
            acc = tl.dot(x, w_desc.load([off_n, k]).T, acc)
    y = acc.to(tl.bfloat16)
    if BACKWARD:
        a = pre_desc.load([off_m, off_n]).to(tl.float32)
        out_desc.store([off_m, off_n], (y.to(tl.float32) * 2 * tl.maximum(a, 0.0)).to(tl.bfloat16))
    else:
        pre_desc.store([off_m, off_n], y)
        r = tl.maximum(y.to(tl.float32), 0.0)
        out_desc.store([off_m, off_n], (r * r).to(tl.bfloat16))


@triton.jit
def _tile(tile_id, num_m, num_n, GROUP: tl.constexpr):
    per_group = GROUP * num_n  # GROUP row-blocks at a time, for reuse of w in L2
    first_m = tile_id // per_group * GROUP
    rows = min(num_m - first_m, GROUP)
    return first_m + (tile_id % per_group) % rows, (tile_id % per_group) // rows


@triton.jit
def _matmul_epilogue_persistent(x_desc, w_desc, pre_desc, out_desc, M, N, K, W_KN: tl.constexpr,
                                BACKWARD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                                GROUP: tl.constexpr, NUM_SMS: tl.constexpr, FLATTEN: tl.constexpr):
    start = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    tile_out = start - NUM_SMS
    for tile_id in tl.range(start, num_m * num_n, NUM_SMS, flatten=FLATTEN):
        pid_m, pid_n = _tile(tile_id, num_m, num_n, GROUP)
        off_m, off_n = pid_m * BM, pid_n * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            x = x_desc.load([off_m, k])
            if W_KN:
                acc = tl.dot(x, w_desc.load([k, off_n]), acc)
            else:
                acc = tl.dot(x, w_desc.load([off_n, k]).T, acc)
        # the epilogue's tile recomputed from its own counter, as Triton's persistent matmul tutorial does, so
        # that the flattened loop's pipeliner carries no offsets from the loads across iterations
        tile_out += NUM_SMS
        pid_m, pid_n = _tile(tile_out, num_m, num_n, GROUP)
        off_m, off_n = pid_m * BM, pid_n * BN
        y = acc.to(tl.bfloat16)
        if BACKWARD:
            a = pre_desc.load([off_m, off_n]).to(tl.float32)
            out_desc.store([off_m, off_n], (y.to(tl.float32) * 2 * tl.maximum(a, 0.0)).to(tl.bfloat16))
        else:
            pre_desc.store([off_m, off_n], y)
            r = tl.maximum(y.to(tl.float32), 0.0)
            out_desc.store([off_m, off_n], (r * r).to(tl.bfloat16))


NUM_SMS = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 1
# (BM, BN, stages, warps, flatten)
PERSISTENT = [(bm, bn, stages, warps, flatten) for flatten in (True, False)
              for bm, bn, stages, warps in [(128, 128, 3, 4), (128, 128, 4, 8), (128, 256, 3, 8), (128, 256, 4, 8)]]


def matmul_epilogue_persistent(x, w, pre, w_kn: bool, backward: bool, config) -> torch.Tensor:
    BM, BN, stages, warps, flatten = config
    M, K = x.shape
    N = w.size(1) if w_kn else w.size(0)
    out = x.new_empty(M, N)
    BK = 64
    descs = [TensorDescriptor.from_tensor(x, [BM, BK]),
             TensorDescriptor.from_tensor(w, [BK, BN] if w_kn else [BN, BK]),
             TensorDescriptor.from_tensor(pre, [BM, BN]), TensorDescriptor.from_tensor(out, [BM, BN])]
    grid = (min(NUM_SMS, triton.cdiv(M, BM) * triton.cdiv(N, BN)),)
    _matmul_epilogue_persistent[grid](*descs, M, N, K, w_kn, backward, BM, BN, BK, 8, NUM_SMS, flatten,
                                      num_warps=warps, num_stages=stages)
    return out


def matmul_epilogue(x: torch.Tensor, w: torch.Tensor, pre: torch.Tensor, w_kn: bool, backward: bool) -> torch.Tensor:
    M, K = x.shape
    N = w.size(1) if w_kn else w.size(0)
    out = x.new_empty(M, N)
    descs = [TensorDescriptor.from_tensor(t, [1, 1]) for t in (x, w, pre, out)]  # block shapes: _block_shapes

    def grid(meta):
        return (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)

    _matmul_epilogue[grid](*descs, M, N, K, w_kn, backward)
    return out


@torch.compile(dynamic=False)
def forward_compiled(x, w_fc):
    a = x @ w_fc.T
    return a, torch.relu(a).square()


@torch.compile(dynamic=False)
def backward_compiled(grad_y, w_proj, a):
    return (grad_y @ w_proj) * 2 * torch.relu(a)


def differ(a: torch.Tensor, b: torch.Tensor) -> str:
    return f"{(a != b).sum().item()} of {a.numel()} values differ, max {(a.float() - b.float()).abs().max().item():.3g}"


def main():
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, D, device="cuda", generator=gen).bfloat16()
    grad_y = (1e-3 * torch.randn(T, D, device="cuda", generator=gen)).bfloat16()
    w_fc = (0.02 * torch.randn(H, D, device="cuda", generator=gen)).bfloat16()  # (out, in), as nn.Linear
    w_proj = (0.02 * torch.randn(D, H, device="cuda", generator=gen)).bfloat16()
    flop = 2 * T * D * H

    def report(name, fn):
        ms = median_ms(fn, reps=50)
        print(f"{ms:7.3f} ms  {flop / ms / 1e9:4.0f} TFLOP/s  {name}", flush=True)

    a, h = forward_compiled(x, w_fc)
    pre = torch.empty_like(a)
    h_fused = matmul_epilogue(x, w_fc, pre, w_kn=False, backward=False)
    print(f"forward: a: {differ(pre, a)}; h: {differ(h_fused, h)}")
    report("forward, cuBLAS matmul alone", lambda: x @ w_fc.T)
    report("forward, compiled: matmul + relu^2 kernel", lambda: forward_compiled(x, w_fc))
    report("forward, Triton matmul with relu^2 epilogue", lambda: matmul_epilogue(x, w_fc, pre, False, False))
    for config in PERSISTENT:
        try:
            pre_p = torch.full_like(a, float("nan"))
            h_p = matmul_epilogue_persistent(x, w_fc, pre_p, False, False, config)
            print(f"  persistent {config}: a: {differ(pre_p, a)}; h: {differ(h_p, h)}")
            report(f"forward, persistent {config}",
                   lambda: matmul_epilogue_persistent(x, w_fc, pre_p, False, False, config))
        except Exception as e:  # a config that does not compile or fit in shared memory
            print(f"  persistent {config}: {type(e).__name__}: {str(e)[:200]}")

    grad_a = backward_compiled(grad_y, w_proj, a)
    grad_a_fused = matmul_epilogue(grad_y, w_proj, a, w_kn=True, backward=True)
    print(f"backward: grad_a: {differ(grad_a_fused, grad_a)}")
    report("backward, cuBLAS matmul alone", lambda: grad_y @ w_proj)
    report("backward, compiled: matmul + relu^2' kernel", lambda: backward_compiled(grad_y, w_proj, a))
    report("backward, Triton matmul with relu^2' epilogue", lambda: matmul_epilogue(grad_y, w_proj, a, True, True))
    for config in PERSISTENT:
        try:
            grad_a_p = matmul_epilogue_persistent(grad_y, w_proj, a, True, True, config)
            print(f"  persistent {config}: grad_a: {differ(grad_a_p, grad_a)}")
            report(f"backward, persistent {config}",
                   lambda: matmul_epilogue_persistent(grad_y, w_proj, a, True, True, config))
        except Exception as e:
            print(f"  persistent {config}: {type(e).__name__}: {str(e)[:200]}")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    print("autotuned:", {str(k): str(v) for k, v in _matmul_epilogue.cache.items()})


if __name__ == "__main__":
    main()
