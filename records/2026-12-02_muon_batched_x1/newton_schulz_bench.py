"""Scratch: Newton-Schulz per parameter (as Muon does now) against one batched call per shape, for the
parameters rank 0 owns at world sizes 1, 2, 4, 8."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import train_gpt as tg  # noqa: E402
from matmul_peak import median_ms  # noqa: E402


def ns_flops(shape):
    *batch, m, n = shape
    m, n = min(m, n), max(m, n)
    b = 1
    for d in batch:
        b *= d
    return b * 5 * (4 * m * m * n + 2 * m ** 3)


def main():
    torch.manual_seed(0)
    model = tg.GPT(50304, 12, 6, 768, 65536).cuda()
    matrices = [p for p in model.blocks.parameters() if p.ndim >= 2]
    muon = tg.Muon(matrices, lr=0.05, momentum=0.95)
    ns = torch.compile(tg.newton_schulz5, dynamic=False)
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    for ws in (1, 2, 4, 8):
        owned = []
        for group in muon.param_groups:
            owned += [p for i, p in enumerate(group["params"]) if i % ws == 0]
        grads = [torch.randn_like(p) for p in owned]
        flops = sum(ns_flops(g.shape) for g in grads)

        def serial():
            return [ns(g) for g in grads]

        def oriented(g):
            g = g if g.size(-2) <= g.size(-1) else g.mT
            return g.reshape(-1, *g.shape[-2:])

        shapes = {}
        for i, g in enumerate(grads):
            shapes.setdefault(tuple(oriented(g).shape[-2:]), []).append(i)
        stacks = {s: torch.cat([oriented(grads[i]) for i in idx]) for s, idx in shapes.items()}

        def batched():
            return {s: ns(x) for s, x in stacks.items()}

        ref = serial()
        out = batched()
        diff = 0.0
        for s, idx in shapes.items():
            parts = out[s].split([oriented(grads[i]).size(0) for i in idx])
            for i, part in zip(idx, parts):
                r = ref[i] if grads[i].size(-2) <= grads[i].size(-1) else ref[i].mT
                diff = max(diff, (part.float() - r.reshape(part.shape).float()).abs().max().item())
        t_s, t_b = median_ms(serial), median_ms(batched)
        t_s_q, t_b_q = median_ms(serial, calls=10), median_ms(batched, calls=10)
        print(f"world {ws}: {len(grads)} params {flops / 1e9:.0f} GFLOP; serial {t_s:.3f} ms ({flops / t_s / 1e9:.0f}"
              f" TFLOP/s), queued {t_s_q:.3f}; batched {t_b:.3f} ms ({flops / t_b / 1e9:.0f} TFLOP/s), queued "
              f"{t_b_q:.3f}; shapes {[(s, stacks[s].size(0)) for s in stacks]}; max diff {diff:.3g}", flush=True)


if __name__ == "__main__":
    main()
