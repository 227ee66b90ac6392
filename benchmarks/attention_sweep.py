"""FlexAttention forward + backward time of one layer under several kernel options, on this machine's GPU.

One 64K-token sequence (6 heads of 128, bf16) with documents of lognormal length (mean ~1000 tokens, as
data/synthetic.py makes them), masked by train_gpt.block_masks at a long window of 7 blocks (mid-run) and
14 blocks (the end). Prints one line per option set and window: median ms of forward + backward, long and short
mask together, and the largest difference of the output and the gradients from inductor's defaults (the
first option set run). Each option set compiles on its own (tens of seconds).

Usage: python benchmarks/attention_sweep.py [first:last]   # a slice of OPTIONS, to spread the sweep over GPUs
"""
import sys
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention.flex_attention import flex_attention

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from train_gpt import block_masks, document_ids  # noqa: E402

from matmul_peak import median_ms  # noqa: E402

EOT = 50256
OPTIONS = [
    {},  # inductor's defaults
    {"ROWS_GUARANTEED_SAFE": True},  # 1-3% faster here, but training with it gave a nan loss at step 1
    {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_stages": 2, "fwd_num_warps": 8},
    {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 128, "fwd_num_stages": 3, "fwd_num_warps": 4},
    {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_stages": 3, "fwd_num_warps": 4},
    {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64, "bwd_num_stages": 3,
     "bwd_num_warps": 4},
    {"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 32, "bwd_num_stages": 3,
     "bwd_num_warps": 4},
    {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 64, "bwd_num_stages": 2,
     "bwd_num_warps": 8},
    {"USE_TMA": True},  # Triton's tensor-memory-accelerator loads: 13-17% slower (round 5)
    {"BACKEND": "FLASH"},  # FlashAttention-4's CuTe DSL kernels (flash-attn-4): 7-16% slower (round 5)
]


def documents(tokens: int, seed: int = 0) -> torch.Tensor:
    """Document ids, as the model derives them from end-of-text tokens, for documents of lognormal length."""
    rng = np.random.default_rng(seed)
    lengths = np.maximum(1, rng.lognormal(np.log(1000) - 0.5, 1.0, size=tokens)).astype(np.int64)
    starts = np.cumsum(lengths)
    ids = torch.zeros(tokens, dtype=torch.int64)
    ids[torch.from_numpy(starts[starts < tokens])] = EOT
    return document_ids(ids, EOT).cuda()


def main():
    chosen = slice(*(int(i) for i in sys.argv[1].split(":"))) if len(sys.argv) > 1 else slice(None)
    T, H, D = 64 * 1024, 6, 128
    docs = documents(T)
    # (B, T, H, D) seen as (B, H, T, D), the layout the model hands to flex_attention
    q, k, v = (torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "qkv")
    grad = torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16)
    runs = OPTIONS[chosen] if OPTIONS[chosen][:1] == [{}] else [{}] + OPTIONS[chosen]  # the defaults first
    reference = {}  # window -> the defaults' outputs and gradients
    for options in runs:
        attend = torch.compile(lambda q, k, v, m, o=options: flex_attention(q, k, v, block_mask=m, scale=0.12,
                                                                            kernel_options=o), dynamic=False)
        for window in (7, 14):
            masks = block_masks(docs, torch.tensor(window, device="cuda"))

            def step():
                for mask in masks:
                    attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask).backward(grad)

            def results() -> list[torch.Tensor]:
                q.grad = k.grad = v.grad = None
                outs = [attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask) for mask in masks]
                sum(outs).backward(grad)
                return [t.detach().clone() for t in (*outs, q.grad, k.grad, v.grad)]  # step() adds to the grads

            got = results()
            reference.setdefault(window, got)
            diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, reference[window]))
            print(f"{median_ms(step, reps=20):8.3f} ms  window {window:2d}  max diff {diff:.2e}  {options}",
                  flush=True)


if __name__ == "__main__":
    main()
