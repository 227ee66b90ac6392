"""Time of the training lm_head loss (speedrun::head_loss: matmuls, soft cap, cross entropy and both gradients)
for one 64K-token sequence on this machine's first GPU, for the train_gpt.py given (this one by default). Run it
on an old and a new version, one after the other: the inputs are the same, and so should the loss and norms be;
the digests of the loss's and each gradient's bytes say whether they are the same bits.

With --chunks=a,b,..., once for each HEAD_CHUNK listed; with --grad_w_chunks=a,b,..., once for each
GRAD_W_CHUNKS listed (versions that have it); with --sums_in_matmul=0,1, without and with the logits' row sums in
the FP8 matmul (versions that have it; Hopper); with --logits_tiles=a,b,... (rows x columns x depth x stages),
the row sums in the matmul at each of those HEAD_MATMUL settings; the memory column is the peak the head adds.

Usage: python benchmarks/head_loss_bench.py [path/to/train_gpt.py] [--chunks=4096,8192] [--grad_w_chunks=1,2]
                                            [--sums_in_matmul=0,1] [--logits_tiles=128x128x128x4,64x128x128x5]
"""
import hashlib
import importlib.util
import sys
from pathlib import Path

import torch

from matmul_peak import median_ms


def load(path: Path):
    spec = importlib.util.spec_from_file_location(f"train_gpt_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # torch.compile looks the module of a function it compiles up by name
    spec.loader.exec_module(module)
    return module


def main():
    chunks = [int(c) for a in sys.argv[1:] if a.startswith("--chunks=") for c in a.split("=")[1].split(",")]
    spans = [int(c) for a in sys.argv[1:] if a.startswith("--grad_w_chunks=") for c in a.split("=")[1].split(",")]
    sums = [bool(int(c)) for a in sys.argv[1:] if a.startswith("--sums_in_matmul=") for c in a.split("=")[1].split(",")]
    tiles = [[int(n) for n in c.split("x")] for a in sys.argv[1:] if a.startswith("--logits_tiles=")
             for c in a.split("=")[1].split(",")]
    paths = [a for a in sys.argv[1:] if not a.startswith("--")]
    path = Path(paths[0] if paths else Path(__file__).resolve().parent.parent / "train_gpt.py").resolve()
    tg = load(path)
    gen = torch.Generator(device="cuda").manual_seed(0)
    T, D, V = 64 * 1024, 768, 50304
    x = torch.randn(T, D, device="cuda", generator=gen).bfloat16()
    w = 0.02 * torch.randn(V, D, device="cuda", generator=gen)
    targets = torch.randint(0, V, (T,), device="cuda", generator=gen)
    op = getattr(tg, "fused_head_loss", tg.head_loss)  # an older train_gpt.py names the op head_loss
    runs = [(c, n, s, None) for c in chunks or [tg.HEAD_CHUNK] for n in spans or [None] for s in sums or [None]]
    runs += [(tg.HEAD_CHUNK, None, True, tg.Tile(tuple(t[:3]), 4, t[3])) for t in tiles]
    for chunk, span, summed, tile in runs:
        tg.HEAD_CHUNK = chunk
        if tile is not None:
            tg.HEAD_MATMUL = tile
        if span is not None:
            tg.GRAD_W_CHUNKS = span
        args = (x, w, targets, True) + (() if summed is None else (summed,))
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss, grad_x, grad_w = op(*args)
        added_mib = (torch.cuda.max_memory_allocated() - before) // 2**20
        ms = median_ms(lambda: op(*args), reps=20)
        digests = [hashlib.sha256(t.view(torch.uint8).cpu().numpy().tobytes()).hexdigest()[:8]
                   for t in (loss[None], grad_x, grad_w)]
        print(f"{ms:8.3f} ms  loss {loss.item():.6f}  |grad_x| {grad_x.float().norm().item():.6e}  "
              f"|grad_w| {grad_w.norm().item():.6e}  bits of loss/grad_x/grad_w {'/'.join(digests)}  {path.name}  "
              f"chunk {chunk}{'' if span is None else f' x {span}'}{'' if summed is None else f' sums {summed:d}'}"
              f"{'' if tile is None else ' logits tile ' + 'x'.join(map(str, (*tile.block, tile.stages)))}  "
              f"+{added_mib} MiB", flush=True)


if __name__ == "__main__":
    main()
