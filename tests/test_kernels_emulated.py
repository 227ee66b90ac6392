"""The GPU kernels' logic on the CPU, through tests/kernel_emulator.py: each kernel's body runs program by program
(with its tiles, ranges, masks and pipelines as written) and meets the bar of its GPU test, at shapes that give a
program several tiles and a loop more steps along K than the pipeline has stages:
- the MLP's matmul with ReLU^2 and its rows' scales, forward and backward: within a rounding or two of float64
  matmuls, and what a float32 sum may lose, h relu(a)'s square rounded;
- the attention's output projection with the residual add: the sum within a bf16 step of float64's, its row sums
  of squares those of the sum, a row's last tile of columns half full;
- the windowed attention, forward and backward, for windows of 0 to 14 blocks, long and short, on documents shorter
  than a block, spanning several or ending on a block boundary: its output and gradients within 2^-7 of the
  largest value of float64 attention's (its probabilities go to bf16 for their matmul; a key tile missed or masked
  wrongly moves values by their own size), its log-sum-exp within 1e-5 of the reference body's;
- attention_inputs' kernels (QK norm, rotary, value mix, and their backward): the reference bodies' numbers within a
  bf16 step; the qkv matmul with attention_inputs' forward in its epilogue: its reference body's numbers within a
  step of the larger (v: and lambdas[0] times a step of qkv); the attention's backward kernels with
  attention_inputs' backward in their epilogues: gradients as close to float64's as the plain path's, with and
  without a value embedding, and with the rows' scales the gradient of qkv theirs without, times the scales,
  rounded once more; a GPT through all of these (attention_block_fused, residual_projection_fused) has its
  reference path's loss within 1e-3 and gradients within 2^-5 of their largest value;
- the head's two kernels: the reference body's loss, its logits' gradient within a rounding step, in bf16 and in
  FP8, both FP8 layouts the same numbers;
- the head's FP8 logits matmul with the row sums in its epilogue: logits within a bf16 step of float64's, and the
  sums' log-sum-exp and losses within the GPU's tanh bound of float64's; the whole FP8 head op with those
  sums, the reference body's loss and gradients.
The emulator's special-function instructions are exact and its matmuls add in float32 in another order, so these
bars are the GPU tests' where those have one; speed, registers and the compiler's own shared memory are the
GPU's to check."""
import numpy as np
import pytest
import torch

import train_gpt as tg
from kernel_emulator import Descriptor, emulate
from test_attention import assert_as_close_to_float64_as_the_plain_path, assert_scaled_once, block_grad_args, qkv
from test_attention_inputs import assert_close_to_the_reference
from test_fused_mlp import assert_rounds_as_float64_matmuls, bf16, scales
from test_residual_projection import assert_sum_and_squares_as_float64
from test_masks import EOT, random_tokens


def test_mlp_kernel_rounds_as_float64_matmuls_do():
    (block_m, block_n, block_k), _, stages = tg.MLP_MATMUL
    n, d, h = 4 * block_m, (stages + 1) * block_k, 2 * block_n  # 8 tiles over 3 programs
    x, w_fc, w_proj, grad_y = bf16(n, d), bf16(h, d, scale=0.05, seed=1), bf16(d, h, scale=0.05, seed=2), bf16(
        n, d, seed=3)
    r = scales(n, seed=4)
    with emulate(tg, sms=3):
        hidden = tg._matmul_relu2_cuda(x, w_fc, r)
        grad_a = tg._matmul_relu2_grad_cuda(grad_y, w_proj, hidden, r)
    assert_rounds_as_float64_matmuls(x, r, w_fc, w_proj, grad_y, hidden, grad_a)  # the GPU test's bar


def test_residual_matmul_kernel_gives_the_sum_and_its_squares():
    (block_m, block_n, block_k), _, stages = tg.RESIDUAL_MATMUL
    n, d, k = 4 * block_m, 2 * block_n + block_n // 2, (stages + 1) * block_k  # 12 tiles over 3 programs, the last
    y, w, x = bf16(n, k), bf16(d, k, scale=0.05, seed=1), bf16(n, d, seed=2)  # of a row's columns half full
    with emulate(tg, sms=3):
        out, squares = tg._matmul_residual_gluon(y, w, x)
    assert_sum_and_squares_as_float64(y, w, x, out, squares)  # the GPU test's bar


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


