"""The GPU kernels' logic on the CPU, through tests/kernel_emulator.py: each kernel's body runs program by program
(with its tiles, ranges, masks and pipelines as written) and meets the bar of its GPU test, at shapes that give a
program several tiles and a loop more steps along K than the pipeline has stages:
- the MLP's matmul with ReLU^2, forward and backward: within a rounding or two of float64 matmuls, and what a float32
  sum may lose, h relu(a)'s square rounded;
- the windowed attention, forward and backward, for windows of 0 to 14 blocks, long and short, on documents shorter
  than a block, spanning several or ending on a block boundary: its output and gradients within 2^-7 of the
  largest value of float64 attention's (its probabilities go to bf16 for their matmul; a key tile missed or masked
  wrongly moves values by their own size), its log-sum-exp within 1e-5 of the reference body's;
- attention_inputs' kernels (QK norm, rotary, value mix, and their backward): the reference bodies' numbers within a
  bf16 step;
- the head's two kernels: the reference body's loss, its logits' gradient within a rounding step, in bf16 and in
  FP8, both FP8 layouts the same numbers.
The emulator's special-function instructions are exact and its matmuls add in float32 in another order, so these
bars are the GPU tests' where those have one; speed, registers and the compiler's own shared memory are the
GPU's to check."""
import numpy as np
import pytest
import torch

import train_gpt as tg
from kernel_emulator import emulate
from test_attention import qkv
from test_fused_mlp import assert_rounds_as_float64_matmuls, bf16
from test_masks import EOT, random_tokens


def test_mlp_kernel_rounds_as_float64_matmuls_do():
    (block_m, block_n, block_k), _, stages = tg.MLP_MATMUL
    n, d, h = 4 * block_m, (stages + 1) * block_k, 2 * block_n  # 8 tiles over 3 programs
    x, w_fc, w_proj, grad_y = bf16(n, d), bf16(h, d, scale=0.05, seed=1), bf16(d, h, scale=0.05, seed=2), bf16(
        n, d, seed=3)
    with emulate(tg, sms=3):
        hidden = tg._matmul_relu2_cuda(x, w_fc)
        grad_a = tg._matmul_relu2_grad_cuda(grad_y, w_proj, hidden)
    assert_rounds_as_float64_matmuls(x, w_fc, w_proj, grad_y, hidden, grad_a)  # the GPU test's bar


@pytest.mark.parametrize("window", [0, 1, 2, 5, 14])
def test_attention_kernels_are_close_to_float64(window):
    T, H = 16 * 128, 2
    docs = tg.document_ids(random_tokens(np.random.default_rng(7), num_blocks=T // 128), EOT)
    q, k, v, grad_out = qkv(T, H, 128, "cpu")
    for name, mask in zip(("long", "short"), tg.document_windows(docs, torch.tensor(window, dtype=torch.int32))):
        with emulate(tg):
            out, lse = tg._window_attention_triton(q, k, v, mask.starts, mask.window_blocks)
            grads = tg._window_attention_grad_triton(grad_out, q, k, v, out, lse, *mask)
        leaves = [t.double().requires_grad_() for t in (q, k, v)]
        scores = tg._window_scores(leaves[0], leaves[1], mask.starts, mask.window_blocks)
        exact = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), leaves[2])
        exact.backward(grad_out.double())
        for part, got, expected in zip(("out", "grad_q", "grad_k", "grad_v"), (out, *grads),
                                       (exact, *(t.grad for t in leaves))):
            assert got.dtype == torch.bfloat16 and got.shape == expected.shape, part
            error = (got.double() - expected).abs().max() / expected.abs().max()
            assert error <= 2**-7, f"window {window} {name} {part}: {error:.2e} of the largest value"
        reference_lse = tg.window_attention(q, k, v, mask.starts, mask.window_blocks)[1]
        assert (lse - reference_lse).abs().max() <= 1e-5, f"window {window} {name} lse"


@pytest.mark.parametrize("with_ve", [False, True])
def test_attention_inputs_kernels_give_the_reference_numbers(with_ve):
    T, H = 4 * tg.QKV.block[0], 2
    qkv_in, grads = bf16(1, T, 3 * H, 128, scale=3), [bf16(1, T, H, 128, seed=i) for i in (1, 2, 3)]
    ve = bf16(T, H * 128, seed=4) if with_ve else None
    lambdas, rotary = torch.tensor([0.7, 0.4]), tg.Rotary(128, T)
    with emulate(tg):
        fused = tg._qkv_prep_triton(qkv_in, ve, lambdas, rotary.cos, rotary.sin)
        fused_grads = tg._qkv_prep_grad_triton(*grads, qkv_in, ve, lambdas, rotary.cos, rotary.sin)
    reference = tg.qkv_prep(qkv_in, ve, lambdas, rotary.cos, rotary.sin)
    reference_grads = tg.qkv_prep_grad(*grads, qkv_in, ve, lambdas, rotary.cos, rotary.sin)
    for part, got, expected in zip(("q", "k", "v", "grad_qkv", "grad_ve", "grad_lambdas"), (*fused, *fused_grads),
                                   (*reference, *reference_grads)):
        assert got.dtype == expected.dtype and got.shape == expected.shape, part
        largest = expected.abs().max().item() if expected.numel() else 0.0
        torch.testing.assert_close(got.double(), expected.double(), rtol=2**-7, atol=1e-6 * largest, msg=part)


@pytest.mark.parametrize("fp8", [False, True])
def test_head_kernels_give_the_reference_loss_and_gradient(fp8):
    n, v = 3 * tg.HEAD_GRAD.block[0], 5 * tg.HEAD_GRAD.block[1] + 17  # a short last tile of columns
    logits, targets = bf16(n, v, scale=8), torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(1))
    grad_s = tg.FP8_GRAD_SCALE_PER_TOKEN * n if fp8 else None
    with emulate(tg):
        loss, g, g_t = tg._loss_and_logit_grad_triton(logits, targets, 1 / n, grad_s)
    expected_loss, expected_g, _ = tg._loss_and_logit_grad(logits, targets, 1 / n, grad_s)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=0)
    # as the GPU test at extreme logits: a rounding may land one step apart, 2^-7 in bf16, 2^-2 in float8_e5m2
    # (and at its smallest values, the step of its subnormals, 2^-16)
    torch.testing.assert_close(g.float(), expected_g.float(), rtol=2.0**-2 if fp8 else 2.0**-7,
                               atol=2.0**-16 if fp8 else 0.0)
    if fp8:
        assert torch.equal(g_t.float(), g.float().T)
