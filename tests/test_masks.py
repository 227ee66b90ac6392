"""Attention block masks: the block masks, expanded to dense masks as the CPU's attention uses them, against a
reference mask built independently, token by token, from document ids, causality and the block-wise window; and
FlexAttention's forward with the block masks against scaled_dot_product_attention with the reference masks; and
which layers take the long window and which value embedding, for the record's 12 layers and for fewer."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train_gpt import (BLOCK_SIZE, VALUE_EMBEDS, WINDOWS, Hyperparameters, block_masks, dense_mask, document_ids,
                       flex_attention, layer_tables, window_blocks_at)

EOT = 50256


def random_tokens(rng: np.random.Generator, num_blocks: int) -> torch.Tensor:
    """Documents of random lengths: some shorter than a block, some spanning several, some ending on a block
    boundary."""
    T = num_blocks * BLOCK_SIZE
    tokens = rng.integers(0, EOT, T)
    pos = 0
    while pos < T:
        tokens[pos] = EOT
        pos += int(rng.choice([rng.integers(1, 64), rng.integers(64, 400), BLOCK_SIZE, rng.integers(400, 1500)]))
    return torch.from_numpy(tokens)


def reference_mask(tokens: torch.Tensor, window: int) -> torch.Tensor:
    """A query block keeps its newest min(#full, w-1) fully visible key blocks and its newest
    min(#partial, max(w - #full, 1)) partly visible ones; inside kept blocks the document-causal rule applies."""
    t = tokens.numpy()
    doc = np.cumsum(t == EOT)
    T, B = len(t), BLOCK_SIZE
    visible = np.tril(np.ones((T, T), dtype=bool)) & (doc[:, None] == doc[None, :])
    out = np.zeros_like(visible)
    for qb in range(T // B):
        full, partial = [], []
        for kb in range(qb, -1, -1):  # newest first
            block = visible[qb * B:(qb + 1) * B, kb * B:(kb + 1) * B]
            if block.all():
                full.append(kb)
            elif block.any():
                partial.append(kb)
        kept = full[:max(0, min(len(full), window - 1))] + partial[:min(len(partial), max(window - len(full), 1))]
        for kb in kept:
            out[qb * B:(qb + 1) * B, kb * B:(kb + 1) * B] = visible[qb * B:(qb + 1) * B, kb * B:(kb + 1) * B]
    return torch.from_numpy(out)


def schedule_windows() -> list[int]:
    args = Hyperparameters()
    return sorted({window_blocks_at(step, args) for step in range(args.num_iterations + 1)})


def test_window_schedule():
    args = Hyperparameters()
    assert window_blocks_at(0, args) == 1 and window_blocks_at(args.num_iterations, args) == 14  # 128 .. 1792
    windows = [window_blocks_at(step, args) for step in range(args.num_iterations + 1)]
    assert windows == sorted(windows) and schedule_windows() == list(range(1, 15))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dense_masks_match_reference_for_every_window(seed):
    tokens = random_tokens(np.random.default_rng(seed), num_blocks=16)
    docs = document_ids(tokens, EOT)
    for w in schedule_windows():
        long_mask, short_mask = map(dense_mask, block_masks(docs, torch.tensor(w)))
        assert torch.equal(long_mask, reference_mask(tokens, w)), f"long mask, window {w}"
        assert torch.equal(short_mask, reference_mask(tokens, w // 2)), f"short mask, window {w // 2}"


def test_masks_are_causal_and_keep_the_diagonal():
    tokens = random_tokens(np.random.default_rng(3), num_blocks=8)
    for w in (1, 2, 7):
        for mask in map(dense_mask, block_masks(document_ids(tokens, EOT), torch.tensor(w))):
            assert not torch.triu(mask, diagonal=1).any()
            assert mask.diagonal().all()  # every query sees itself, so no softmax row is empty


def test_one_document_window_counts_blocks():
    """A single long document: with window w a query block sees exactly its w newest blocks (w-1 full ones and
    the diagonal), the short mask w // 2 (at least the diagonal)."""
    tokens = torch.zeros(8 * BLOCK_SIZE, dtype=torch.long)
    for w in (1, 2, 3, 8):
        long_mask, short_mask = map(dense_mask, block_masks(document_ids(tokens, EOT), torch.tensor(w)))
        blocks = long_mask.view(8, BLOCK_SIZE, 8, BLOCK_SIZE).any(3).any(1)
        assert blocks.sum(1).tolist() == [min(q + 1, w) for q in range(8)]
        blocks = short_mask.view(8, BLOCK_SIZE, 8, BLOCK_SIZE).any(3).any(1)
        assert blocks.sum(1).tolist() == [min(q + 1, max(w // 2, 1)) for q in range(8)]


def test_flex_attention_forward_matches_dense_sdpa():
    """FlexAttention (compiled: the eager CPU path ignores block sparsity) with the block masks gives what SDPA
    gives with the reference masks."""
    flex = torch.compile(flex_attention, dynamic=False)
    tokens = random_tokens(np.random.default_rng(4), num_blocks=8)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, len(tokens), 32, generator=gen) for _ in range(3))
    for w in (1, 2, 3, 5, 14):
        long_mask, short_mask = block_masks(document_ids(tokens, EOT), torch.tensor(w))
        for block_mask, window in ((long_mask, w), (short_mask, w // 2)):
            expected = F.scaled_dot_product_attention(q, k, v, attn_mask=reference_mask(tokens, window), scale=0.12)
            got = flex(q, k, v, block_mask=block_mask, scale=0.12)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_layer_tables_are_the_records_and_shrink_by_the_same_rule():
    assert layer_tables(12) == (VALUE_EMBEDS, WINDOWS)
    assert layer_tables(4) == ((0, 1, 0, 1), ("long", "short", "short", "long"))  # the smoke preset's
    assert layer_tables(2) == ((0, 0), ("long", "long"))
