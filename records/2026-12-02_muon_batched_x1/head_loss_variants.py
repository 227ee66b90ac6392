"""Scratch: where the head loss's two kernels lose time. Variants of _logit_grad_kernel and _lse_kernel on one
8192-token chunk, each checked against train_gpt's kernels' bytes."""
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import train_gpt as tg  # noqa: E402
from matmul_peak import median_ms  # noqa: E402

sig = tg._sigmoid_kernel


@triton.jit
def grad_variant(logits, targets, lse, g, g_t, n, V, inv_tokens, grad_s, STORE_G: tl.constexpr,
                 STORE_GT: tl.constexpr, CAP: tl.constexpr, TEMPERATURE: tl.constexpr, ROWS: tl.constexpr,
                 COLS: tl.constexpr, TILES: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_lse = tl.load(lse + rows, mask=rows < n)[:, None]
    tgt = tl.load(targets + rows, mask=rows < n)[:, None]
    for t in range(TILES):
        cols = (tl.program_id(1) * TILES + t) * COLS + tl.arange(0, COLS)
        ok = (rows < n)[:, None] & (cols < V)[None, :]
        offsets = rows.to(tl.int64)[:, None] * V + cols[None, :]
        s = sig(tl.load(logits + offsets, mask=ok).to(tl.float32), TEMPERATURE)
        p = tl.exp(CAP * s - row_lse)
        dz = tl.where(cols[None, :] == tgt, p - 1, p)
        grad = (dz * inv_tokens * (CAP / TEMPERATURE) * s * (1 - s)).to(tl.bfloat16)
        grad = (grad.to(tl.float32) * grad_s).to(tl.float8e5)
        if STORE_GT:
            t_offsets = cols.to(tl.int64)[:, None] * n + rows[None, :]
            tl.store(g_t + t_offsets, tl.trans(grad), mask=tl.trans(ok))
        if STORE_G:
            tl.store(g + offsets, grad, mask=ok)


@triton.jit
def lse_variant(logits, targets, lse, losses, n, V, CAP: tl.constexpr, TEMPERATURE: tl.constexpr,
                ROWS: tl.constexpr, COLS: tl.constexpr, STAGES: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n
    row_start = rows.to(tl.int64) * V
    total = tl.zeros((ROWS,), dtype=tl.float32)
    for start in tl.range(0, V, COLS, num_stages=STAGES):
        cols = start + tl.arange(0, COLS)
        ok = row_ok[:, None] & (cols < V)[None, :]
        s = sig(tl.load(logits + row_start[:, None] + cols[None, :], mask=ok).to(tl.float32), TEMPERATURE)
        total += tl.sum(tl.where(ok, tl.exp(CAP * s), 0.0), axis=1)
    row_lse = tl.log(total)
    z_target = CAP * sig(tl.load(logits + row_start + tl.load(targets + rows, mask=row_ok), mask=row_ok)
                         .to(tl.float32), TEMPERATURE)
    tl.store(lse + rows, row_lse, mask=row_ok)
    tl.store(losses + rows, row_lse - z_target, mask=row_ok)


@triton.jit
def read_only(logits, out, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(logits + offs, mask=offs < N).to(tl.float32)
    tl.store(out + tl.program_id(0), tl.sum(x, axis=0))


@triton.jit
def mufu_only(logits, out, N, BLOCK: tl.constexpr, CAP: tl.constexpr, TEMPERATURE: tl.constexpr):
    # the lse kernel's transcendental work on a fraction of the data, reused: how fast the MUFU part alone runs
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(logits + offs % 4096).to(tl.float32)
    x = x + offs.to(tl.float32) * 1e-6
    tl.store(out + tl.program_id(0), tl.sum(tl.exp(CAP * sig(x, TEMPERATURE)), axis=0))


def main():
    n, V, T = tg.HEAD_CHUNK, 50304, 65536
    inv_tokens, grad_s = 1 / T, tg.FP8_GRAD_SCALE_PER_TOKEN * T
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = (3 * torch.randn(n, V, device="cuda", generator=gen)).bfloat16()
    targets = torch.randint(0, V, (n,), device="cuda", generator=gen)
    ref_loss, ref_g, ref_gt = tg._loss_and_logit_grad_triton(logits, targets, inv_tokens, grad_s)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, f"chunk {n} x {V}")
    print(f"{median_ms(lambda: tg._loss_and_logit_grad_triton(logits, targets, inv_tokens, grad_s)):.3f} ms  "
          "train_gpt both kernels", flush=True)
    lse, losses = torch.empty(n, device="cuda"), torch.empty(n, device="cuda")
    C, TEMP = tg.SOFTCAP, tg.SOFTCAP_TEMPERATURE
    for rows, cols, warps, stages in [(1, 2048, 4, 1), (1, 2048, 4, 2), (1, 2048, 4, 3), (2, 1024, 4, 2),
                                      (4, 1024, 8, 2), (1, 4096, 8, 2), (2, 2048, 8, 3), (1, 1024, 4, 4)]:
        fn = lambda: lse_variant[(triton.cdiv(n, rows),)](logits, targets, lse, losses, n, V, C, TEMP, rows, cols,
                                                            stages, num_warps=warps)
        fn()
        same = torch.equal(losses.sum(), ref_loss)
        print(f"{median_ms(fn):.3f} ms  lse {rows}x{cols} w{warps} s{stages} same loss {same}", flush=True)
    tg._lse_kernel[(n,)](logits, targets, lse, losses, n, V, C, TEMP, 1, 2048, num_warps=4)
    g, g_t = torch.empty_like(ref_g), torch.empty_like(ref_gt)
    for store_g, store_gt in [(True, True), (True, False), (False, True)]:
        for rows, cols, tiles, warps in [(32, 64, 1, 4), (32, 64, 4, 4), (32, 64, 16, 4), (64, 64, 4, 8),
                                         (128, 64, 2, 8), (64, 128, 2, 8), (32, 128, 4, 4), (128, 128, 1, 8)]:
            grid = (triton.cdiv(n, rows), triton.cdiv(V, cols * tiles))
            fn = lambda: grad_variant[grid](logits, targets, lse, g, g_t, n, V, inv_tokens, grad_s, store_g, store_gt,
                                            C, TEMP, rows, cols, tiles, num_warps=warps)
            g.zero_(), g_t.zero_()
            fn()
            ok = ((not store_g or torch.equal(g.view(torch.uint8), ref_g.view(torch.uint8)))
                  and (not store_gt or torch.equal(g_t.view(torch.uint8), ref_gt.view(torch.uint8))))
            print(f"{median_ms(fn):.3f} ms  grad g={store_g} g_t={store_gt} {rows}x{cols}x{tiles} w{warps} "
                  f"same bytes {ok}", flush=True)
    out = torch.empty(n * V // 4096, device="cuda")
    ms = median_ms(lambda: read_only[(n * V // 4096,)](logits, out, n * V, 4096, num_warps=4))
    print(f"{ms:.3f} ms  read the logits once ({2 * n * V / ms / 1e9:.0f} GB/s)")
    ms = median_ms(lambda: mufu_only[(n * V // 4096,)](logits, out, n * V, 4096, C, TEMP, num_warps=4))
    print(f"{ms:.3f} ms  the lse's sigmoid and exp alone, same element count, from cache")


if __name__ == "__main__":
    main()
