"""attention_inputs (QK norm, rotary and the value mix) through its fused ops, speedrun::qkv_prep and
speedrun::qkv_prep_grad in FusedAttentionInputs, against the plain path, attention_inputs_reference through
autograd:
- both ops pass torch.library.opcheck, also for a qkv that is not contiguous;
- q, k, v and the gradients of qkv, ve and the lambdas are as close to float64 math as the plain path's are, with
  and without a value embedding, for gradients in the strided layout that attention's backward gives, and for a
  token count that is not a multiple of the kernels' row block. On the CPU the ops run their reference bodies; on a
  CUDA GPU their Triton kernels;
- a GPT with the fused ops gives the plain GPT's loss;
- speedrun::qkv_matmul_prep (the qkv matmul, its rows scaled, with qkv_prep in its epilogue) passes opcheck, and on
  a Hopper GPU with Gluon its kernel gives, at the model's sizes, what cuBLAS's matmul (scaled by powers of two,
  exactly) and qkv_prep's kernel give, within a bf16 step of the larger (v: and lambdas[0] times a step of qkv's
  v)."""
import pytest
import torch

import train_gpt
from test_fused_mlp import devices as gluon_devices  # the CPU, and a Hopper GPU with Gluon
from test_fused_mlp import scales
from train_gpt import (Rotary, attention_inputs_fused, attention_inputs_reference, qk_rstd, qkv_matmul_prep,
                       qkv_prep, qkv_prep_grad)


def devices() -> list[str]:
    return ["cpu"] + ["cuda"] * (torch.cuda.is_available() and train_gpt.HAS_TRITON)


