"""The head's eager pieces around its kernels, on one H200: the FP8 quantization of w (eager: scale, cast, transposed
copy; compiled: _e4m3_both), and the weight gradient's FP8 matmul over 8192 and 16384 tokens with its transposed
add into grad_w, to judge summing the gradients for w over pairs of chunks.

It ran from the repository root, beside the train_gpt.py of this record's commit; it imports that file's
_e4m3_both_compiled and FP8 scales. Usage: python3 records/2026-12-04_head_spans_x1/head_grad_w_bench.py"""
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))
from matmul_peak import median_ms  # noqa: E402
import train_gpt as tg  # noqa: E402

D, V = 768, 50304
gen = torch.Generator(device="cuda").manual_seed(0)
w = 0.02 * torch.randn(V, D, device="cuda", generator=gen)


def eager(t, scale):
    t_q = t.mul(scale).to(torch.float8_e4m3fn)
    return t_q, t_q.T.contiguous()


for name, t, scale in [("w (50304, 768) fp32", w, tg.FP8_W_SCALE),
                       ("x chunk (8192, 768) bf16", torch.randn(8192, D, device="cuda", generator=gen).bfloat16(),
                        tg.FP8_X_SCALE)]:
    a, b = eager(t, scale), tg._e4m3_both_compiled(t, scale)
    same = all(torch.equal(p.view(torch.uint8), q.view(torch.uint8)) for p, q in zip(a, b))
    print(f"quantize {name}: eager {median_ms(lambda: eager(t, scale), calls=10):.4f} ms, "
          f"compiled {median_ms(lambda: tg._e4m3_both_compiled(t, scale), calls=10):.4f} ms, same bits {same}")

one = torch.ones((), device="cuda")
grad_w = torch.zeros(V, D, device="cuda")
add = torch.compile(lambda acc, part: acc + part.T, dynamic=False)
for n in (8192, 16384):
    x_t = (2 * torch.randn(D, n, device="cuda", generator=gen)).to(torch.float8_e4m3fn)
    g_t = torch.randn(V, n, device="cuda", generator=gen).to(torch.float8_e5m2)
    mm = lambda: torch._scaled_mm(x_t, g_t.T, out_dtype=torch.float32, scale_a=one, scale_b=one)
    part = mm()
    print(f"grad_w matmul over {n} tokens: {median_ms(mm, calls=10):.4f} ms; "
          f"transposed add {median_ms(lambda: add(grad_w, part), calls=10):.4f} ms")
