"""The windowed attention through DocumentWindows: its rule, its ops and its kernels.
- The rule: window_dense_mask of document_windows equals dense_mask of block_masks, long and short, for every
  window of the schedule, on documents that are shorter than a block, span several or end on a block boundary.
- speedrun::window_attention and speedrun::window_attention_grad pass torch.library.opcheck, also for a q that
  is not contiguous.
- Their reference bodies give what dense SDPA and autograd give; a GPT through them gives the plain GPT's loss.
- On a CUDA GPU with Triton, for every window of the schedule and its short window, the kernels' output and
  gradients are about as close to float64 math as FlexAttention's: within 1.25 times its largest error (both
  round the same products to bf16, in another order).
- attention_block: speedrun::window_attention_inputs_grad, the backward of attention_inputs and attention in one
  op, passes opcheck, with and without a value embedding; its reference body is window_attention_grad then
  qkv_prep_grad_of_outputs, and with the rows' scales its gradient of qkv is theirs times the scales, rounded once
  more; a GPT through attention_block_fused (the qkv matmul with attention_inputs' forward in one op) has about the
  loss of one through the two ops' own Functions and its gradients within a few bf16 steps (on the CPU all run the
  reference bodies); bind_ops binds it only with fused_qkv and fused_attention on Hopper with Gluon. On a CUDA GPU
  at the model's sizes (6 heads of 128), for windows of 1 to 14 blocks, long and short, its kernels' gradients are
  as close to float64 attention_inputs' backward of the attention's gradients as the plain path's
  (attention_inputs_reference through autograd): they start the norms' backward from q and k, bf16, and the
  forward's rstd, where the plain path rounds to bf16 between its steps; with the rows' scales, their gradient of
  qkv is their own without, times the scales, rounded once more."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt
from test_attention_inputs import float64_truth, run
from test_masks import EOT, random_tokens, schedule_windows
from train_gpt import (ATTENTION_SCALE, Rotary, attention_block_fused, attention_block_reference,
                       attention_flex_compiled, attention_windows, block_masks, dense_mask, document_ids,
                       document_windows, qk_rstd, qkv_prep, qkv_prep_grad_of_outputs, window_attention,
                       window_attention_grad, window_attention_inputs_grad, window_dense_mask)

CUDA = torch.cuda.is_available() and train_gpt.HAS_TRITON


def devices() -> list[str]:
    return ["cpu"] + ["cuda"] * CUDA


def qkv(T: int, H: int, head_dim: int, device: str, seed: int = 0) -> list[torch.Tensor]:
    """q, k, v and an output gradient (1, T, H, head_dim) bf16, q and k of unit rms as QK norm makes them."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, T, H, head_dim, generator=gen).bfloat16().to(device) for _ in range(4)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rule_matches_the_block_masks_for_every_window(seed):
    docs = document_ids(random_tokens(np.random.default_rng(seed), num_blocks=16), EOT)
    starts, ends, _ = document_windows(docs, torch.tensor(1, dtype=torch.int32))[0]
    assert torch.equal(docs[starts], docs) and (starts <= torch.arange(len(docs))).all()
    assert (starts == 0)[docs == docs[0]].all() and (docs[starts - 1] != docs)[starts > 0].all()  # the first token
    assert torch.equal(ends, torch.searchsorted(docs, docs, right=True).int())  # the end of the document
    assert (docs[ends.clamp_max(len(docs) - 1)] != docs)[ends < len(docs)].all()
    for w in schedule_windows():
        window = torch.tensor(w, dtype=torch.int32)
        for name, blocks, windows in zip(("long", "short"), block_masks(docs, window), document_windows(docs, window)):
            expected = dense_mask(blocks)
            assert torch.equal(window_dense_mask(windows.starts, windows.window_blocks), expected), f"{name}, {w}"


