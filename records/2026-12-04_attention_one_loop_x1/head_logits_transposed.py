"""The head's FP8 logits matmul, one 8192-token chunk of random data: (n, D) @ (D, V) as train_gpt.py calls
_scaled_mm, against the transposed product (V, D) @ (D, n) (the same bits, transposed), and the backward's two
matmuls for scale. Each the median of 15 rounds in turns, a round the median of 5 x 10 calls queued.

Usage: python records/2026-12-04_attention_one_loop_x1/head_logits_transposed.py"""
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
import train_gpt as tg  # noqa: E402
from matmul_peak import median_ms  # noqa: E402

n, D, V = tg.HEAD_CHUNK, 768, 50304
gen = torch.Generator(device="cuda").manual_seed(0)
x_q = tg._e4m3(torch.randn(n, D, device="cuda", generator=gen), tg.FP8_X_SCALE)
w_q = tg._e4m3(torch.randn(V, D, device="cuda", generator=gen) * 0.02, tg.FP8_W_SCALE)
one = torch.ones((), device="cuda")
g = (torch.randn(n, V, device="cuda", generator=gen) * 4).to(torch.float8_e5m2)
g_t, w_q_t, x_q_t = g.T.contiguous(), w_q.T.contiguous(), x_q.T.contiguous()
cases = {
    "logits (n, V) = x_q @ w_q.T (train_gpt.py)": lambda: tg._logits(x_q, w_q),
    "logits (V, n) = w_q @ x_q.T": lambda: torch._scaled_mm(w_q, x_q.T, out_dtype=torch.bfloat16, scale_a=one / 32,
                                                            scale_b=one / 2, use_fast_accum=True),
    "logits (n, V), no fast accumulation": lambda: torch._scaled_mm(x_q, w_q.T, out_dtype=torch.bfloat16,
                                                                    scale_a=one / 2, scale_b=one / 32),
    "grad_x (n, D) = g @ w_q": lambda: torch._scaled_mm(g, w_q_t.T, out_dtype=torch.bfloat16, scale_a=one,
                                                        scale_b=one),
    "grad_w.T (D, V) = x_q.T @ g": lambda: torch._scaled_mm(x_q_t, g_t.T, out_dtype=torch.float32, scale_a=one,
                                                            scale_b=one),
}
a, b = cases["logits (n, V) = x_q @ w_q.T (train_gpt.py)"](), cases["logits (V, n) = w_q @ x_q.T"]()
print(torch.cuda.get_device_name(), torch.__version__, "transposed logits equal:", torch.equal(a, b.T), flush=True)
times = {name: [] for name in cases}
for _ in range(15):
    for name, fn in cases.items():
        times[name].append(median_ms(fn, reps=5, calls=10))
for name, t in times.items():
    print(f"{sorted(t)[len(t) // 2]:.4f} ms  {name}")