def inputs(device: str, T: int, H: int = 2, head_dim: int = 128, with_ve: bool = True, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    qkv = (3 * torch.randn(1, T, 3 * H, head_dim, generator=gen)).bfloat16()
    ve = torch.randn(T, H * head_dim, generator=gen).bfloat16() if with_ve else None
    lambdas = torch.tensor([0.7, 0.4])
    grads = [torch.randn(1, T, H, head_dim, generator=gen).bfloat16() for _ in range(3)]
    rotary = Rotary(head_dim, max_seq_len=2 * T)
    tensors = [t.to(device) if t is not None else None for t in (qkv, ve, lambdas)]
    return tensors, [g.to(device) for g in grads], rotary.to(device)


def run(qkv, ve, lambdas, grads, rotary, fused: bool, strided_grads: bool = False):
    """q, k, v and the gradients of qkv, ve and lambdas from one forward and backward."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (qkv, ve, lambdas)]
    outs = (attention_inputs_fused if fused else attention_inputs_reference)(*leaves, rotary)
    if strided_grads:  # FlexAttention's backward gives (B, H, T, head_dim) gradients, seen as (B, T, H, head_dim)
        grads = [g.transpose(1, 2).contiguous().transpose(1, 2) for g in grads]
    torch.autograd.backward(outs, grads)
    return [t.detach() for t in outs] + [t.grad for t in leaves if t is not None]


def float64_truth(qkv, ve, lambdas, grads, rotary):
    rotary64 = Rotary(qkv.size(-1), rotary.cos.size(0)).double().to(qkv.device)
    rotary64.cos, rotary64.sin = rotary.cos.double(), rotary.sin.double()
    args = [t.double() if t is not None else None for t in (qkv, ve, lambdas)]
    return run(*args, [g.double() for g in grads], rotary64, fused=False)


@pytest.mark.parametrize("device", devices())
def test_ops_pass_opcheck(device):
    (qkv, ve, lambdas), grads, rotary = inputs(device, T=48)
    cos, sin = rotary.cos[:48], rotary.sin[:48]
    permuted = qkv.transpose(1, 2).contiguous().transpose(1, 2)  # the same values, not contiguous
    for qkv_in, v_embed in [(qkv, ve), (qkv, None), (permuted, ve)]:
        torch.library.opcheck(qkv_prep, (qkv_in, v_embed, lambdas, cos, sin))
        torch.library.opcheck(qkv_prep_grad, (*grads, qkv_in, v_embed, lambdas, cos, sin))


@pytest.mark.parametrize("device", gluon_devices())
def test_qkv_matmul_prep_passes_opcheck(device):
    # a row block of the Gluon kernel's and one head of 128
    gen = torch.Generator().manual_seed(3)
    x, w = (torch.randn(*shape, generator=gen).bfloat16().to(device) for shape in ((1, 128, 128), (384, 128)))
    ve = torch.randn(128, 128, generator=gen).bfloat16().to(device)
    lambdas, rotary = torch.tensor([0.7, 0.4]).to(device), Rotary(128, 128).to(device)
    r = scales(128, device)[None]
    for v_embed in (ve, None):
        torch.library.opcheck(qkv_matmul_prep, (x, r, w * 0.1, v_embed, lambdas, rotary.cos, rotary.sin))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("with_ve", [True, False])
@pytest.mark.parametrize("strided_grads", [False, True])
def test_fused_is_as_close_to_float64_as_the_plain_path(device, with_ve, strided_grads):
    (qkv, ve, lambdas), grads, rotary = inputs(device, T=200, with_ve=with_ve)
    truth = float64_truth(qkv, ve, lambdas, grads, rotary)
    plain = run(qkv, ve, lambdas, grads, rotary, False, strided_grads)
    fused = run(qkv, ve, lambdas, grads, rotary, True, strided_grads)
    names = ["q", "k", "v", "grad_qkv"] + ["grad_ve"] * with_ve + ["grad_lambdas"]
    for name, got, expected, exact in zip(names, fused, plain, truth):
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        fused_err, plain_err = ((t.double() - exact).abs().max().item() for t in (got, expected))
        # the plain path rounds to bf16 between its steps, the fused ops once: they are at least as close
        assert fused_err <= plain_err * 1.01 + 1e-12, f"{name}: {fused_err:.3e}, the plain path {plain_err:.3e}"


def test_fused_gpt_matches_the_plain_gpt(monkeypatch):
    def loss(fused: bool):
        bound = attention_inputs_fused if fused else attention_inputs_reference
        monkeypatch.setattr(train_gpt, "attention_inputs", bound)
        torch.manual_seed(0)
        model = train_gpt.GPT(vocab_size=128, num_layers=2, num_heads=2, model_dim=64, max_seq_len=256)
        torch.nn.init.normal_(model.lm_head.weight, std=0.1)  # not its zero init, so that the loss moves
        tokens = torch.randint(0, 128, (257,), generator=torch.Generator().manual_seed(1))
        return model(tokens[:-1], tokens[1:], torch.tensor(2)).item()

    assert loss(True) == pytest.approx(loss(False), abs=1e-3)


def test_fused_qkv_is_off_on_the_cpu(restore_ops):
    lines = train_gpt.bind_ops(train_gpt.Hyperparameters(), torch.device("cpu"))
    assert train_gpt.attention_inputs is attention_inputs_reference
    assert "fused_qkv: off (no Triton on cpu); QK norm, rotary and the value mix run as plain PyTorch" in lines


def assert_close_to_the_reference(fused: tuple, reference: tuple, raw_v: torch.Tensor, lambdas: torch.Tensor):
    """qkv_matmul_prep's kernel against its reference body: the two matmuls' float32 sums may round an element of
    qkv to neighbouring bf16 values, which v takes times lambdas[0], and q and k, normed, within a step of the
    larger. raw_v: qkv's v."""
    raw_v = raw_v.double()
    for part, got, expected in zip(("q", "k", "v", "rstd", "raw_v"), fused, reference):
        assert got.dtype == expected.dtype and got.shape == expected.shape, part
        got, expected = got.double(), expected.double()
        step = torch.maximum(got.abs(), expected.abs()) * 2**-7 + 1e-6 * expected.abs().max()
        if part in ("v", "raw_v"):
            step = step + lambdas[0].item() * raw_v.abs() * 2**-7
        assert ((got - expected).abs() <= step).all(), f"{part}: up to {(got - expected).abs().max().item():.3e}"


@pytest.mark.skipif("cuda" not in gluon_devices(), reason="needs a Hopper GPU with Triton's Gluon")
@pytest.mark.parametrize("with_ve", [True, False])
def test_qkv_matmul_prep_kernel_gives_the_reference_at_the_models_sizes(with_ve):
    T, H = 8 * 1024 + 64, 6  # a last, partial row block
    gen = torch.Generator().manual_seed(4)
    x, w = torch.randn(1, T, H * 128, generator=gen).bfloat16().cuda(), (
        torch.randn(3 * H * 128, H * 128, generator=gen) * (H * 128) ** -0.5).bfloat16().cuda()
    ve = torch.randn(T, H * 128, generator=gen).bfloat16().cuda() if with_ve else None
    lambdas, rotary = torch.tensor([0.7, 0.4]).cuda(), Rotary(128, T).cuda()
    r = scales(T, "cuda", seed=5, powers_of_two=True)[None]  # the bar is the matmul's alone: see scales
    fused = qkv_matmul_prep(x, r, w, ve, lambdas, rotary.cos, rotary.sin)
    # the ops it replaces: cuBLAS's matmul, the row scales (powers of two: exact in bf16), then qkv_prep's
    qkv = (r * torch.nn.functional.linear(x, w)).bfloat16().view(1, T, 3 * H, 128)
    reference = (*qkv_prep(qkv, ve, lambdas, rotary.cos, rotary.sin), qk_rstd(qkv), qkv[:, :, 2 * H:])
    assert_close_to_the_reference(fused, reference, qkv[:, :, 2 * H:], lambdas)
