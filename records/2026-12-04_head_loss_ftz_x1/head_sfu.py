"""Speed lead 2 again: fewer or cheaper special-function instructions in the head loss's two kernels.
Round 10 moved them to the FMA units (slower). Here they stay on that unit, in two other forms:
- MODE 1, "ftz": exp as ex2.approx.ftz and the sigmoid's reciprocal as rcp.approx.ftz by inline PTX, where
  tl.exp and tl.fdiv may add subnormal handling around them; still three a logit, the same math to float32 ulps;
- MODE 2, "tanh": sigmoid(x) = (1 + tanh(x / 2)) / 2 with tanh.approx.f32 (one instruction, relative error
  about 2^-11), then exp as ex2.approx.ftz: two a logit instead of three.
MODE 0 is train_gpt.py's kernels as they were before (tl.exp, tl.fdiv); "mode None" is train_gpt.py's kernels as
they are in the checkout that runs this. Each variant of _lse_kernel and _logit_grad_kernel (FP8, both layouts) on
one 8192-token chunk of bf16 logits (3 x standard normal), timed in turns, 7 rounds; the log-sum-exp against
float64's, the summed loss and the gradients (FP8 in both layouts, and bf16) against train_gpt.py's kernels.

Usage: python records/2026-12-04_head_loss_ftz_x1/head_sfu.py
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
def _ex2(x):
    return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def _rcp(x):
    return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def _tanh(x):
    return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def _sig(x, TEMPERATURE: tl.constexpr, MODE: tl.constexpr):
    if MODE == 0:
        return tl.fdiv(1.0, 1.0 + tl.exp(x * (-1.0 / TEMPERATURE)))
    elif MODE == 1:
        return _rcp(1.0 + _ex2((x * (-1.0 / TEMPERATURE)) * LOG2E))
    else:
        return 0.5 + 0.5 * _tanh(x * (0.5 / TEMPERATURE))


@triton.jit
def _exp(x, MODE: tl.constexpr):
    if MODE == 0:
        return tl.exp(x)
    else:
        return _ex2(x * LOG2E)


@triton.jit
def lse_variant(logits, targets, lse, losses, n, V, CAP: tl.constexpr, TEMPERATURE: tl.constexpr,
                ROWS: tl.constexpr, COLS: tl.constexpr, MODE: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n
    row_start = rows.to(tl.int64) * V
    total = tl.zeros((ROWS,), dtype=tl.float32)
    for start in range(0, V, COLS):
        cols = start + tl.arange(0, COLS)
        ok = row_ok[:, None] & (cols < V)[None, :]
        s = _sig(tl.load(logits + row_start[:, None] + cols[None, :], mask=ok).to(tl.float32), TEMPERATURE, MODE)
        total += tl.sum(tl.where(ok, _exp(CAP * s, MODE), 0.0), axis=1)
    row_lse = tl.log(total)
    z_target = CAP * _sig(tl.load(logits + row_start + tl.load(targets + rows, mask=row_ok), mask=row_ok)
                          .to(tl.float32), TEMPERATURE, MODE)
    tl.store(lse + rows, row_lse, mask=row_ok)
    tl.store(losses + rows, row_lse - z_target, mask=row_ok)


@triton.jit
def grad_variant(logits, targets, lse, g, g_t, n, V, t_stride, inv_tokens, grad_s, FP8: tl.constexpr,
                 CAP: tl.constexpr, TEMPERATURE: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
                 MODE: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * COLS + tl.arange(0, COLS)
    ok = (rows < n)[:, None] & (cols < V)[None, :]
    offsets = rows.to(tl.int64)[:, None] * V + cols[None, :]
    s = _sig(tl.load(logits + offsets, mask=ok).to(tl.float32), TEMPERATURE, MODE)
    p = _exp(CAP * s - tl.load(lse + rows, mask=rows < n)[:, None], MODE)
    dz = tl.where(cols[None, :] == tl.load(targets + rows, mask=rows < n)[:, None], p - 1, p)
    grad = (dz * inv_tokens * (CAP / TEMPERATURE) * s * (1 - s)).to(tl.bfloat16)
    if FP8:
        grad = (grad.to(tl.float32) * grad_s).to(tl.float8e5)
        t_offsets = cols.to(tl.int64)[:, None] * t_stride + rows[None, :]
        tl.store(g_t + t_offsets, tl.trans(grad), mask=tl.trans(ok))
    tl.store(g + offsets, grad, mask=ok)


def main():
    n, V = tg.HEAD_CHUNK, 50304
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = (3 * torch.randn(n, V, device="cuda", generator=gen)).bfloat16()
    targets = torch.randint(0, V, (n,), device="cuda", generator=gen)
    C, TEMP = tg.SOFTCAP, tg.SOFTCAP_TEMPERATURE
    inv_tokens, grad_s = 1 / 65536, 2.0 ** 29  # as the head's for one 64K-token sequence
    exact = torch.sigmoid(logits.double() / TEMP).mul(C).exp().sum(1).log()  # float64
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, f"chunk {n} x {V}")

    out = {}  # mode -> (lse, losses, g, g_t, g_bf16)
    def lse_fn(mode, lse, losses):
        if mode is None:
            return lambda: tg._lse_kernel[(n,)](logits, targets, lse, losses, n, V, C, TEMP, 1, 2048, num_warps=4)
        return lambda: lse_variant[(n,)](logits, targets, lse, losses, n, V, C, TEMP, 1, 2048, mode, num_warps=4)

    def grad_fn(mode, lse, g, g_t, fp8=True):
        R, K, W = tg.GRAD_ROWS, tg.GRAD_COLS, tg.GRAD_WARPS
        grid = (triton.cdiv(n, R), triton.cdiv(V, K))
        if mode is None:
            return lambda: tg._logit_grad_kernel[grid](logits, targets, lse, g, g_t, n, V, n, inv_tokens, grad_s,
                                                       fp8, C, TEMP, R, K, num_warps=W)
        return lambda: grad_variant[grid](logits, targets, lse, g, g_t, n, V, n, inv_tokens, grad_s, fp8, C, TEMP,
                                          R, K, mode, num_warps=W)

    fns = []
    for mode in (None, 0, 1, 2):
        lse, losses = torch.empty(n, device="cuda"), torch.empty(n, device="cuda")
        g = torch.empty(n, V, device="cuda", dtype=torch.float8_e5m2)
        g_t = torch.empty(V, n, device="cuda", dtype=torch.float8_e5m2)
        g16 = torch.empty(n, V, device="cuda", dtype=torch.bfloat16)
        try:
            f_lse, f_grad = lse_fn(mode, lse, losses), grad_fn(mode, lse, g, g_t)
            f_lse(); f_grad()
            grad_fn(mode, lse, g16, g16, fp8=False)()
        except Exception as e:  # noqa: BLE001 - report and go on with the other variants
            print(f"mode {mode}: {type(e).__name__}: {str(e)[:300]}")
            continue
        torch.cuda.synchronize()
        out[mode] = (lse, losses, g, g_t, g16)
        fns.append((mode, "lse", f_lse, []))
        fns.append((mode, "grad", f_grad, []))
    ref = out[None]
    for mode, (lse, losses, g, g_t, g16) in out.items():
        d16 = g16.float() - ref[4].float()
        print(f"mode {mode}: max |lse - float64| {(lse.double() - exact).abs().max().item():.2e}, "
              f"mean (lse - float64) {(lse.double() - exact).mean().item():+.2e}, "
              f"summed loss - train_gpt's {(losses.sum() - ref[1].sum()).item():+.3e}; "
              f"FP8 g bytes unlike train_gpt's {(g.view(torch.uint8) != ref[2].view(torch.uint8)).float().mean().item():.2e}, "
              f"g_t {(g_t.view(torch.uint8) != ref[3].view(torch.uint8)).float().mean().item():.2e}; "
              f"bf16 g: max |diff| / max |g| {d16.abs().max().item() / ref[4].float().abs().max().item():.2e}, "
              f"sum diff / sum |g| {d16.sum().item() / ref[4].float().abs().sum().item():+.2e}")
    for _ in range(7):
        for mode, kind, fn, times in fns:
            times.append(median_ms(fn, reps=10, calls=20))
    for mode, kind, fn, times in fns:
        print(f"{kind:4s} mode {mode}: {sorted(times)[3]:.3f} ms ({min(times):.3f}-{max(times):.3f})")


if __name__ == "__main__":
    main()
