"""The fused lm_head training loss (custom op speedrun::head_loss) against the plain path it replaces:
- it passes torch.library.opcheck (schema, fake tensors with the real strides, autograd registration, AOT
  dispatch), in bf16 and in FP8;
- in bf16, its loss and gradients match autograd through linear -> soft cap -> cross entropy, for one chunk
  and for several, also when the last chunk is short;
- in FP8, they match autograd through the record's FP8 matmul (x, w quantised to e4m3, the logits' gradient
  to e5m2 with grad_s = 2^13 T) followed by the same soft cap and cross entropy, also when the gradient for w
  is one matmul over a span of chunks, and when the last span is short;
- on a GPU, inductor's coordinate-descent tuning (--coordinate_descent_tuning=1) leaves its FP8 results unchanged;
- on a GPU, the row sums' tanh sigmoid keeps the log-sum-exp and the losses within 1.2e-4 of float64's;
- on a GPU, the kernels' packed bf16 helpers give torch's numbers for any finite float32: the rounding (_bf16),
  the way back (_f32_of_bf16) and relu's square (_relu_square_bf16);
- bind_ops binds the FP8 head with its row sums in the matmul on Hopper with Gluon, else without;
- on Hopper, the Gluon FP8 logits matmul gives _scaled_mm's logits and the row sums of the row-sum kernel, and the
  op with it (sums_in_matmul) the loss and gradients of the op without it.
The FP8 tests run wherever float8 matmuls do (recent PyTorch on CPU; GPUs of compute capability 8.9+). On the CPU
the op runs the torch function _loss_and_logit_grad; on a GPU its Triton kernels, so there these tests pin them."""
import pytest
import torch
import torch.nn.functional as F

import train_gpt
from train_gpt import (FP8_GRAD_SCALE_PER_TOKEN, FP8_W_SCALE, FP8_X_SCALE, fp8_available, fused_head_loss, softcap,
                       triton_on_hopper)


def fp8_devices() -> list[str]:
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


def devices() -> list[str]:
    return ["cpu"] + ["cuda"] * torch.cuda.is_available()


def inputs(device: str, n: int = 64, d: int = 32, v: int = 128):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen).bfloat16().to(device)
    w = (0.5 * torch.randn(v, d, generator=gen)).to(device)  # logits of a few units: the soft cap bends
    targets = torch.randint(0, v, (n,), generator=gen).to(device)
    return x.requires_grad_(), w.requires_grad_(), targets


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