@pytest.mark.parametrize("with_ve", [False, True])
def test_qkv_matmul_prep_kernel_gives_the_reference_numbers(with_ve):
    (block_m, _, block_k), _, stages = tg.QKV_MATMUL
    H, T = 3, 3 * block_m + 40  # a last, partial row block; K = 384, more steps along it than the ring has stages
    dim = H * 128
    assert dim > stages * block_k
    x, w = bf16(1, T, dim), bf16(3 * dim, dim, scale=dim**-0.5, seed=1)
    ve = bf16(T, dim, seed=2) if with_ve else None
    lambdas, rotary = torch.tensor([0.7, 0.4]), tg.Rotary(128, T)
    r = scales(T, seed=3, powers_of_two=True)[None]  # the bar is the matmul's alone: see scales
    with emulate(tg):
        fused = tg._qkv_matmul_prep_gluon(x, r, w, ve, lambdas, rotary.cos, rotary.sin)
    reference = tg.qkv_matmul_prep(x, r, w, ve, lambdas, rotary.cos, rotary.sin)
    assert_close_to_the_reference(fused, reference, reference[-1], lambdas)  # the GPU test's bar


@pytest.mark.parametrize("with_ve", [False, True])
def test_attention_block_backward_is_as_close_to_float64_as_the_plain_path(with_ve):
    T, H = 8 * 128, 2
    docs = tg.document_ids(random_tokens(np.random.default_rng(10), num_blocks=T // 128), EOT)
    for window in (1, 3, 8):
        for name, mask in zip(("long", "short"), tg.document_windows(docs, torch.tensor(window, dtype=torch.int32))):
            args, qkv_in = block_grad_args(T, H, mask, with_ve, "cpu", seed=window)
            grad_out, _, ve, lambdas, _, _, q, k, v, _, out, lse = args[:12]
            x_scale = block_grad_args(T, H, mask, with_ve, "cpu", seed=window, scaled=True)[0][-1]
            with emulate(tg):
                fused = tg._window_attention_inputs_grad_triton(*args)
                grads = tg._window_attention_grad_triton(grad_out, q, k, v, out, lse, *mask)
                scaled = tg._window_attention_inputs_grad_triton(*args[:-1], x_scale)
            assert_as_close_to_float64_as_the_plain_path(fused, grads, qkv_in, ve, lambdas, f"window {window} {name}")
            assert_scaled_once(scaled, fused, x_scale)


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


def test_logits_kernel_gives_the_logits_and_their_row_sums():
    (block_m, block_n, block_k), _, stages = tg.HEAD_MATMUL
    n, v, d = 3 * block_m - 40, 3 * block_n, (stages + 1) * block_k  # a short last row block; 9 tiles, 4 programs
    gen = torch.Generator().manual_seed(0)
    x_q = tg._e4m3(torch.randn(n, d, generator=gen).bfloat16(), tg.FP8_X_SCALE)
    w_q = tg._e4m3(0.05 * torch.randn(v, d, generator=gen), tg.FP8_W_SCALE)
    targets = torch.randint(0, v, (n,), generator=gen)
    with emulate(tg, sms=4):
        logits, sums = tg._logits_gluon(x_q, w_q)
        lse, losses = tg._lse_of_sums_triton(sums, logits, targets)
    exact = x_q.double() @ w_q.double().T / (tg.FP8_X_SCALE * tg.FP8_W_SCALE)
    torch.testing.assert_close(logits.float(), exact.bfloat16().float(), rtol=2**-7, atol=1e-6)
    z = tg.SOFTCAP * torch.sigmoid(logits.double() / tg.SOFTCAP_TEMPERATURE)
    assert (lse.double() - z.logsumexp(-1)).abs().max() <= 1.2e-4
    assert (losses.double() - (z.logsumexp(-1) - z.gather(1, targets[:, None])[:, 0])).abs().max() <= 1.2e-4


def test_logits_kernel_refuses_tiles_that_do_not_divide_the_vocabulary(monkeypatch):
    (block_m, block_n, block_k), warps, stages = tg.HEAD_MATMUL
    monkeypatch.setattr(tg, "HEAD_MATMUL", tg.Tile((block_m, 256, block_k), warps, stages))
    x_q, w_q = torch.zeros(block_m, block_k).to(torch.float8_e4m3fn), torch.zeros(384, block_k).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="256 columns a tile must divide the lm_head's 384 rows"):
        tg._logits_gluon(x_q, w_q)


@pytest.mark.parametrize("w_scale", [0.0, 0.05])  # 0: the first step's lm_head, zero-initialised
def test_fp8_head_op_with_the_sums_in_its_matmul_gives_the_reference(monkeypatch, w_scale):
    # the whole op on the GPU path, chunk by chunk over two spans (the Gluon logits kernel, the sums' and the
    # gradient's kernels), against its reference body: the loss within 1e-5, the gradients within 1e-3
    monkeypatch.setattr(tg, "HEAD_CHUNK", 256)
    for step in ["e4m3_both", "grad_x", "add_grad_w"]:  # eager: inductor's CPU kernels would only slow this down
        monkeypatch.setattr(tg, f"_{step}_compiled", getattr(tg, f"_{step}"))
    gen = torch.Generator().manual_seed(0)
    x = tg.norm(torch.randn(4 * 256, 256, generator=gen)).bfloat16()
    w = w_scale * torch.randn(512, 256, generator=gen)
    targets = torch.randint(0, 511, (len(x),), generator=gen)
    with emulate(tg, sms=2):
        loss, grad_x, grad_w = tg._fused_head_loss_cuda(x, w, targets, True, True)
    expected = tg.fused_head_loss(x, w, targets, True)  # on the CPU, its reference body
    torch.testing.assert_close(loss, expected[0], rtol=1e-5, atol=0)
    for got, want in zip((grad_x, grad_w), expected[1:]):
        assert (got.float() - want.float()).norm() <= 1e-3 * want.float().norm()


def test_gpt_through_the_block_kernels_has_about_the_reference_loss_and_gradients(monkeypatch):
    # attention_block_fused with its ops' CUDA kernels (the Gluon qkv matmul, the attention forward, the backward
    # with attention_inputs' in its epilogues) against the two ops' reference bodies, in a GPT whose attention
    # moves: WindowAttentionBlock's wiring, the kernels' arguments and layouts. The paths round differently (bf16
    # probabilities, float32 sums in other orders), so the loss moves by 1e-3 at most and the gradients by a few
    # bf16 steps of their largest value; a wrong wire moves them by their own size. The scalars' gradients are
    # bf16 sums over every token on the CPU (a 0-d float32 weight times a bf16 tensor multiplies in bf16) that
    # nearly cancel, so between the paths they move by a few percent of the largest scalar gradient: they are held
    # to 2^-3 of it
    def detached(fn):  # the emulator runs a kernel's partitions as threads, where autograd would record
        return lambda *args: fn(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])

    def loss_and_grads(kernels: bool):
        monkeypatch.setattr(tg, "attention_masks", tg.document_windows)
        monkeypatch.setattr(tg, "attention", tg.attention_windows)
        monkeypatch.setattr(tg, "attention_inputs", tg.attention_inputs_fused)
        block = tg.attention_block_fused if kernels else tg.attention_block_reference
        monkeypatch.setattr(tg, "attention_block", block)
        projection = tg.residual_projection_fused if kernels else tg.residual_projection_reference
        monkeypatch.setattr(tg, "residual_projection", projection)
        torch.manual_seed(0)
        model = tg.GPT(vocab_size=128, num_layers=2, num_heads=2, model_dim=256, max_seq_len=512)
        torch.nn.init.normal_(model.lm_head.weight, std=0.1)  # not the zero inits: gradients reach every weight
        for block in model.blocks:
            torch.nn.init.normal_(block.attn.c_proj.weight, std=0.05)
        tokens = torch.randint(0, 128, (513,), generator=torch.Generator().manual_seed(1))
        tokens[torch.tensor([0, 100, 300])] = 127  # documents
        with emulate(tg):
            if kernels:
                tg.qkv_matmul_prep = detached(tg._qkv_matmul_prep_gluon)
                tg.window_attention = detached(tg._window_attention_triton)
                tg.window_attention_inputs_grad = detached(tg._window_attention_inputs_grad_triton)
                tg.matmul_residual = detached(tg._matmul_residual_gluon)
            loss = model(tokens[:-1], tokens[1:], torch.tensor(2, dtype=torch.int32))
            loss.backward()
        for table in tg.embedding_tables(model):
            table.take_grad()
        return loss.item(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    (loss, grads), (reference_loss, reference_grads) = loss_and_grads(True), loss_and_grads(False)
    assert abs(loss - reference_loss) <= 1e-3
    assert grads.keys() == reference_grads.keys()
    largest_scalar = max(g.abs().max().item() for g in reference_grads.values() if g.ndim < 2)
    for name, expected in reference_grads.items():
        atol = 2**-3 * largest_scalar if expected.ndim < 2 else 2**-5 * expected.abs().max().item()
        torch.testing.assert_close(grads[name], expected, rtol=0, atol=atol, msg=name)


def test_emulated_tma_loads_zeros_and_stores_nothing_outside_the_tensor():
    # as the TMA does, also for a box wholly outside (a tile of rows past the end, which a kernel need not skip)
    t = torch.arange(20.0).reshape(4, 5)
    tiles = Descriptor(t, [2, 4])
    assert tiles.load([3, 3]).t.tolist() == [[18.0, 19.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    for wholly_outside in ([4, 0], [5, 0], [-2, 0], [-3, 0], [0, 6], [10, 10]):
        assert not tiles.load(wholly_outside).t.any()
        tiles.store(wholly_outside, torch.ones(2, 4))
    tiles.store([3, 3], torch.full((2, 4), -1.0))
    assert torch.equal(t, torch.cat([torch.arange(18.0), torch.tensor([-1.0, -1.0])]).reshape(4, 5))
