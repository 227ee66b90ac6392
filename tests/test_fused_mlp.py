"""The fused MLP (custom ops speedrun::matmul_relu2 and speedrun::matmul_relu2_grad, and FusedReLU2MLP, which
relu2_mlp_fused runs, and bind_ops binds on Hopper) against the plain path it replaces, relu2_mlp_reference through
autograd, each of the MLP of norm(x) given as x and its row scale r:
- both ops pass torch.library.opcheck;
- the backward's relu(a), which it takes from h = relu(a)^2 (relu_of_square), is relu(a) itself for every bf16 a in
  the range the function claims;
- the MLP's output and the gradients of x (through r too) and both weights are as close to float64's as the plain
  path's, or closer: the plain path rounds norm(x) to bf16 before the matmul, the fused one scales the matmul's
  float32 sums by r (on the CPU the ops run their reference bodies, on a Hopper GPU their Gluon matmul);
- on a Hopper GPU, at a shape where the two warpgroups of the Gluon matmul share its ring, the ops agree with
  float64 matmuls rounded as they round;
- a GPT with the fused MLP gives about the plain GPT's loss and gradients."""
import pytest
import torch

import train_gpt
from train_gpt import (MLP, matmul_relu2, matmul_relu2_grad, relu2_mlp_fused, relu2_mlp_reference, relu_of_square,
                       row_scale, triton_on_hopper)


def devices() -> list[str]:
    cuda = torch.cuda.is_available() and triton_on_hopper(torch.device("cuda"))[0] and train_gpt.HAS_GLUON
    return ["cpu"] + ["cuda"] * cuda


def bf16(*shape, scale=1.0, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=gen)).bfloat16().to(device)


def scales(n, device="cpu", seed=0, powers_of_two=False):
    """n row scales (n, 1) float32, as row_scale gives for rows of rms 1/4 to 4; or only 1/4, 1/2, 1, 2, 4, which
    scale a float32 sum without moving where it rounds to bf16."""
    gen = torch.Generator().manual_seed(seed)
    exponents = torch.randint(-2, 3, (n, 1), generator=gen).float() if powers_of_two else 4 * torch.rand(n, 1, generator=gen) - 2
    return (2.0 ** exponents).to(device)


@pytest.mark.parametrize("device", devices())
def test_ops_pass_opcheck(device):
    # the GPU kernels want multiples of their 128-row blocks; the CPU takes any shape
    n, d, h = 256, 64, 256
    x, w_fc, w_proj = bf16(n, d, device=device), bf16(h, d, scale=0.1, device=device, seed=1), bf16(
        d, h, scale=0.1, device=device, seed=2)
    r = scales(n, device=device)
    torch.library.opcheck(matmul_relu2, (x, w_fc, r))
    hidden = matmul_relu2(x, w_fc, r)
    torch.library.opcheck(matmul_relu2_grad, (bf16(n, d, device=device, seed=3), w_proj, hidden, r))


def test_relu_of_square_gives_relu_back_for_every_bf16():
    a = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)  # every bf16
    a = a[torch.isfinite(a)]
    relu_a = torch.relu(a.float())
    h = (relu_a * relu_a).bfloat16()  # as the forward rounds it: squared in float32, rounded once
    in_range = (relu_a >= 2.0**-63) & (relu_a < 2.0**64)
    assert in_range.sum() == 127 * 128  # 127 binades of 128 values
    claimed = (relu_a == 0) | in_range  # zero and every negative a, and those
    assert torch.equal(relu_of_square(h)[claimed].float(), relu_a[claimed])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("seed", range(3))
def test_fused_mlp_is_as_close_to_float64_as_the_plain_path(device, seed, monkeypatch):
    n, d = 256, 64
    mlp = MLP(d).to(device)
    with torch.no_grad():  # not c_proj's zero init
        mlp.c_proj.weight.normal_(0, 0.1, generator=torch.Generator(device).manual_seed(4 + seed))
    x = bf16(1, n, d, scale=3.0, device=device, seed=seed).requires_grad_()
    grad_y = bf16(1, n, d, device=device, seed=5 + seed)

    def run(fused: bool):
        monkeypatch.setattr(train_gpt, "relu2_mlp", relu2_mlp_fused if fused else relu2_mlp_reference)
        x.grad = mlp.c_fc.weight.grad = mlp.c_proj.weight.grad = None
        y = mlp(x, row_scale(x))
        y.backward(grad_y)
        return [t.clone() for t in (y, x.grad, mlp.c_fc.weight.grad, mlp.c_proj.weight.grad)]

    x64, w_fc, w_proj = (t.detach().double().requires_grad_() for t in (x, mlp.c_fc.weight.bfloat16(),
                                                                         mlp.c_proj.weight.bfloat16()))
    y64 = torch.relu(x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + 2**-23) @ w_fc.T).square() @ w_proj.T
    y64.backward(grad_y.double())
    truth = [y64.detach(), x64.grad, w_fc.grad, w_proj.grad]
    for name, got, plain, exact in zip(["y", "grad_x", "grad_w_fc", "grad_w_proj"], run(True), run(False), truth):
        assert got.dtype == plain.dtype and got.shape == plain.shape, name
        fused_err, plain_err = ((t.double() - exact).norm().item() for t in (got, plain))
        assert fused_err <= plain_err, f"{name}: {fused_err:.3e}, the plain path's {plain_err:.3e}"