class RecordFp8Matmul(torch.autograd.Function):
    """The plain path's FP8 lm_head matmul, as the record had it: x @ w.T in FP8 with bf16 output, and a
    backward that quantises the incoming bf16 gradient to e5m2."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        x_q, w_q = x.mul(FP8_X_SCALE).to(torch.float8_e4m3fn), w.mul(FP8_W_SCALE).to(torch.float8_e4m3fn)
        one = torch.ones((), device=x.device)
        return torch._scaled_mm(x_q, w_q.T, out_dtype=torch.bfloat16, scale_a=one / FP8_X_SCALE,
                                scale_b=one / FP8_W_SCALE, use_fast_accum=True)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        grad_s = FP8_GRAD_SCALE_PER_TOKEN * len(x)
        x_dq = x.mul(FP8_X_SCALE).to(torch.float8_e4m3fn).float() / FP8_X_SCALE
        w_dq = w.mul(FP8_W_SCALE).to(torch.float8_e4m3fn).float() / FP8_W_SCALE
        g_dq = g.mul(grad_s).to(torch.float8_e5m2).float() / grad_s
        return (g_dq @ w_dq).bfloat16(), g_dq.T @ x_dq


def plain_loss(x, w, targets, fp8: bool):
    logits = RecordFp8Matmul.apply(x, w) if fp8 else F.linear(x, w.type_as(x))
    return F.cross_entropy(softcap(logits), targets)


def compare(x, w, targets, fp8: bool, grad_x_tol: float, grad_w_tol: float):
    loss, _, _ = fused_head_loss(x, w, targets, fp8)
    (loss / 2).backward()  # a gradient accumulation of 2 steps scales the gradients by 1/2
    fused = loss.detach(), x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    expected = plain_loss(x, w, targets, fp8)
    (expected / 2).backward()
    torch.testing.assert_close(fused[0], expected.detach(), rtol=1e-5, atol=0)
    assert fused[1].dtype == torch.bfloat16 and fused[2].dtype == torch.float32 and fused[2].is_contiguous()
    assert relative_error(fused[1], x.grad) < grad_x_tol
    assert relative_error(fused[2], w.grad) < grad_w_tol


@pytest.mark.parametrize("device", devices())
# one chunk; four; one and a short one. Chunks are multiples of 16, as CUDA's FP8 matmul needs; 64 tokens make
# grad_s = 2^19 a power of 2, as it is at the record's 65,536 tokens
@pytest.mark.parametrize("chunk", [64, 16, 48])
def test_bf16_matches_autograd(device, chunk, monkeypatch):
    monkeypatch.setattr(train_gpt, "HEAD_CHUNK", chunk)
    # bf16 rounding: of the logits' gradient, and of grad_w, once in the plain path and once a chunk here
    compare(*inputs(device), fp8=False, grad_x_tol=1e-2, grad_w_tol=5e-3)


@pytest.mark.parametrize("device", fp8_devices())
@pytest.mark.parametrize("chunk", [64, 16, 48])
@pytest.mark.parametrize("span_chunks", [1, 2, 3])  # one gradient for w a chunk; a span of two, or of three
def test_fp8_matches_record_path(device, chunk, span_chunks, monkeypatch):
    monkeypatch.setattr(train_gpt, "HEAD_CHUNK", chunk)
    monkeypatch.setattr(train_gpt, "GRAD_W_CHUNKS", span_chunks)
    # FP8 tensor cores accumulate in less than float32 (a relative error near 1e-4 on the H200)
    compare(*inputs(device), fp8=True, grad_x_tol=1e-2, grad_w_tol=1e-3)  # grad_w: float32 output


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("fp8", [False, True])
def test_opcheck(device, fp8, monkeypatch):
    if fp8 and device not in fp8_devices():
        pytest.skip("no float8 matmul here")
    monkeypatch.setattr(train_gpt, "HEAD_CHUNK", 32)
    torch.library.opcheck(fused_head_loss, inputs(device) + (fp8,))


@pytest.mark.skipif("cuda" not in fp8_devices(), reason="inductor's tuning of GPU kernels; needs float8 matmuls")
def test_fp8_head_unchanged_by_coordinate_descent_tuning(monkeypatch):
    """--coordinate_descent_tuning=1 turns inductor's tuning on for the whole run. On torch 2.11 it once chose, for
    the transposed float8 copy of w, a tile whose stores came out nonfinite: the head's compiled functions compile
    without it, and give the same bits either way."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2 * train_gpt.HEAD_CHUNK, 768, generator=gen).bfloat16().cuda()
    w = (0.02 * torch.randn(50304, 768, generator=gen)).cuda()  # the model's shapes
    targets = torch.randint(0, 50257, (len(x),), generator=gen).cuda()
    results = []
    for tuning in [False, True]:
        monkeypatch.setattr(torch._inductor.config, "coordinate_descent_tuning", tuning)
        torch._dynamo.reset()  # compile the head's functions again, under this setting
        results.append(fused_head_loss(x, w, targets, True))
    torch._dynamo.reset()
    for plain, tuned in zip(*results):
        assert torch.equal(plain, tuned)


