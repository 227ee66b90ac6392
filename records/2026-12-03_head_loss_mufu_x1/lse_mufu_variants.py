"""Speed lead 2, reopened: the head loss's kernels are bound by the special-function unit (three transcendental
instructions a logit a pass: the sigmoid's exponential and reciprocal, then exp(z); round 9). Does moving some of
them to the FMA units pay, as FlashAttention-4 does with its exponentials? Variants of train_gpt.py's row-sum
kernel (_lse_kernel, 1 row x 2048 logits, 4 warps) on one 8192-token chunk of bf16 logits:
- exp(z) as 2^(z log2 e) from a polynomial: 2^f for f in [-1/2, 1/2] by its Taylor series to degree 6 (relative
  error about 1e-7, near ex2.approx's), times 2^j put into the exponent bits;
- also the sigmoid's exponential so;
- also the sigmoid's reciprocal by Newton's method from a bit-level first guess (three steps).
Each variant's log-sum-exp is compared with float64's, its summed loss with train_gpt.py's kernel's; the variants
are timed in turns, 7 rounds. (The outcome, in the README beside this: every variant is slower.)

Usage: python records/2026-12-03_head_loss_mufu_x1/lse_mufu_variants.py
"""
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
import train_gpt as tg  # noqa: E402
from matmul_peak import median_ms  # noqa: E402

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _exp2_fma(x):
    """2^x on the FMA units, x in [-126, 126]."""
    j = tl.floor(x + 0.5)
    f = x - j  # in [-1/2, 1/2]: 2^f = e^(f ln 2), its Taylor series to degree 6
    p = 0.00015403530393381606
    p = p * f + 0.0013333558146428443
    p = p * f + 0.009618129107628477
    p = p * f + 0.05550410866482158
    p = p * f + 0.2402265069591007
    p = p * f + 0.6931471805599453
    p = p * f + 1.0
    return (p.to(tl.int32, bitcast=True) + (j.to(tl.int32) << 23)).to(tl.float32, bitcast=True)


@triton.jit
def _rcp_fma(d):
    """1 / d for normal positive d: the bit-level first guess (relative error under 1/8), then three Newton steps."""
    r = (0x7EF311C3 - d.to(tl.int32, bitcast=True)).to(tl.float32, bitcast=True)
    r = r * (2.0 - d * r)
    r = r * (2.0 - d * r)
    return r * (2.0 - d * r)


@triton.jit
def _sigmoid(logits, TEMPERATURE: tl.constexpr, EXP_FMA: tl.constexpr, RCP_FMA: tl.constexpr):
    if EXP_FMA:
        e = _exp2_fma(tl.minimum(tl.maximum(logits * (-LOG2E / TEMPERATURE), -126.0), 126.0))
    else:
        e = tl.exp(logits * (-1.0 / TEMPERATURE))
    if RCP_FMA:
        return _rcp_fma(1.0 + e)
    return tl.fdiv(1.0, 1.0 + e)


@triton.jit
def lse_variant(logits, targets, lse, losses, n, V, CAP: tl.constexpr, TEMPERATURE: tl.constexpr,
                ROWS: tl.constexpr, COLS: tl.constexpr, Z_FMA: tl.constexpr, SIG_EXP_FMA: tl.constexpr,
                SIG_RCP_FMA: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n
    row_start = rows.to(tl.int64) * V
    total = tl.zeros((ROWS,), dtype=tl.float32)
    for start in range(0, V, COLS):
        cols = start + tl.arange(0, COLS)
        ok = row_ok[:, None] & (cols < V)[None, :]
        s = _sigmoid(tl.load(logits + row_start[:, None] + cols[None, :], mask=ok).to(tl.float32), TEMPERATURE,
                     SIG_EXP_FMA, SIG_RCP_FMA)
        if Z_FMA:
            ez = _exp2_fma(s * (CAP * LOG2E))
        else:
            ez = tl.exp(CAP * s)
        total += tl.sum(tl.where(ok, ez, 0.0), axis=1)
    row_lse = tl.log(total)
    z_target = CAP * _sigmoid(tl.load(logits + row_start + tl.load(targets + rows, mask=row_ok), mask=row_ok)
                              .to(tl.float32), TEMPERATURE, False, False)
    tl.store(lse + rows, row_lse, mask=row_ok)
    tl.store(losses + rows, row_lse - z_target, mask=row_ok)


def main():
    n, V = tg.HEAD_CHUNK, 50304
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = (3 * torch.randn(n, V, device="cuda", generator=gen)).bfloat16()
    targets = torch.randint(0, V, (n,), device="cuda", generator=gen)
    C, TEMP = tg.SOFTCAP, tg.SOFTCAP_TEMPERATURE
    ref_lse, ref_losses = torch.empty(n, device="cuda"), torch.empty(n, device="cuda")
    run_ref = lambda: tg._lse_kernel[(n,)](logits, targets, ref_lse, ref_losses, n, V, C, TEMP, 1, 2048,  # noqa
                                           num_warps=4)
    run_ref()
    exact = torch.sigmoid(logits.double() / TEMP).mul(C).exp().sum(1).log()  # float64
    lse, losses = torch.empty(n, device="cuda"), torch.empty(n, device="cuda")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, f"chunk {n} x {V}")
    print(f"train_gpt's kernel: max |lse - float64| {(ref_lse.double() - exact).abs().max().item():.2e}")
    variants = [("train_gpt's kernel", None), ("the same, as a variant", (False, False, False)),
                ("exp(z) on the FMA units", (True, False, False)),
                ("exp(z) and the sigmoid's exp on the FMA units", (True, True, False)),
                ("all three on the FMA units", (True, True, True)),
                ("exp(z) and the sigmoid's reciprocal on the FMA units", (True, False, True))]
    rows = []
    for name, switches in variants:
        fn = run_ref if switches is None else (lambda switches=switches: lse_variant[(n,)](
            logits, targets, lse, losses, n, V, C, TEMP, 1, 2048, *switches, num_warps=4))
        fn()
        got = ref_lse if switches is None else lse
        diff = (got.double() - exact).abs().max().item()
        loss_diff = (losses.sum() - ref_losses.sum()).item() if switches else 0.0
        rows.append((name, diff, loss_diff, fn, []))
    for _ in range(7):  # in turns, so that a drift of the clocks reaches every variant alike
        for name, diff, loss_diff, fn, times in rows:
            times.append(median_ms(fn, reps=10, calls=20))
    for name, diff, loss_diff, fn, times in rows:
        ms = sorted(times)[len(times) // 2]
        print(f"{ms:.3f} ms ({min(times):.3f}-{max(times):.3f})  max |lse - float64| {diff:.2e}, "
              f"summed loss - train_gpt's {loss_diff:+.3e}  {name}")


if __name__ == "__main__":
    main()
