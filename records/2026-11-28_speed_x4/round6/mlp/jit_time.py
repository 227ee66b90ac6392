"""How long the fused MLP's two Triton kernels take on their first call, compilation included, and on the second.
Run with an empty TRITON_CACHE_DIR: TRITON_CACHE_DIR=/tmp/jit_cache python3 jit_time.py"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))  # the repository root
import train_gpt  # noqa: E402

x = torch.randn(65536, 768, device="cuda").bfloat16()
w_fc, w_proj = torch.randn(3072, 768, device="cuda").bfloat16(), torch.randn(768, 3072, device="cuda").bfloat16()
for name, fn in [("forward", lambda: train_gpt.matmul_relu2(x, w_fc)),
                 ("backward", lambda: train_gpt.matmul_relu2_grad(x, w_proj, a))]:
    for i in range(2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        print(f"{name} call {i + 1}: {time.perf_counter() - t0:.3f} s", flush=True)
        if name == "forward":
            a = out[0]
