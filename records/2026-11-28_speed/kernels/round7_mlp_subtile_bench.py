"""Speed lead 4: train_gpt.py's fused ReLU^2 MLP matmul with its epilogue stored (and, in the backward, a loaded)
in two halves of 128 x 128 instead of one 128 x 256 tile, so that less shared memory is held for the epilogue and a
fourth pipeline stage may fit. Times each variant against train_gpt.py's fused ops and the cuBLAS matmul alone,
one 64K-token sequence at the model's shapes, and checks that every variant gives train_gpt.py's bits.
Its kernel is train_gpt.py's _matmul_relu2_kernel (as of 2abafea) with a SUBTILE branch added.

Usage: python records/2026-11-28_speed/kernels/round7_mlp_subtile_bench.py
(TRITON_INTERPRET=1 on a CPU checks the variants against each other at a small size; the interpreter's bf16 values
themselves are not right)
"""
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

REPO = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
import train_gpt  # noqa: E402
from train_gpt import _tile  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _kernel(x_desc, w_desc, a_desc, out_desc, M, N, K, W_KN: tl.constexpr, BACKWARD: tl.constexpr,
            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr, NUM_SMS: tl.constexpr,
            SUBTILE: tl.constexpr):
    num_m, num_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    for tile in range(tl.program_id(0), num_m * num_n, NUM_SMS):
        pid_m, pid_n = _tile(tile, num_m, num_n, GROUP)
        off_m, off_n = pid_m * BM, pid_n * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            if W_KN:
                acc = tl.dot(x_desc.load([off_m, k]), w_desc.load([k, off_n]), acc)
            else:
                acc = tl.dot(x_desc.load([off_m, k]), w_desc.load([off_n, k]).T, acc)
        y = acc.to(tl.bfloat16)
        if SUBTILE:
            y0, y1 = tl.split(tl.permute(tl.reshape(y, (BM, 2, BN // 2)), (0, 2, 1)))
            if BACKWARD:
                r0 = tl.maximum(a_desc.load([off_m, off_n]).to(tl.float32), 0.0)
                out_desc.store([off_m, off_n], (y0.to(tl.float32) * 2 * r0).to(tl.bfloat16))
                r1 = tl.maximum(a_desc.load([off_m, off_n + BN // 2]).to(tl.float32), 0.0)
                out_desc.store([off_m, off_n + BN // 2], (y1.to(tl.float32) * 2 * r1).to(tl.bfloat16))
            else:
                a_desc.store([off_m, off_n], y0)
                r0 = tl.maximum(y0.to(tl.float32), 0.0)
                out_desc.store([off_m, off_n], (r0 * r0).to(tl.bfloat16))
                a_desc.store([off_m, off_n + BN // 2], y1)
                r1 = tl.maximum(y1.to(tl.float32), 0.0)
                out_desc.store([off_m, off_n + BN // 2], (r1 * r1).to(tl.bfloat16))
        elif BACKWARD:
            relu_a = tl.maximum(a_desc.load([off_m, off_n]).to(tl.float32), 0.0)
            out_desc.store([off_m, off_n], (y.to(tl.float32) * 2 * relu_a).to(tl.bfloat16))
        else:
            a_desc.store([off_m, off_n], y)
            relu_y = tl.maximum(y.to(tl.float32), 0.0)
            out_desc.store([off_m, off_n], (relu_y * relu_y).to(tl.bfloat16))


def variant(x, w, a, w_kn: bool, backward: bool, subtile: bool, stages: int, num_sms: int):
    M, K = x.shape
    N = w.size(1) if w_kn else w.size(0)
    BM, BN, BK = 128, 256, 64
    EN = BN // 2 if subtile else BN
    out = x.new_empty(M, N)
    descs = [TensorDescriptor.from_tensor(x, [BM, BK]), TensorDescriptor.from_tensor(w, [BK, BN] if w_kn else [BN, BK]),
             TensorDescriptor.from_tensor(a, [BM, EN]), TensorDescriptor.from_tensor(out, [BM, EN])]
    grid = (min(num_sms, triton.cdiv(M, BM) * triton.cdiv(N, BN)),)
    _kernel[grid](*descs, M, N, K, w_kn, backward, BM, BN, BK, GROUP=8, NUM_SMS=grid[0], SUBTILE=subtile,
                  num_warps=8, num_stages=stages)
    return out


def forward(x, w_fc, **kw):
    a = x.new_empty(x.size(0), w_fc.size(0))
    return a, variant(x, w_fc, a, w_kn=False, backward=False, **kw)


def backward(grad_y, w_proj, a, **kw):
    return variant(grad_y, w_proj, a, w_kn=True, backward=True, **kw)


def main():
    device = "cpu" if INTERPRET else "cuda"
    T, D, H = (256, 128, 512) if INTERPRET else (64 * 1024, 768, 4 * 768)
    num_sms = 4 if INTERPRET else torch.cuda.get_device_properties(0).multi_processor_count
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(T, D, device=device, generator=gen).bfloat16()
    grad_y = (1e-3 * torch.randn(T, D, device=device, generator=gen)).bfloat16()
    w_fc = (0.02 * torch.randn(H, D, device=device, generator=gen)).bfloat16()
    w_proj = (0.02 * torch.randn(D, H, device=device, generator=gen)).bfloat16()
    # the references: train_gpt.py's fused ops; under the interpreter, the variant that is their copy (the CPU's
    # reference bodies accumulate in another order)
    kw0 = dict(subtile=False, stages=3, num_sms=num_sms)
    a_ref, h_ref = forward(x, w_fc, **kw0) if INTERPRET else train_gpt.matmul_relu2(x, w_fc)
    g_ref = backward(grad_y, w_proj, a_ref, **kw0) if INTERPRET else train_gpt.matmul_relu2_grad(grad_y, w_proj, a_ref)
    flop = 2 * T * D * H
    rows = []

    def timed(name, fn):
        if INTERPRET:
            return
        from matmul_peak import median_ms
        ms = median_ms(fn, reps=10, calls=20)
        rows.append(f"{ms:7.3f} ms  {flop / ms / 1e9:4.0f} TFLOP/s  {name}")
        print(rows[-1], flush=True)

    timed("forward, cuBLAS matmul alone", lambda: x @ w_fc.T)
    timed("forward, train_gpt.py's fused op", lambda: train_gpt.matmul_relu2(x, w_fc))
    timed("backward, cuBLAS matmul alone", lambda: grad_y @ w_proj)
    timed("backward, train_gpt.py's fused op", lambda: train_gpt.matmul_relu2_grad(grad_y, w_proj, a_ref))
    for subtile, stages in [(False, 3), (True, 3), (True, 4), (False, 4)]:
        kw = dict(subtile=subtile, stages=stages, num_sms=num_sms)
        name = f"subtile={subtile}, stages={stages}"
        try:
            a, h = forward(x, w_fc, **kw)
            same = torch.equal(a, a_ref) and torch.equal(h, h_ref)
            print(f"forward, {name}: {'the same bits' if same else 'DIFFERENT'}", flush=True)
            timed(f"forward, {name}", lambda: forward(x, w_fc, **kw))
        except Exception as e:  # out of shared memory, above all
            print(f"forward, {name}: {type(e).__name__}: {str(e).splitlines()[0][:150]}", flush=True)
        try:
            same = torch.equal(backward(grad_y, w_proj, a_ref, **kw), g_ref)
            print(f"backward, {name}: {'the same bits' if same else 'DIFFERENT'}", flush=True)
            timed(f"backward, {name}", lambda: backward(grad_y, w_proj, a_ref, **kw))
        except Exception as e:
            print(f"backward, {name}: {type(e).__name__}: {str(e).splitlines()[0][:150]}", flush=True)
    print("\n".join(rows))
    if not INTERPRET:
        print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)


if __name__ == "__main__":
    main()
