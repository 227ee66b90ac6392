"""Where does --coordinate_descent_tuning=1 give a nan? Four training steps on random tokens, checking the
gradients and weights after each piece. argv: 0|1 (coordinate descent tuning), then train_gpt.py switches.
With an empty inductor and Triton cache: python3 records/2026-12-04_coordinate_descent_x1/cdt_check.py 1"""
import json, os, sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import train_gpt as T  # noqa: E402

cdt = sys.argv[1] == "1"
args = T.parse_args(sys.argv[2:])
rank, world, device = T.setup_distributed()
switches = {k: getattr(T.KERNELS, k) for k in ("fp8_head", "fused_mlp", "fused_qkv", "fused_attention")}
print("kernels:", T.choose_kernels(args, device), switches, flush=True)
torch._inductor.config.coordinate_descent_tuning = cdt
raw = T.build_model(args, device)
adam, muon = T.build_optimizers(raw, args, 0, 1)
model = torch.compile(raw, dynamic=False)
g = torch.Generator().manual_seed(0)
tokens = args.batch_seqs * args.seq_len
stats = []


def bad(kind):
    out = []
    for n, p in raw.named_parameters():
        t = p.grad if kind == "grad" else p.detach()
        if t is not None and not torch.isfinite(t).all():
            out.append(n)
    return out


for step in range(4):
    dummy = torch.randint(0, args.vocab_size, (tokens + 1,), generator=g, dtype=torch.int32)
    inputs, targets = T.batch_to_device(dummy, device)
    window = T.window_tensor(step, args, device)
    T.set_schedule(adam, muon, step, args)
    accum = len(inputs) // args.seq_len
    losses = []
    for x, y in zip(inputs.split(args.seq_len), targets.split(args.seq_len)):
        loss = model(x, y, window) / accum
        loss.backward()
        losses.append(round(loss.item() * accum, 5))
    print(f"cdt={cdt} step {step} losses {losses}", flush=True)
    print("  nonfinite grads:", bad("grad"), flush=True)
    stats.append({n: (p.grad.float().norm().item() if p.grad is not None else None) for n, p in raw.named_parameters()})
    muon.step()
    print("  nonfinite after muon:", bad("param"), flush=True)
    adam.step()
    print("  nonfinite after adam:", bad("param"), flush=True)
    model.zero_grad(set_to_none=True)
out = os.environ.get("OUT", ".")
with open(f"{out}/grad_norms_cdt{int(cdt)}_{'_'.join(a.strip('-') for a in sys.argv[2:]) or 'main'}.json", "w") as f:
    json.dump(stats, f)
