"""Embedding: a bf16 table whose gradient is summed in float32 in place over a step's sequences.
- Each lookup's backward adds the table's gradient into grad_sum, exactly, and gives the table no .grad.
- take_grad() makes .grad the sum rounded to bf16 once, and starts the sum again at 0.
- Compiled (inductor, on the CPU; on a CUDA GPU too where there is one), the sum is the eager one within float32's
  rounding: the adds may come in another order.
- The table is drawn as nn.Embedding draws it, in float32, then rounded to bf16; grad_sum is not in the state_dict."""
import pytest
import torch

from train_gpt import Embedding

VOCAB, DIM = 16, 8


def devices() -> list[str]:
    return ["cpu"] + ["cuda"] * torch.cuda.is_available()


def grads_of(n: int, seed: int, device: str = "cpu") -> torch.Tensor:
    """(n, DIM) bf16 gradients of the lookups, multiples of 1/8 under 4, so that float32 sums of them are exact."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(-32, 32, (n, DIM), generator=gen) / 8).bfloat16().to(device)


def ids_of(n: int, seed: int, device: str = "cpu") -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).to(device)


def test_lookups_add_their_gradients_into_the_float32_sum():
    table = Embedding(VOCAB, DIM)
    expected = torch.zeros(VOCAB, DIM, dtype=torch.float64)
    for seed in range(3):  # three sequences, each with repeated ids
        ids, grad = ids_of(40, seed), grads_of(40, seed)
        out = table(ids)
        assert out.dtype == torch.bfloat16 and torch.equal(out, table.weight[ids])
        out.backward(grad)
        expected.index_add_(0, ids, grad.double())
        assert table.weight.grad is None and table.grad_sum.dtype == torch.float32
        assert torch.equal(table.grad_sum.double(), expected)
    table.take_grad()
    assert table.weight.grad.dtype == torch.bfloat16
    assert torch.equal(table.weight.grad, expected.float().bfloat16())
    assert not table.grad_sum.any()


def test_the_table_is_drawn_as_nn_embedding_draws_it():
    torch.manual_seed(0)
    plain = torch.nn.Embedding(VOCAB, DIM)
    torch.manual_seed(0)
    table = Embedding(VOCAB, DIM)
    assert table.weight.dtype == torch.bfloat16 and torch.equal(table.weight, plain.weight.detach().bfloat16())
    assert list(table.state_dict()) == ["weight"]


@pytest.mark.parametrize("device", devices())
def test_compiled_lookups_sum_as_eager_ones(device):
    torch.manual_seed(0)
    eager = Embedding(VOCAB, DIM).to(device)
    compiled_table = Embedding(VOCAB, DIM).to(device)
    compiled_table.load_state_dict(eager.state_dict())

    def loss(table, ids, scale):  # the table's output reaches the loss through a float32 op, as in the model
        return (table(ids).float() * scale).sum()

    compiled = torch.compile(loss)
    for seed in range(2):
        ids, scale = ids_of(64, seed, device), grads_of(64, seed + 10, device).float()
        loss(eager, ids, scale).backward()
        compiled(compiled_table, ids, scale).backward()
    assert compiled_table.weight.grad is None
    torch.testing.assert_close(compiled_table.grad_sum, eager.grad_sum, rtol=1e-6, atol=0)
    assert eager.grad_sum.any()
