"""The head loss's middle step on one 8192-token chunk, on this machine's first GPU: the bf16 logits -> the summed
loss and the logits' gradient g in float8_e5m2, in both layouts.
- Time: train_gpt.py's Triton kernels, for the block shapes listed, against the torch.compile of the same torch
  function plus a compiled transpose.
- Agreement: the kernels against the eager torch function on the GPU, which rounds as the record does. Each line
  gives the loss's relative difference and how many of g's bytes differ (one e5m2 step each).

Usage: python benchmarks/logit_grad_check.py
"""
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as tg  # noqa: E402
from matmul_peak import median_ms  # noqa: E402


def main():
    n, V, T = tg.HEAD_CHUNK, 50304, 65536
    inv_tokens, grad_s = 1 / T, tg.FP8_GRAD_SCALE_PER_TOKEN * T
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = (3 * torch.randn(n, V, device="cuda", generator=gen)).bfloat16()  # spans the soft cap's bend
    targets = torch.randint(0, V, (n,), device="cuda", generator=gen)

    def compiled_half(logits, targets):
        loss, g, _ = tg._loss_and_logit_grad(logits, targets, inv_tokens, None)
        return loss, g.mul(grad_s).to(torch.float8_e5m2)

    compiled_half = torch.compile(compiled_half, dynamic=False, options={"emulate_precision_casts": True})
    transpose = torch.compile(lambda g: g.T.contiguous(), dynamic=False)

    def compiled():
        loss, g = compiled_half(logits, targets)
        return loss, g, transpose(g)

    ref_loss, ref_g, _ = tg._loss_and_logit_grad(logits, targets, inv_tokens, grad_s)

    def report(name, fn):
        loss, g, g_t = fn()
        differ = (g.view(torch.uint8) != ref_g.view(torch.uint8)).sum().item()
        assert torch.equal(g_t.view(torch.uint8), g.T.contiguous().view(torch.uint8)), name
        print(f"{median_ms(fn):7.3f} ms  {name}  loss rel diff {abs(loss / ref_loss - 1).item():.1e}  "
              f"g bytes differing {differ} of {g.numel()}", flush=True)

    print(torch.cuda.get_device_name(), "torch", torch.__version__, f"chunk {n} x {V}")
    report("torch.compile + transpose", compiled)
    lse_blocks = [(1, 2048, 4), (1, 2048, 8), (1, 8192, 8), (1, 512, 2)]
    grad_blocks = [(64, 64, 4), (32, 64, 4), (64, 32, 4), (32, 128, 4), (64, 64, 2), (32, 32, 2), (128, 32, 4),
                   (64, 64, 8), (64, 128, 4)]
    for (lse_rows, lse_cols, lse_warps), (rows, cols, warps) in itertools.chain(
            ((b, grad_blocks[0]) for b in lse_blocks), ((lse_blocks[0], b) for b in grad_blocks[1:])):
        tg.HEAD_LSE = tg.Tile((lse_rows, lse_cols), lse_warps, tg.HEAD_LSE.stages)
        tg.HEAD_GRAD = tg.Tile((rows, cols), warps, tg.HEAD_GRAD.stages)
        report(f"triton lse {lse_rows}x{lse_cols} w{lse_warps}, grad {rows}x{cols} w{warps}",
               lambda: tg._loss_and_logit_grad_triton(logits, targets, inv_tokens, grad_s))


if __name__ == "__main__":
    main()
