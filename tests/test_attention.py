"""The windowed attention through DocumentWindows: its rule, its ops and its kernels.
- The rule: window_dense_mask of document_windows equals dense_mask of block_masks, long and short, for every
  window of the schedule, on documents that are shorter than a block, span several or end on a block boundary.
- speedrun::window_attention and speedrun::window_attention_grad pass torch.library.opcheck, also for a q that
  is not contiguous.
- Their reference bodies give what dense SDPA and autograd give; a GPT through them gives the plain GPT's loss.
- On a CUDA GPU with Triton, for every window of the schedule and its short window, the kernels' output and
  gradients are about as close to float64 math as FlexAttention's: within 1.25 times its largest error (both
  round the same products to bf16, in another order)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt
from test_masks import EOT, random_tokens, schedule_windows
from train_gpt import (ATTENTION_SCALE, attention_block_reference, attention_flex_compiled, attention_windows,
                       block_masks, dense_mask, document_ids, document_windows, window_attention, window_attention_grad,
                       window_dense_mask)

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


def test_gpt_through_the_ops_matches_the_plain_gpt(monkeypatch):
    def loss(fused: bool):
        # the fused path's ops, which bind_ops binds on Hopper; on the CPU the custom ops run their reference bodies
        monkeypatch.setattr(train_gpt, "attention_masks", document_windows if fused else block_masks)
        monkeypatch.setattr(train_gpt, "attention", attention_windows if fused else train_gpt.attention_dense)
        torch.manual_seed(0)
        model = train_gpt.GPT(vocab_size=128, num_layers=2, num_heads=2, model_dim=64, max_seq_len=512)
        torch.nn.init.normal_(model.lm_head.weight, std=0.1)  # not its zero init, so that the loss moves
        tokens = torch.randint(0, 128, (513,), generator=torch.Generator().manual_seed(1))
        tokens[torch.tensor([0, 100, 200, 300])] = 127  # documents
        out = model(tokens[:-1], tokens[1:], torch.tensor(2, dtype=torch.int32))
        out.backward()
        return out.item(), model.blocks[0].attn.qkv_w.grad.clone()

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
