"""The FP8 lm_head custom op: it passes torch.library.opcheck (schema, fake tensors with the real strides,
autograd registration, AOT dispatch), and its output and gradients match the same matmuls done in float32 on the
dequantised FP8 operands. Runs wherever float8 matmuls do (recent PyTorch on CPU; GPUs of compute capability
8.9+); skipped elsewhere."""
import pytest
import torch

from train_gpt import FP8_GRAD_SCALE_PER_TOKEN, FP8_W_SCALE, FP8_X_SCALE, fp8_available, fp8_mm


def devices() -> list[str]:
    found = []
    try:
        one = torch.ones(())
        torch._scaled_mm(torch.zeros(16, 16, dtype=torch.float8_e4m3fn),
                         torch.zeros(16, 16, dtype=torch.float8_e4m3fn).T, scale_a=one, scale_b=one,
                         out_dtype=torch.bfloat16)
        found.append("cpu")
    except (RuntimeError, NotImplementedError):
        pass
    if torch.cuda.is_available() and fp8_available(torch.device("cuda"))[0]:
        found.append("cuda")
    return found


pytestmark = pytest.mark.skipif(not devices(), reason="no float8 matmul on this machine")


def inputs(device: str, n: int = 64, d: int = 32, v: int = 128):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen).bfloat16().to(device)
    w = (0.05 * torch.randn(v, d, generator=gen)).to(device)
    return x, w


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    x, w = inputs(device)
    # opcheck backpropagates unit-sized gradients: the head's grad_s (for ~1/T-sized gradients) would overflow
    # float8_e5m2 to inf/nan there, so the gradient scale is 1 here.
    torch.library.opcheck(fp8_mm, (x.requires_grad_(), w.requires_grad_(), FP8_X_SCALE, FP8_W_SCALE, 1.0))


@pytest.mark.parametrize("device", devices())
def test_matches_dequantised_matmul(device):
    x, w = inputs(device)
    x_s, w_s, grad_s = FP8_X_SCALE, FP8_W_SCALE, FP8_GRAD_SCALE_PER_TOKEN * len(x)
    x.requires_grad_(), w.requires_grad_()
    out = fp8_mm(x, w, x_s, w_s, grad_s)
    x_dq = (x.float() * x_s).to(torch.float8_e4m3fn).float() / x_s
    w_dq = (w.float() * w_s).to(torch.float8_e4m3fn).float() / w_s
    torch.testing.assert_close(out.float(), x_dq @ w_dq.T, rtol=1e-2, atol=1e-2)  # bf16 output rounding
    # and close to the exact product, within what e4m3 (3 mantissa bits) allows
    assert ((out.float() - x.float() @ w.T).norm() / (x.float() @ w.T).norm()) < 0.1

    g = torch.randn(out.shape, device=device, dtype=torch.bfloat16) / len(x)  # a mean over the tokens
    out.backward(g)
    g_dq = (g.float() * grad_s).to(torch.float8_e5m2).float() / grad_s
    # FP8 tensor cores accumulate in less than float32 (a relative error near 1e-4 on the H200), so the gradients
    # are compared by relative error over the whole tensor, as in METHOD.md
    assert relative_error(x.grad.float(), g_dq @ w_dq) < 1e-2  # bf16 output
    assert relative_error(w.grad, g_dq.T @ x_dq) < 1e-3  # float32 output
    assert w.grad.is_contiguous() and w.grad.dtype == torch.float32


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).norm() / expected.norm()).item()
