"""The attention's output projection with the residual add and the next row scale (custom op speedrun::matmul_residual
and ResidualProjection, which residual_projection_fused runs, and bind_ops binds with the attention block's kernels)
against the plain path it replaces, residual_projection_reference through autograd:
- the op passes torch.library.opcheck;
- its sum is the plain path's (on the CPU bit for bit; on a GPU within a bf16 step of each term, where the two
  matmuls may round the product apart), and its row scale that sum's, within float32 sums' reordering;
- the gradients of x, y and w, through the sum and the row scale, are the plain path's within a bf16 step of their
  largest value (the fused backward rounds r's share and the sum's gradient once, the plain path twice);
- on a Hopper GPU, at a shape where the two warpgroups of the Gluon matmul share its ring, the kernel's sum is
  within a bf16 step of float64's (the product rounded to bf16, then the sum) and its row sums of squares are
  those of its own sum."""
import pytest
import torch

import train_gpt
from test_fused_mlp import bf16, devices
from train_gpt import matmul_residual, residual_projection_fused, residual_projection_reference, row_scale


@pytest.mark.parametrize("device", devices())
def test_op_passes_opcheck(device):
    # the GPU kernel wants multiples of its 128-row blocks; the CPU takes any shape
    n, d = 256, 256
    torch.library.opcheck(matmul_residual, (bf16(n, d, device=device), bf16(d, d, scale=0.1, device=device, seed=1),
                                            bf16(n, d, device=device, seed=2)))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("seed", range(3))
def test_fused_is_the_plain_path(device, seed):
    n, d = 256, 192  # the last tile of columns half full
    x, y, w = (bf16(2, n // 2, d, device=device, seed=seed), bf16(2, n // 2, d, device=device, seed=seed + 3),
               bf16(d, d, scale=0.1, device=device, seed=seed + 6))
    grad_out = bf16(2, n // 2, d, device=device, seed=seed + 9)
    grad_r = bf16(2, n // 2, 1, device=device, seed=seed + 12).float()

    def run(residual_projection):
        inputs = [t.clone().requires_grad_() for t in (x, y, w)]
        out, r = residual_projection(*inputs)
        torch.autograd.backward([out, r], [grad_out, grad_r])
        return out, r, [t.grad for t in inputs]

    out, r, grads = run(residual_projection_fused)
    plain_out, plain_r, plain_grads = run(residual_projection_reference)
    if device == "cpu":
        assert torch.equal(out, plain_out)
    else:
        product = y.double() @ w.double().T
        assert ((out.double() - plain_out.double()).abs() <= 2**-7 * (x.double().abs() + product.abs())).all()
    torch.testing.assert_close(r, row_scale(out), rtol=1e-5, atol=0)  # its own sum's, the squares added apart
    for name, grad, expected in zip("xyw", grads, plain_grads):
        torch.testing.assert_close(grad, expected, rtol=0, atol=2**-7 * expected.abs().max().item(), msg=name)


def assert_sum_and_squares_as_float64(y, w, x, out, squares):
    """out within a bf16 step of x + y @ w.T (the product rounded to bf16 first: a step of each term), squares the
    float64 sums of out's squares over each tile of columns."""
    product = y.double() @ w.double().T
    bar = 2**-7 * (x.double().abs() + product.abs()) + 2**-126
    assert ((out.double() - (x.double() + product)).abs() <= bar).all()
    block_n = train_gpt.RESIDUAL_MATMUL.block[1]
    padded = torch.nn.functional.pad(out.double().square(), (0, -out.size(1) % block_n))
    expected = padded.view(out.size(0), -1, block_n).sum(-1).T
    torch.testing.assert_close(squares.double(), expected, rtol=1e-5, atol=0)


@pytest.mark.skipif("cuda" not in devices(), reason="needs a Hopper GPU with Triton's Gluon")
def test_kernel_with_many_tiles_and_steps_a_program():
    (block_m, block_n, block_k), _, stages = train_gpt.RESIDUAL_MATMUL
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    n, d = 3 * sms * block_m, 6 * block_n  # 18 tiles a program; 12 steps along K, more than the ring's stages
    y, w, x = bf16(n, d, device="cuda"), bf16(d, d, scale=0.05, device="cuda", seed=1), bf16(n, d, device="cuda",
                                                                                           seed=2)
    out, squares = train_gpt._matmul_residual_gluon(y, w, x)
    assert_sum_and_squares_as_float64(y, w, x, out, squares)