def assert_rounds_as_float64_matmuls(x, r, w_fc, w_proj, grad_y, hidden, grad_a):
    """The kernels' h = relu(a)^2 for a = r (x @ w_fc.T), and grad_a = r (grad_y @ w_proj) 2 relu(a), each matmul
    summed in float32 (and grad_y @ w_proj rounded to bf16) before its elementwise step, against float64 matmuls:
    h is relu(a)'s square rounded, exactly; relu(a) and grad_a are within a rounding or two of float64's, plus what
    a float32 sum of K products may lose, K 2^-24 of their absolute sum (here 4 K 2^-24): where the products nearly
    cancel, that is more than a bf16 step of the small result, and a float32 sum can round such an a to another bf16
    value."""
    def check(got, exact, slack, rtol, name):
        bound = rtol * exact.abs() + slack
        bad = (got.double() - exact).abs() > bound
        assert not bad.any(), f"{name}: {bad.sum().item()} of {bad.numel()} outside the bar, the worst " \
            f"{((got.double() - exact).abs() / bound).max().item():.2f} times it"

    def float32_sum_slack(a, b):  # a @ b's products summed in float32: 4 K 2^-24 of their absolute sum
        return 4 * a.size(1) * 2**-24 * (a.double().abs() @ b.double().abs())

    relu_a, r = relu_of_square(hidden).double(), r.double()
    assert torch.equal(hidden, (relu_a ** 2).bfloat16())
    check(relu_a, torch.relu(r * (x.double() @ w_fc.double().T)), r * float32_sum_slack(x, w_fc.T), 2**-7,
          "relu(a)")
    exact = r * (grad_y.double() @ w_proj.double()) * 2 * relu_a
    check(grad_a, exact, r * 2 * relu_a * float32_sum_slack(grad_y, w_proj), 2**-6, "grad_a")


@pytest.mark.skipif("cuda" not in devices(), reason="needs a Hopper GPU with Triton's Gluon")
def test_kernels_with_many_tiles_and_steps_a_program():
    # several tiles a program on every SM and more steps along K than the ring has stages: the shapes at which the
    # two warpgroups share the ring
    n, d, h = 64 * 1024, 512, 1024
    x, w_fc, w_proj = bf16(n, d, device="cuda"), bf16(h, d, scale=0.05, device="cuda", seed=1), bf16(
        d, h, scale=0.05, device="cuda", seed=2)
    grad_y, r = bf16(n, d, device="cuda", seed=3), scales(n, device="cuda", seed=4)
    hidden = matmul_relu2(x, w_fc, r)
    assert_rounds_as_float64_matmuls(x, r, w_fc, w_proj, grad_y, hidden,
                                     matmul_relu2_grad(grad_y, w_proj, hidden, r))


def test_fused_gpt_is_about_the_plain_gpt(monkeypatch):
    def loss_and_grads(fused: bool):
        monkeypatch.setattr(train_gpt, "relu2_mlp", relu2_mlp_fused if fused else relu2_mlp_reference)
        torch.manual_seed(0)
        model = train_gpt.GPT(vocab_size=128, num_layers=2, num_heads=2, model_dim=32, max_seq_len=256)
        for block in model.blocks:  # not the zero init, so that the MLPs matter
            torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.1)
        torch.nn.init.normal_(model.lm_head.weight, std=0.1)
        tokens = torch.randint(0, 128, (257,), generator=torch.Generator().manual_seed(1))
        loss = model(tokens[:-1], tokens[1:], torch.tensor(2))
        loss.backward()
        for table in train_gpt.embedding_tables(model):
            table.take_grad()
        return loss.detach(), {name: p.grad for name, p in model.named_parameters()}

    plain_loss, plain_grads = loss_and_grads(False)
    fused_loss, fused_grads = loss_and_grads(True)
    # the two round norm(x) apart (see above): their losses part by a bf16 step's effect, their gradients by a few
    # steps of their largest value
    torch.testing.assert_close(fused_loss, plain_loss, rtol=2**-8, atol=0)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=0, atol=2**-5 * grad.abs().max().item(), msg=name)


def test_fused_mlp_is_off_without_hopper(restore_ops):
    assert triton_on_hopper(torch.device("cpu")) == (False, "no Triton on cpu")
    lines = train_gpt.bind_ops(train_gpt.Hyperparameters(), torch.device("cpu"))
    assert train_gpt.relu2_mlp is relu2_mlp_reference
    assert "fused_mlp: off (no Triton on cpu); its matmuls and ReLU^2 run as plain PyTorch" in lines


def test_fused_mlp_is_off_without_gluon(restore_ops, monkeypatch):
    monkeypatch.setattr(train_gpt, "triton_on_hopper", lambda device: (True, ""))
    monkeypatch.setattr(train_gpt, "HAS_GLUON", False)
    lines = train_gpt.bind_ops(train_gpt.Hyperparameters(), torch.device("cpu"))
    assert train_gpt.relu2_mlp is relu2_mlp_reference
    assert "fused_mlp: off (this Triton has no Gluon); its matmuls and ReLU^2 run as plain PyTorch" in lines