@pytest.mark.skipif(not torch.cuda.is_available() or not train_gpt.HAS_TRITON, reason="needs a CUDA GPU and Triton")
@pytest.mark.parametrize("fp8", [False, True])
def test_triton_kernels_match_reference_at_extreme_logits(fp8):
    """The kernels' bare ex2 and rcp instructions flush subnormal numbers to zero, where tl.exp and tl.fdiv would
    keep them. Far past the soft cap's bend, where that could show (sigmoid(x / 7.5) below 2^-126 for x < -655),
    they still give the reference's loss and gradient. Only a gradient below float32's normal range may become 0:
    in bf16 with fewer than 1024 tokens, as here (in FP8, and in training, it is 0 either way)."""
    if fp8 and "cuda" not in fp8_devices():
        pytest.skip("no float8 matmul here")
    gen = torch.Generator().manual_seed(0)
    n, v = 32, 1000
    logits = 3 * torch.randn(n, v, generator=gen)
    extremes = torch.tensor([-3e38, -1e4, -700.0, -660.0, -656.0, -600.0, -90.0, 90.0, 600.0, 1e4, 3e38])
    logits[:, :len(extremes)] = extremes
    logits = logits.bfloat16().cuda()
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[:len(extremes)] = torch.arange(len(extremes))  # each extreme also as a target
    targets = targets.cuda()
    grad_s = FP8_GRAD_SCALE_PER_TOKEN * n if fp8 else None
    loss, g, g_t = train_gpt._loss_and_logit_grad_triton(logits, targets, 1 / n, grad_s)
    expected_loss, expected_g, _ = train_gpt._loss_and_logit_grad(logits, targets, 1 / n, grad_s)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=0)
    g, expected_g = g.float(), expected_g.float()
    normal = expected_g.abs() >= torch.finfo(torch.float32).tiny
    # exp's last bits differ between torch and the kernel: a rounding of the gradient may land one step apart,
    # a relative 2^-7 in bf16, 2^-2 in float8_e5m2
    torch.testing.assert_close(g[normal], expected_g[normal], rtol=2.0**-2 if fp8 else 2.0**-7, atol=0)
    assert ((g[~normal] == 0) | (g[~normal] == expected_g[~normal])).all()  # zeros stay zeros
    if fp8:
        assert torch.equal(g_t.float(), g.T)  # the kernel's two layouts agree


