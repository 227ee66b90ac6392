"""Does the fused ReLU^2 MLP pay? The two matmuls of an MLP layer that have elementwise work beside them, for one
64K-token sequence at the model's shapes, each timed three ways:
- the cuBLAS matmul alone (the floor for the fused kernel);
- as torch.compile makes them without the fused MLP: a cuBLAS matmul, then an inductor kernel;
- train_gpt.py's fused ops: one Gluon matmul that does the elementwise work in its epilogue.
The forward is h = relu(a)^2 for a = norm(x) @ w_fc.T (compiled: norm(x) by an inductor kernel, then the matmul,
and a is kept for the backward; fused: x's row scales applied to the matmul's float32 sums, and only h is stored);
the backward is r grad_a = r (grad_y @ w_proj) * 2 relu(a) (compiled from a; fused from h, as relu_of_square). Also
prints how many output values differ from the compiled path's, and by how much: the fused forward rounds once where
the compiled one rounds norm(x) too; the backward rounds as the compiled one (the matmul to bf16, the epilogue
computes in float32 and rounds once).

Each time is the median over 10 rounds of 20 calls queued back to back, per call, as in training, where the
CPU runs ahead of the GPU (a lone call would count its launch latency in).

With --tiles= (tiles as rows x columns x depth x stages, comma separated), the fused ops also at each of those
MLP_MATMUL settings, with how many values differ from the compiled path's.

Usage: python benchmarks/mlp_epilogue_bench.py [--tiles=64x256x64x4,128x128x64x5]
"""
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from matmul_peak import median_ms  # noqa: E402
import train_gpt  # noqa: E402
from train_gpt import matmul_relu2, matmul_relu2_grad, row_scale, scaled  # noqa: E402

T, D, H = 64 * 1024, 768, 4 * 768


@torch.compile(dynamic=False)
def forward_compiled(x, r, w_fc):
    a = scaled(x, r) @ w_fc.T
    return a, torch.relu(a).square()


@torch.compile(dynamic=False)
def backward_compiled(grad_y, w_proj, a, r):
    return ((grad_y @ w_proj).float() * 2 * torch.relu(a).float() * r).bfloat16()


def differ(a: torch.Tensor, b: torch.Tensor) -> str:
    return f"{(a != b).sum().item()} of {a.numel()} values differ, max {(a.float() - b.float()).abs().max().item():.3g}"


def main():
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, D, device="cuda", generator=gen).bfloat16()
    grad_y = (1e-3 * torch.randn(T, D, device="cuda", generator=gen)).bfloat16()
    w_fc = (0.02 * torch.randn(H, D, device="cuda", generator=gen)).bfloat16()  # (out, in), as nn.Linear
    w_proj = (0.02 * torch.randn(D, H, device="cuda", generator=gen)).bfloat16()
    r = row_scale(x)
    flop = 2 * T * D * H

    def report(name, fn):
        ms = median_ms(fn, reps=10, calls=20)
        print(f"{ms:7.3f} ms  {flop / ms / 1e9:4.0f} TFLOP/s  {name}", flush=True)

    a, h = forward_compiled(x, r, w_fc)
    print(f"forward: h: {differ(matmul_relu2(x, w_fc, r), h)}")
    report("forward, cuBLAS matmul alone", lambda: x @ w_fc.T)
    report("forward, compiled: norm kernel + matmul + relu^2 kernel", lambda: forward_compiled(x, r, w_fc))
    report("forward, fused: Gluon matmul with relu^2 epilogue", lambda: matmul_relu2(x, w_fc, r))

    grad_a = backward_compiled(grad_y, w_proj, a, r)
    print(f"backward: grad_a: {differ(matmul_relu2_grad(grad_y, w_proj, h, r), grad_a)}")
    report("backward, cuBLAS matmul alone", lambda: grad_y @ w_proj)
    report("backward, compiled: matmul + relu^2' kernel", lambda: backward_compiled(grad_y, w_proj, a, r))
    report("backward, fused: Gluon matmul with relu^2' epilogue", lambda: matmul_relu2_grad(grad_y, w_proj, h, r))

    committed = train_gpt.MLP_MATMUL
    given = [arg.split("=", 1)[1] for arg in sys.argv[1:] if arg.startswith("--tiles=")]
    for tile in given[-1].split(",") if given else []:
        rows, cols, depth, stages = (int(n) for n in tile.split("x"))
        train_gpt.MLP_MATMUL = train_gpt.Tile((rows, cols, depth), committed.warps, stages)
        print(f"{tile}: forward h: {differ(matmul_relu2(x, w_fc, r), h)}; "
              f"backward grad_a: {differ(matmul_relu2_grad(grad_y, w_proj, h, r), grad_a)}")
        report(f"forward, fused, {tile}", lambda: matmul_relu2(x, w_fc, r))
        report(f"backward, fused, {tile}", lambda: matmul_relu2_grad(grad_y, w_proj, h, r))
    train_gpt.MLP_MATMUL = committed
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)


if __name__ == "__main__":
    main()
