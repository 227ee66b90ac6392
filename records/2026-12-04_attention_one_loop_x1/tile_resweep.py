"""train_gpt.py's one-loop attention kernels (this commit's) with other tiles, set through ATTENTION_TILES: ms a call
at windows 1, 4, 7, 14 for one 64K-token sequence (lognormal documents), each the median of 5 x 10 calls queued,
two rounds. The forward alone; for grad_kv and grad_q the whole backward (both kernels), one kernel's tile changed.

Usage: python records/2026-12-04_attention_one_loop_x1/tile_resweep.py"""
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
import train_gpt as tg  # noqa: E402
from attention_sweep import documents  # noqa: E402
from matmul_peak import median_ms  # noqa: E402

T, H, D = 64 * 1024, 6, 128
docs = documents(T)
gen = torch.Generator(device="cuda").manual_seed(0)
q, k, v, go = (torch.randn(1, T, H, D, device="cuda", generator=gen).bfloat16() for _ in range(4))
args = {}
for w in (1, 4, 7, 14):
    m = tg.document_windows(docs, torch.tensor(w, dtype=torch.int32, device="cuda"))[0]
    out, lse = tg._window_attention_triton(q, k, v, m.starts, m.window_blocks)
    args[w] = (m, out, lse)
calls = {
    "forward": lambda m, out, lse: tg._window_attention_triton(q, k, v, m.starts, m.window_blocks),
    "backward": lambda m, out, lse: tg._window_attention_grad_triton(go, q, k, v, out, lse, m.starts, m.ends,
                                                                      m.window_blocks),
}
tiles = {"forward": [(64, 64, 4, 3), (64, 64, 4, 2), (64, 64, 4, 4), (64, 32, 4, 3), (128, 64, 8, 3),
                     (128, 128, 8, 2)],
         "grad_kv": [(64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 8, 2), (32, 64, 4, 3)],
         "grad_q": [(64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 2)]}
for kernel, options in tiles.items():
    committed = tg.ATTENTION_TILES[kernel]
    for rnd in range(2):
        for tile in options:
            tg.ATTENTION_TILES[kernel] = tile
            fn = calls["forward" if kernel == "forward" else "backward"]
            try:
                ms = [median_ms(lambda: fn(*args[w]), reps=5, calls=10) for w in args]
                print(f"round {rnd} {kernel} {'x'.join(map(str, tile))}: " + " ".join(f"{x:.3f}" for x in ms)
                      + f" (windows {list(args)}; {'forward' if kernel == 'forward' else 'whole backward'})",
                      flush=True)
            except Exception as e:
                print(f"{kernel} {tile}: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
    tg.ATTENTION_TILES[kernel] = committed