@pytest.mark.parametrize("device", devices())
def test_ops_pass_opcheck(device):
    T = 256
    docs = document_ids(random_tokens(np.random.default_rng(5), num_blocks=T // 128), EOT).to(device)
    q, k, v, grad = qkv(T, 2, 64, device)
    permuted = q.transpose(1, 2).contiguous().transpose(1, 2)  # the same values, not contiguous
    for w in (0, 1, 2):
        mask = document_windows(docs, torch.tensor(w, dtype=torch.int32, device=device))[0]
        for q_in in (q, permuted):
            torch.library.opcheck(window_attention, (q_in, k, v, mask.starts, mask.window_blocks))
        out, lse = window_attention(q, k, v, mask.starts, mask.window_blocks)
        torch.library.opcheck(window_attention_grad, (grad, q, k, v, out, lse, *mask))


def test_reference_bodies_match_sdpa_and_autograd():
    T, H, head_dim = 384, 2, 32
    docs = document_ids(random_tokens(np.random.default_rng(6), num_blocks=T // 128), EOT)
    q, k, v, grad = (t.float() for t in qkv(T, H, head_dim, "cpu"))
    mask = document_windows(docs, torch.tensor(2, dtype=torch.int32))[0]
    out, lse = window_attention(q, k, v, mask.starts, mask.window_blocks)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    dense = window_dense_mask(mask.starts, mask.window_blocks)
    expected = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in leaves), attn_mask=dense,
                                              scale=ATTENTION_SCALE).transpose(1, 2)
    expected.backward(grad)
    torch.testing.assert_close(out, expected.detach().bfloat16())  # one bf16 rounding apart
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * ATTENTION_SCALE
    expected_lse = scores.masked_fill(~dense, -torch.inf).logsumexp(-1)[0] / np.log(2)
    torch.testing.assert_close(lse, expected_lse)
    for got, leaf in zip(window_attention_grad(grad, q, k, v, out, lse, *mask), leaves):
        torch.testing.assert_close(got, leaf.grad.bfloat16())


def gpt_loss_and_grads(num_layers: int, attention_moves: bool = False) -> tuple[torch.Tensor, dict]:
    """A small GPT's loss on three documents and its parameters' gradients, through the ops as bound; with
    attention_moves, the attention's output projections not zero either, so that gradients reach qkv."""
    torch.manual_seed(0)
    model = train_gpt.GPT(vocab_size=128, num_layers=num_layers, num_heads=2, model_dim=64, max_seq_len=512)
    torch.nn.init.normal_(model.lm_head.weight, std=0.1)  # not its zero init, so that the loss moves
    for block in model.blocks if attention_moves else ():
        if block.attn is not None:
            torch.nn.init.normal_(block.attn.c_proj.weight, std=0.1)
    tokens = torch.randint(0, 128, (513,), generator=torch.Generator().manual_seed(1))
    tokens[torch.tensor([0, 100, 200, 300])] = 127  # documents
    loss = model(tokens[:-1], tokens[1:], torch.tensor(2, dtype=torch.int32))
    loss.backward()
    for table in train_gpt.embedding_tables(model):
        table.take_grad()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def test_gpt_through_the_ops_matches_the_plain_gpt(monkeypatch):
    def loss(fused: bool):
        # the fused path's ops, which bind_ops binds on Hopper; on the CPU the custom ops run their reference bodies
        monkeypatch.setattr(train_gpt, "attention_masks", document_windows if fused else block_masks)
        monkeypatch.setattr(train_gpt, "attention", attention_windows if fused else train_gpt.attention_dense)
        loss, grads = gpt_loss_and_grads(num_layers=2)
        return loss.item(), grads["blocks.0.attn.qkv_w"]

    (fused_loss, fused_grad), (plain_loss, plain_grad) = loss(True), loss(False)
    assert fused_loss == pytest.approx(plain_loss, abs=1e-3)
    torch.testing.assert_close(fused_grad, plain_grad, atol=1e-3, rtol=0.05)


def test_fused_attention_is_off_on_the_cpu(restore_ops):
    lines = train_gpt.bind_ops(train_gpt.Hyperparameters(), torch.device("cpu"))
    assert train_gpt.attention is train_gpt.attention_dense and train_gpt.attention_masks is block_masks
    assert train_gpt.attention_block is attention_block_reference
    assert "fused_attention: off (no Triton on cpu); FlexAttention or dense attention runs it" in lines


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and Triton")
def test_kernels_are_as_close_to_float64_as_flex_attention():
    T, H, head_dim = 16 * 128, 2, 128
    docs = document_ids(random_tokens(np.random.default_rng(7), num_blocks=T // 128), EOT).cuda()
    q, k, v, grad = qkv(T, H, head_dim, "cuda")

    def run(mask, dtype=torch.bfloat16):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        if dtype == torch.float64:  # dense SDPA, the truth
            attended = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in leaves), attn_mask=mask,
                                                      scale=ATTENTION_SCALE).transpose(1, 2)
        else:
            attend = attention_windows if isinstance(mask, train_gpt.DocumentWindows) else attention_flex_compiled
            attended = attend(*leaves, mask)
        attended.backward(grad.to(dtype))
        return [attended.detach()] + [t.grad for t in leaves]

    for w in [0] + schedule_windows():
        window = torch.tensor(w, dtype=torch.int32, device="cuda")
        for name, blocks, windows in zip(("long", "short"), block_masks(docs, window), document_windows(docs, window)):
            truth = run(dense_mask(blocks), torch.float64)
            flex, kernels = run(blocks), run(windows)
            for part, got, reference, exact in zip(("out", "grad_q", "grad_k", "grad_v"), kernels, flex, truth):
                assert got.dtype == torch.bfloat16 and got.shape == exact.shape
                err, flex_err = ((t.double() - exact).abs().max().item() for t in (got, reference))
                assert err <= 1.25 * flex_err + 1e-6, f"window {w} {name} {part}: {err:.3e}, flex {flex_err:.3e}"


def block_grad_args(T: int, H: int, mask: train_gpt.DocumentWindows, with_ve: bool, device: str, seed: int = 0,
                    scaled: bool = False) -> tuple[tuple, torch.Tensor]:
    """window_attention_inputs_grad's arguments: an output gradient, qkv's v, ve, lambdas, the rotary tables, what
    the two forward ops make under mask of qkv (1, T, 3 H, 128) bf16 of rms 3, and the rows' scales (1, T, 1): ones,
    or if scaled 1/4 to 4; and that qkv."""
    gen = torch.Generator().manual_seed(seed)
    qkv_in = (3 * torch.randn(1, T, 3 * H, 128, generator=gen)).bfloat16().to(device)
    ve = torch.randn(T, H * 128, generator=gen).bfloat16().to(device) if with_ve else None
    grad_out = torch.randn(1, T, H, 128, generator=gen).bfloat16().to(device)
    lambdas, rotary = torch.tensor([0.7, 0.4], device=device), Rotary(128, T).to(device)
    q, k, v = qkv_prep(qkv_in, ve, lambdas, rotary.cos, rotary.sin)
    out, lse = window_attention(q, k, v, mask.starts, mask.window_blocks)
    raw_v, rstd = qkv_in[:, :, 2 * H:].contiguous(), qk_rstd(qkv_in)
    x_scale = 4.0 ** (2 * torch.rand(1, T, 1, generator=gen) - 1) if scaled else torch.ones(1, T, 1)
    return (grad_out, raw_v, ve, lambdas, rotary.cos, rotary.sin, q, k, v, rstd, out, lse, *mask,
            x_scale.to(device)), qkv_in


def assert_scaled_once(scaled: tuple, unscaled: tuple, x_scale: torch.Tensor):
    """window_attention_inputs_grad with the rows' x_scale against it with ones: the gradient of qkv is the other's
    times x_scale, but for the roundings to bf16 of each (2^-8 of its size at most, each); those of ve and lambdas
    are the same."""
    exact = unscaled[0].double() * x_scale[..., None].double()
    assert ((scaled[0].double() - exact).abs() <= 2**-7 * exact.abs()).all()
    for got, expected in zip(scaled[1:], unscaled[1:]):
        assert torch.equal(got, expected)


def assert_as_close_to_float64_as_the_plain_path(fused: tuple, grads: tuple, qkv_in: torch.Tensor,
                                                  ve: torch.Tensor | None, lambdas: torch.Tensor, where: str):
    """fused, window_attention_inputs_grad's gradients of qkv, ve and lambdas, are each as close to float64
    attention_inputs' backward of grads (window_attention_grad's gradients of q, k, v) as the plain path's."""
    rotary = Rotary(qkv_in.size(-1), qkv_in.size(1)).to(qkv_in.device)  # block_grad_args' tables
    truth = float64_truth(qkv_in, ve, lambdas, list(grads), rotary)[3:]
    plain = run(qkv_in, ve, lambdas, list(grads), rotary, fused=False)[3:]
    names, got = ("grad_qkv", "grad_ve", "grad_lambdas"), fused
    if ve is None:
        names, got = ("grad_qkv", "grad_lambdas"), (fused[0], fused[2])
    for name, g, p, exact in zip(names, got, plain, truth):
        assert g.dtype == p.dtype and g.shape == p.shape, f"{where} {name}"
        fused_err, plain_err = ((t.double() - exact).abs().max().item() for t in (g, p))
        message = f"{where} {name}: {fused_err:.3e}, the plain path's {plain_err:.3e}"
        assert fused_err <= plain_err * 1.01 + 1e-12, message


@pytest.mark.parametrize("device", devices())
def test_block_grad_op_passes_opcheck(device):
    T = 256
    docs = document_ids(random_tokens(np.random.default_rng(8), num_blocks=T // 128), EOT).to(device)
    for w, with_ve in [(0, True), (1, False), (2, True)]:
        mask = document_windows(docs, torch.tensor(w, dtype=torch.int32, device=device))[0]
        args = block_grad_args(T, 2, mask, with_ve, device, scaled=True)[0]
        torch.library.opcheck(window_attention_inputs_grad, args)


def test_block_grad_reference_is_the_two_grads_composed():
    T = 384
    docs = document_ids(random_tokens(np.random.default_rng(9), num_blocks=T // 128), EOT)
    for with_ve in (True, False):
        mask = document_windows(docs, torch.tensor(2, dtype=torch.int32))[0]
        args, _ = block_grad_args(T, 2, mask, with_ve, "cpu")
        grad_out, raw_v, ve, lambdas, cos, sin, q, k, v, rstd, out, lse = args[:12]
        grads = window_attention_grad(grad_out, q, k, v, out, lse, *mask)
        composed = qkv_prep_grad_of_outputs(*grads, q, k, rstd, raw_v, ve, lambdas, cos, sin)
        for got, expected in zip(window_attention_inputs_grad(*args), composed):
            assert torch.equal(got, expected)
        x_scale = block_grad_args(T, 2, mask, with_ve, "cpu", scaled=True)[0][-1]
        assert_scaled_once(window_attention_inputs_grad(*args[:-1], x_scale), composed, x_scale)


def test_gpt_through_the_block_op_has_about_the_two_ops_gradients(monkeypatch):
    def loss_and_grads(block):
        monkeypatch.setattr(train_gpt, "attention_masks", document_windows)
        monkeypatch.setattr(train_gpt, "attention", attention_windows)
        monkeypatch.setattr(train_gpt, "attention_inputs", train_gpt.attention_inputs_fused)
        monkeypatch.setattr(train_gpt, "attention_block", block)
        # value embeddings in 0-2 and 5-7, none in 3, 4; no attention in 7
        return gpt_loss_and_grads(num_layers=8, attention_moves=True)

    block_loss, block_grads = loss_and_grads(attention_block_fused)
    loss, grads = loss_and_grads(attention_block_reference)
    # the block's qkv matmul scales its float32 sums by the norm's row scale, the two ops' matmul takes norm(x)
    # rounded to bf16: the losses part by a bf16 step's effect
    torch.testing.assert_close(block_loss, loss, rtol=2**-8, atol=0)
    for name, grad in grads.items():
        # the block's backward starts attention_inputs' from q and k, bf16 (2^-8 a step), the two ops' from qkv:
        # through 8 layers' backward the gradients part by a few steps of their largest value
        torch.testing.assert_close(block_grads[name], grad, rtol=0, atol=2**-5 * grad.abs().max().item(), msg=name)


@pytest.mark.parametrize("fused_qkv", [False, True])
@pytest.mark.parametrize("fused_attention", [False, True])
@pytest.mark.parametrize("hopper", [False, True])
def test_block_op_is_bound_only_with_both_switches_on_hopper(restore_ops, monkeypatch, fused_qkv, fused_attention,
                                                              hopper):
    # bind_ops as it sees a CUDA GPU with Triton, of compute capability 9.0 or 8.0
    monkeypatch.setattr(train_gpt, "HAS_TRITON", True)
    monkeypatch.setattr(train_gpt, "HAS_GLUON", True)
    monkeypatch.setattr(train_gpt, "fp8_available", lambda device: (True, ""))
    monkeypatch.setattr(train_gpt, "triton_on_hopper", lambda device: (True, "") if hopper else (False, "sm_80"))
    args = train_gpt.Hyperparameters(fused_qkv=fused_qkv, fused_attention=fused_attention)
    lines = train_gpt.bind_ops(args, torch.device("cuda"))
    expected = attention_block_fused if fused_qkv and fused_attention and hopper else attention_block_reference
    assert train_gpt.attention_block is expected
    assert f"attention_block={expected.__name__}" in lines[-1]


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and Triton")
@pytest.mark.parametrize("with_ve", [True, False])
def test_block_grad_kernels_are_as_close_to_float64_as_the_plain_path(with_ve):
    T, H = 32 * 128, 6
    docs = document_ids(random_tokens(np.random.default_rng(10), num_blocks=T // 128), EOT).cuda()
    for w in (1, 2, 4, 7, 14):
        window = torch.tensor(w, dtype=torch.int32, device="cuda")
        for name, mask in zip(("long", "short"), document_windows(docs, window)):
            args, qkv_in = block_grad_args(T, H, mask, with_ve, "cuda", seed=w)
            grad_out, _, ve, lambdas, _, _, q, k, v, _, out, lse = args[:12]
            fused = window_attention_inputs_grad(*args)
            grads = window_attention_grad(grad_out, q, k, v, out, lse, *mask)
            assert_as_close_to_float64_as_the_plain_path(fused, grads, qkv_in, ve, lambdas, f"window {w} {name}")
            x_scale = block_grad_args(T, H, mask, with_ve, "cuda", seed=w, scaled=True)[0][-1]
            assert_scaled_once(window_attention_inputs_grad(*args[:-1], x_scale), fused, x_scale)
