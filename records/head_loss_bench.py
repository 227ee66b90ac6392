"""Time of the training lm_head loss (speedrun::head_loss: matmuls, soft cap, cross entropy and both gradients)
for one 64K-token sequence on this machine's first GPU, for the train_gpt.py given (this one by default). Run it
on an old and a new version, one after the other: the inputs are the same, and so should the loss and norms be.

Usage: python records/head_loss_bench.py [path/to/train_gpt.py]
"""
import importlib.util
import sys
from pathlib import Path

import torch

from matmul_peak import median_ms


def load(path: Path):
    spec = importlib.util.spec_from_file_location(f"train_gpt_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    default = Path(__file__).resolve().parent.parent / "train_gpt.py"
    path = Path(sys.argv[1] if len(sys.argv) > 1 else default).resolve()
    tg = load(path)
    gen = torch.Generator(device="cuda").manual_seed(0)
    T, D, V = 64 * 1024, 768, 50304
    x = torch.randn(T, D, device="cuda", generator=gen).bfloat16()
    w = 0.02 * torch.randn(V, D, device="cuda", generator=gen)
    targets = torch.randint(0, V, (T,), device="cuda", generator=gen)
    loss, grad_x, grad_w = tg.head_loss(x, w, targets, True)
    ms = median_ms(lambda: tg.head_loss(x, w, targets, True), reps=20)
    print(f"{ms:8.3f} ms  loss {loss.item():.6f}  |grad_x| {grad_x.float().norm().item():.6e}  "
          f"|grad_w| {grad_w.norm().item():.6e}  {path.name}")


if __name__ == "__main__":
    main()
