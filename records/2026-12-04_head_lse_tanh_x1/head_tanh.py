"""The head loss's soft cap z = 30 sigmoid(x / 7.5) with the sigmoid as (1 + tanh(x / 15)) / 2 by
`tanh.approx.f32`, against the checkout's _sigmoid_kernel (ex2 and rcp.approx.ftz), at every finite bf16 logit x,
against float64. A row sum's relative error is at most the largest |z error| over the row's logits (sum e^z, each
term off by a factor e^dz), so the table bounds the log-sum-exp's error at any logits. Then one 8192-token chunk's
row sums and their time: the checkout's _lse_kernel against the same kernel with the tanh sigmoid in its loop (the
target's z as before), in turns, for logits of standard deviation 3, 10 and 20.

The committed output ran in a checkout of 5a800a2, whose _lse_kernel had the exact sigmoid in its loop. From the
commit that adopts the tanh row sums on, "train_gpt.py" below is the tanh kernel too.

Usage: python records/2026-12-04_head_lse_tanh_x1/head_tanh.py
"""
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
import train_gpt as tg  # noqa: E402
from train_gpt import _exp_kernel, _sigmoid_kernel  # noqa: E402
from matmul_peak import median_ms  # noqa: E402

CAP, TEMPERATURE = tg.SOFTCAP, tg.SOFTCAP_TEMPERATURE


@triton.jit
def _sigmoid_tanh(x, TEMPERATURE: tl.constexpr):
    t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x * (0.5 / TEMPERATURE)], dtype=tl.float32,
                                  is_pure=True, pack=1)
    return 0.5 + 0.5 * t


@triton.jit
def _softcap(x, z_exact, z_tanh, n, CAP: tl.constexpr, TEMPERATURE: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x + i, mask=i < n).to(tl.float32)
    tl.store(z_exact + i, CAP * _sigmoid_kernel(x, TEMPERATURE), mask=i < n)
    tl.store(z_tanh + i, CAP * _sigmoid_tanh(x, TEMPERATURE), mask=i < n)


@triton.jit
def _lse_tanh_kernel(logits, targets, lse, losses, n, V, CAP: tl.constexpr, TEMPERATURE: tl.constexpr,
                     ROWS: tl.constexpr, COLS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n
    row_start = rows.to(tl.int64) * V
    total = tl.zeros((ROWS,), dtype=tl.float32)
    for start in range(0, V, COLS):
        cols = start + tl.arange(0, COLS)
        ok = row_ok[:, None] & (cols < V)[None, :]
        s = _sigmoid_tanh(tl.load(logits + row_start[:, None] + cols[None, :], mask=ok).to(tl.float32), TEMPERATURE)
        total += tl.sum(tl.where(ok, _exp_kernel(CAP * s), 0.0), axis=1)
    row_lse = tl.log(total)
    z_target = CAP * _sigmoid_kernel(tl.load(logits + row_start + tl.load(targets + rows, mask=row_ok),
                                                mask=row_ok).to(tl.float32), TEMPERATURE)
    tl.store(lse + rows, row_lse, mask=row_ok)
    tl.store(losses + rows, row_lse - z_target, mask=row_ok)


def main():
    x = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    x = x[torch.isfinite(x)].cuda()
    z_exact, z_tanh = torch.empty_like(x, dtype=torch.float32), torch.empty_like(x, dtype=torch.float32)
    _softcap[(triton.cdiv(len(x), 1024),)](x, z_exact, z_tanh, len(x), CAP, TEMPERATURE, 1024)
    z64 = CAP * torch.sigmoid(x.double() / TEMPERATURE)
    print("|x| range: max |z error| of train_gpt.py's sigmoid, of the tanh sigmoid (z = 30 sigmoid(x / 7.5))")
    for lo, hi in ((0, 1), (1, 4), (4, 16), (16, 64), (64, 256), (256, float("inf"))):
        band = (x.double().abs() >= lo) & (x.double().abs() < hi)
        e, t = ((z.double() - z64)[band].abs().max().item() for z in (z_exact, z_tanh))
        print(f"  {lo:>4} <= |x| < {hi:<4}: {e:.3e}, {t:.3e}")
    n, V = tg.HEAD_CHUNK, 50304
    gen = torch.Generator(device="cuda").manual_seed(0)
    targets = torch.randint(0, V, (n,), device="cuda", generator=gen)
    for scale in (3, 10, 20):
        logits = (scale * torch.randn(n, V, device="cuda", generator=gen)).bfloat16()
        z = CAP * torch.sigmoid(logits.double() / TEMPERATURE)
        lse64 = z.logsumexp(-1)
        runs = {}
        for name, kernel in (("train_gpt.py", tg._lse_kernel), ("tanh", _lse_tanh_kernel)):
            lse, losses = (torch.empty(n, device="cuda") for _ in range(2))

            def call(kernel=kernel, lse=lse, losses=losses):
                kernel[(triton.cdiv(n, tg.LSE_ROWS),)](logits, targets, lse, losses, n, V, CAP, TEMPERATURE,
                                                      tg.LSE_ROWS, tg.LSE_COLS, num_warps=tg.LSE_WARPS)
            call()
            runs[name] = call, (lse.double() - lse64).abs().max().item(), (lse.double() - lse64).mean().item()
        times = {name: [] for name in runs}
        for _ in range(7):
            for name, (call, _, _) in runs.items():
                times[name].append(median_ms(call, reps=10, calls=20))
        for name, (_, err, bias) in runs.items():
            print(f"logits {scale:2d} x N(0, 1), {name}: row sums {sorted(times[name])[3]:.3f} ms a chunk, "
                  f"log-sum-exp max |error| {err:.3e}, mean error {bias:.3e}")


if __name__ == "__main__":
    main()
