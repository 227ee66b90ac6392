"""A hand-written Triton kernel for the lm_head loss's row reduction, tried and not adopted (issue 5, round 2).

The kernel takes ROWS rows of a chunk's bf16 logits and reads them twice: once for the row sums of exp(z), and
once for the logits' gradient g. It writes g in FP8, and with TRANS also g transposed (the layout the grad_w
matmul needs), so that no separate transpose kernel is needed. WIDE selects 64-bit offsets. It is timed
against what train_gpt.py runs: inductor's kernel for the same function, then a compiled transpose.
`reference` is the torch function that train_gpt.py had at the time, taking the logits instead of x and w.
Output: round2_logit_grad_kernel.txt (one H200). Every shape tried was slower than inductor: see ../README.md.

Usage: python records/2026-11-28_speed/kernels/round2_logit_grad_kernel.py
"""
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
from matmul_peak import median_ms  # noqa: E402

FP8_GRAD_SCALE_PER_TOKEN = 2.0**13


def reference(logits, targets, inv_tokens: float, grad_s: float, fp8: bool):
    s = torch.sigmoid(logits.float() / 7.5)
    z = 30 * s
    lse = z.exp().sum(dim=1).log()
    loss = (lse - z.gather(1, targets[:, None]).squeeze(1)).sum()
    p = (z - lse[:, None]).exp()
    dz = torch.where(torch.arange(z.size(1), device=z.device) == targets[:, None], p - 1, p)
    g = (dz * inv_tokens * 30 * s * (1 - s) / 7.5).bfloat16()
    if not fp8:
        return loss, g, None
    g = g.mul(grad_s).to(torch.float8_e5m2)
    return loss, g, g.T.contiguous()


@triton.jit
def kern(logits, targets, losses, g, g_t, n, vocab, inv_tokens, grad_s,
         ROWS: tl.constexpr, COLS: tl.constexpr, TRANS: tl.constexpr, WIDE: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n
    if WIDE:
        row_off = rows.to(tl.int64) * vocab
    else:
        row_off = rows * vocab
    total = tl.zeros((ROWS,), dtype=tl.float32)
    for start in range(0, vocab, COLS):
        cols = start + tl.arange(0, COLS)
        ok = row_ok[:, None] & (cols < vocab)[None, :]
        s = tl.sigmoid(tl.load(logits + row_off[:, None] + cols[None, :], mask=ok, other=0).to(tl.float32) / 7.5)
        total += tl.sum(tl.where(ok, tl.exp(30 * s), 0), axis=1)
    lse = tl.log(tl.where(row_ok, total, 1))
    target = tl.load(targets + rows, mask=row_ok, other=0)
    z_target = 30 * tl.sigmoid(tl.load(logits + row_off + target, mask=row_ok, other=0).to(tl.float32) / 7.5)
    tl.store(losses + rows, lse - z_target, mask=row_ok)
    for start in range(0, vocab, COLS):
        cols = start + tl.arange(0, COLS)
        ok = row_ok[:, None] & (cols < vocab)[None, :]
        s = tl.sigmoid(tl.load(logits + row_off[:, None] + cols[None, :], mask=ok, other=0).to(tl.float32) / 7.5)
        p = tl.exp(30 * s - lse[:, None])
        dz = tl.where(cols[None, :] == target[:, None], p - 1, p)
        grad = (dz * inv_tokens * 30 * s * (1 - s) / 7.5).to(tl.bfloat16)
        grad = (grad.to(tl.float32) * grad_s).to(tl.bfloat16).to(tl.float8e5)
        tl.store(g + row_off[:, None] + cols[None, :], grad, mask=ok)
        if TRANS:
            if WIDE:
                tl.store(g_t + cols.to(tl.int64)[:, None] * n + rows[None, :], tl.trans(grad), mask=tl.trans(ok))
            else:
                tl.store(g_t + cols[:, None] * n + rows[None, :], tl.trans(grad), mask=tl.trans(ok))


transpose = torch.compile(lambda g: g.T.contiguous(), dynamic=False)


def run(logits, targets, grad_s, rows, cols, warps, trans, wide):
    n, V = logits.shape
    losses = torch.empty(n, device="cuda")
    g = torch.empty_like(logits, dtype=torch.float8_e5m2)
    g_t = torch.empty((V, n), dtype=torch.float8_e5m2, device="cuda")
    kern[(triton.cdiv(n, rows),)](logits, targets, losses, g, g_t, n, V, 1 / n, grad_s, ROWS=rows, COLS=cols,
                                  TRANS=trans, WIDE=wide, num_warps=warps)
    if not trans:
        g_t = transpose(g)
    return losses.sum(), g, g_t


def main():
    n, V = 8192, 50304
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = (4 * torch.randn(n, V, device="cuda", generator=gen)).bfloat16()
    targets = torch.randint(0, V, (n,), device="cuda", generator=gen)
    grad_s = FP8_GRAD_SCALE_PER_TOKEN * n
    ref = torch.compile(reference, dynamic=False)
    ref2 = torch.compile(lambda l, t: reference(l, t, 1 / n, grad_s, True)[:2], dynamic=False)
    ms = median_ms(lambda: transpose(ref2(logits, targets)[1]))
    print(f"inductor, as before (reduction, then transpose): {ms:.3f} ms")
    ms = median_ms(lambda: ref(logits, targets, 1 / n, grad_s, True))
    print(f"inductor, one function (g_t fused): {ms:.3f} ms")
    r = ref(logits, targets, 1 / n, grad_s, True)
    print(f"transpose alone: {median_ms(lambda: transpose(r[1])):.3f} ms")
    for rows, cols, warps in [(32, 512, 8), (32, 256, 4), (16, 512, 4), (64, 256, 8), (16, 1024, 8)]:
        for trans in (True, False):
            for wide in (True, False):
                out = run(logits, targets, grad_s, rows, cols, warps, trans, wide)
                same = (torch.equal(out[1].view(torch.uint8), r[1].view(torch.uint8))
                        and torch.equal(out[2].view(torch.uint8), r[2].view(torch.uint8)))
                ms = median_ms(lambda: run(logits, targets, grad_s, rows, cols, warps, trans, wide))
                print(f"triton rows {rows} cols {cols} warps {warps} trans {trans} wide {wide}: {ms:.3f} ms  "
                      f"loss diff {(out[0] - r[0]).item():.3g}  g,g_t bitwise equal to inductor's: {same}",
                      flush=True)


if __name__ == "__main__":
    main()