@pytest.mark.skipif(not torch.cuda.is_available() or not train_gpt.HAS_TRITON, reason="needs a CUDA GPU and Triton")
def test_triton_row_sums_within_tanh_bound_at_every_bf16_logit():
    """The row-sum kernel takes the soft cap's sigmoid as tanh, whose z is off by up to 1.1e-4 (train_gpt.py's
    comment at _exp_softcap_kernel): its log-sum-exp and losses stay within that of float64's, for every finite
    bf16 logit, sorted into rows so that each row's logits lie close together, the worst case for the bound."""
    x = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    x = x[torch.isfinite(x)].sort().values
    v = 1000
    logits = x[:len(x) // v * v].view(-1, v).cuda()
    targets = torch.randint(0, v, (len(logits),), generator=torch.Generator().manual_seed(0)).cuda()
    lse, losses = train_gpt._row_lse_triton(logits, targets)
    z = train_gpt.SOFTCAP * torch.sigmoid(logits.double() / train_gpt.SOFTCAP_TEMPERATURE)
    expected_lse = z.logsumexp(-1)
    expected_losses = expected_lse - z.gather(1, targets[:, None])[:, 0]
    assert (lse.double() - expected_lse).abs().max() <= 1.2e-4
    assert (losses.double() - expected_losses).abs().max() <= 1.2e-4


HOPPER = torch.cuda.is_available() and triton_on_hopper(torch.device("cuda"))[0] and train_gpt.HAS_GLUON


def test_sums_in_matmul_is_the_same_reference(monkeypatch):
    monkeypatch.setattr(train_gpt, "HEAD_CHUNK", 32)
    x, w, targets = inputs("cpu")
    for plain, summed in zip(fused_head_loss(x, w, targets, False), fused_head_loss(x, w, targets, False, True)):
        assert torch.equal(plain, summed)


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU with Triton's Gluon")
def test_gluon_logits_and_row_sums():
    """At a chunk of the model's shape, with a short last row block: the logits as _scaled_mm makes them (its fast
    accumulation may round a logit a bf16 step apart), and the row sums whose log-sum-exp and losses are those of
    the row-sum kernel, to float32's summation order."""
    gen = torch.Generator().manual_seed(0)
    n = train_gpt.HEAD_CHUNK - 64
    x_q = train_gpt._e4m3(torch.randn(n, 768, generator=gen).bfloat16().cuda(), FP8_X_SCALE)
    w_q = train_gpt._e4m3((0.05 * torch.randn(50304, 768, generator=gen)).cuda(), FP8_W_SCALE)
    targets = torch.randint(0, 50257, (n,), generator=gen).cuda()
    logits, sums = train_gpt._logits_gluon(x_q, w_q)
    expected, none = train_gpt._logits(x_q, w_q)
    assert none is None and sums.shape == (50304 // train_gpt.HEAD_MATMUL.block[1], n)
    torch.testing.assert_close(logits.float(), expected.float(), rtol=2.0**-7, atol=1e-3)
    assert (logits != expected).float().mean() < 1e-3  # nearly all the same bits
    lse, losses = train_gpt._lse_of_sums_triton(sums, expected, targets)
    expected_lse, expected_losses = train_gpt._row_lse_triton(expected, targets)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses, expected_losses, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU with Triton's Gluon")
def test_sums_in_matmul_gives_the_losses_and_gradients_of_the_plain_fp8_head():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2 * train_gpt.HEAD_CHUNK + 512, 768, generator=gen).bfloat16().cuda()  # a short last span
    w = (0.05 * torch.randn(50304, 768, generator=gen)).cuda()
    targets = torch.randint(0, 50257, (len(x),), generator=gen).cuda()
    plain, summed = fused_head_loss(x, w, targets, True), fused_head_loss(x, w, targets, True, True)
    torch.testing.assert_close(summed[0], plain[0], rtol=1e-5, atol=0)
    for name, got, expected in zip(["grad_x", "grad_w"], summed[1:], plain[1:]):
        assert relative_error(got, expected) < 1e-2, name


@pytest.mark.parametrize("gluon", [True, False])
def test_fp8_head_sums_in_its_matmul_on_hopper_with_gluon(restore_ops, monkeypatch, gluon):
    monkeypatch.setattr(train_gpt, "triton_on_hopper", lambda device: (True, ""))
    monkeypatch.setattr(train_gpt, "fp8_available", lambda device: (True, ""))
    monkeypatch.setattr(train_gpt, "HAS_GLUON", gluon)
    train_gpt.bind_ops(train_gpt.Hyperparameters(), torch.device("cpu"))
    assert train_gpt.head_loss is (train_gpt.head_loss_fp8_hopper if gluon else train_gpt.head_loss_fp8)


if train_gpt.HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rounded(x, packed, unpacked, relu_square, summed, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        value = tl.load(x + i, mask=i < n)
        rounded = train_gpt._bf16(value)
        tl.store(packed + i, rounded, mask=i < n)
        tl.store(unpacked + i, train_gpt._f32_of_bf16(rounded), mask=i < n)
        tl.store(relu_square + i, train_gpt._relu_square_bf16(rounded), mask=i < n)
        other = train_gpt._bf16(tl.load(x + n - 1 - i, mask=i < n))  # the values in reverse order
        tl.store(summed + i, train_gpt._add_bf16(rounded, other), mask=i < n)


def float32_cases(randoms: int, subnormals: int) -> torch.Tensor:
    """Finite float32s to round to bf16: `randoms` of random bits, every halfway case, and `subnormals`."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-2**31, 2**31 - 1, (randoms,), generator=gen).to(torch.int32).view(torch.float32)
    ties = torch.arange(1 << 16, dtype=torch.int32).mul(1 << 16).add(1 << 15).view(torch.float32)
    x = torch.cat([x, ties, 1e-38 * torch.randn(subnormals, generator=gen)])
    return x[torch.isfinite(x)]


@pytest.mark.skipif(not torch.cuda.is_available() or not train_gpt.HAS_TRITON, reason="needs a CUDA GPU and Triton")
def test_kernel_bf16_helpers_give_torchs_numbers():
    x = float32_cases(1 << 20, 1 << 16).cuda()
    packed, relu_square, summed = (torch.empty(len(x), dtype=torch.bfloat16, device="cuda") for _ in range(3))
    unpacked = torch.empty(len(x), device="cuda")
    _rounded[(triton.cdiv(len(x), 1024),)](x, packed, unpacked, relu_square, summed, len(x), 1024)
    rounded = x.bfloat16()
    assert torch.equal(packed.view(torch.int16), rounded.view(torch.int16))
    assert torch.equal(unpacked.view(torch.int32), rounded.float().view(torch.int32))  # each of a pair in its place
    assert torch.equal(relu_square.view(torch.int16), F.relu(rounded).square().view(torch.int16))
    expected_sums = (rounded.float() + rounded.flip(0).float()).bfloat16()
    assert torch.equal(summed.view(torch.int16), expected_sums.view(torch.int16))
