"""Where a step's GPU time goes, from a run made with --profile_at: one table of kernel categories.

Usage:
    python tools/profile_summary.py records/<tag>/<run id>.txt

Reads the log (for the measured time of the profiled steps) and the <run id>.profile.tsv beside it that
train_gpt.py wrote. Every GPU kernel falls in one category by its name: cuBLAS matmuls by precision (the FP8
ones are the lm_head's), FlexAttention's kernels, NCCL's, inductor's fused elementwise kernels by the ops they
contain, and train_gpt.py's own Triton kernels (the lm_head loss's, the fused ReLU^2 MLP's, the attention inputs'
and the attention's) by name. The names are heuristics for this model, written for torch 2.11's kernels. NCCL runs
on its own stream and may overlap the rest; "not covered" is the step time that no compute kernel fills: launch
gaps and waits for communication. Prints a markdown table, then the GPU spans of the annotated phases.
Exits 2 with one line on stderr when the log does not exist or has no profile beside it.
"""
import re
import sys
from pathlib import Path

from summarize import STEP_RE

PHASES = ("forward_backward", "Optimizer.step#Muon.step", "Optimizer.step#Adam.step")
COMMUNICATION = "communication (NCCL, own stream)"


def category(name: str) -> str | None:
    """The category of a kernel; None for rows that are not kernels (phase spans, NCCL's own span rows)."""
    if name in PHASES or name.startswith(("nccl:", "ProfilerStep")):
        return None
    if name.startswith("ncclDevKernel"):
        return COMMUNICATION
    if "flex_attention" in name:
        return "attention (FlexAttention)"
    if name.startswith(("_window_attention", "_attention_delta_kernel")):  # train_gpt's attention kernels
        return "attention (Triton)"
    if name.startswith("nvjet"):  # nvjet_sm90_tst_... is bf16; qq/qr/rq type codes are FP8
        return "matmul, FP8 (lm_head)" if name.split("_")[2][0] in "qr" else "matmul, bf16"
    if "splitKreduce" in name or "gemm" in name:
        return "matmul, bf16"
    # train_gpt's fused MLP: forward, the up-projection; backward, the hidden's gradient; ReLU^2 fused in both
    if name.startswith("_matmul_relu2_kernel"):
        return "MLP matmuls with ReLU^2 (Gluon)"
    if name.startswith("_qkv_matmul_prep_kernel"):  # train_gpt's qkv projection with QK norm, rotary, value mix
        return "qkv matmul with its prep (Gluon)"
    if name.startswith("_matmul_residual_kernel"):  # train_gpt's attention output projection, residual add, squares
        return "output projection with the residual (Gluon)"
    if name.startswith("_logits_kernel"):  # train_gpt's FP8 logits matmul on Hopper, with the row sums of exp(z)
        return "matmul, FP8 (lm_head)"
    if name in ("_lse_kernel", "_lse_of_sums_kernel", "_logit_grad_kernel") or "float8_copy" in name:  # eager casts
        return "lm_head loss: soft cap, cross entropy, FP8 casts"
    if name.startswith("_qkv_prep"):  # train_gpt's QK norm, rotary and value mix, each way
        return "RMS norms, rotary, residuals"
    if name.startswith("triton_"):
        if any(op in name for op in ("sigmoid", "log_softmax", "scaled_mm", "add_permute")):
            return "lm_head loss: soft cap, cross entropy, FP8 casts"
        if "rms_norm" in name:  # before relu: a norm's backward fused after the fused MLP carries its op's name
            return "RMS norms, rotary, residuals"
        if "relu" in name:
            return "ReLU^2"
        return "other inductor kernels"
    if "multi_tensor_apply" in name or "adam" in name.lower():
        return "Adam"
    return "other (copies, fills, eager elementwise)"


def read_profile(tsv: Path) -> tuple[dict[str, float], dict[str, float]]:
    """-> ({category: device ms per step}, {phase: GPU span ms per step})."""
    categories, phases = {}, {}
    for line in tsv.read_text().splitlines():
        if line.startswith("#"):
            continue
        device_us, cpu_us, _, name = line.split("\t", 3)
        if name in PHASES:
            phases[name] = max(phases.get(name, 0.0), float(device_us) / 1000)
        elif float(cpu_us) == 0 and float(device_us) > 0 and (kind := category(name)):
            categories[kind] = categories.get(kind, 0.0) + float(device_us) / 1000
    return categories, phases


def profiled_step_ms(log: Path) -> float:
    """The mean train time of the profiled steps, from the log's step lines."""
    text = log.read_text()
    first, last = map(int, re.search(r"^profile of steps (\d+)\.\.(\d+):", text, re.M).groups())
    times = {int(m[1]): int(m[5]) for line in text.splitlines() if (m := STEP_RE.match(line))}
    return (times[last] - times[first - 1]) / (last - first + 1)


def summary(log: Path) -> str:
    categories, phases = read_profile(log.with_suffix(".profile.tsv"))
    step = profiled_step_ms(log)
    compute = sum(ms for kind, ms in categories.items() if kind != COMMUNICATION)
    rows = sorted(categories.items(), key=lambda kv: -kv[1])
    rows.append(("not covered by a compute kernel", max(step - compute, 0.0)))
    lines = [f"measured step (profiled): {step:.1f} ms", "", "| where | ms per step | share of the step |",
             "|---|---|---|"]
    lines += [f"| {kind} | {ms:.1f} | {ms / step:.0%} |" for kind, ms in rows]
    lines += ["", "GPU spans of the phases (first to last kernel): "
              + ", ".join(f"{name} {ms:.1f} ms" for name, ms in phases.items())]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if len(argv) != 1:
        sys.exit(__doc__)
    log = Path(argv[0])
    tsv = log.with_suffix(".profile.tsv")
    if not log.is_file():
        print(f"error: no log at {log}", file=sys.stderr)
        return 2
    if not tsv.is_file():
        print(f"error: no profile beside {log}: expected {tsv}, which train_gpt.py writes for a run made with "
              "--profile_at=N", file=sys.stderr)
        return 2
    print(summary(log))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
