"""Where the GPU waits: runs train_gpt.py as given, and when --profile_at's profiler stops, writes beside the
.profile.tsv a .gaps.txt: every stretch of at least 20 us in which no GPU kernel, copy or fill runs, grouped by
the kernels before and after it and by the innermost CPU op running at its middle, largest total first.

Usage, from the repository's root (it ran there as a copy, through benchmarks/cold_run.sh):
    torchrun --standalone --nproc_per_node=1 records/2026-12-04_baseline_direct_x1/gap_run.py --num_iterations=40 \
        --profile_at=30 [--train_files=... --val_files=...]
"""
import bisect
import collections
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import train_gpt  # noqa: E402

MIN_GAP_US = 20
_write_profile = train_gpt.write_profile


def write_gaps(profiler: torch.profiler.profile, path: Path, steps: int):
    events = profiler.events()
    gpu = sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                 if e.device_type == torch.autograd.DeviceType.CUDA)
    if not gpu:
        return
    cpu = [(e.time_range.start, e.time_range.end, e.name) for e in events
           if e.device_type == torch.autograd.DeviceType.CPU]
    cpu.sort()
    starts = [c[0] for c in cpu]
    by_pair, by_cpu, total = collections.Counter(), collections.Counter(), 0.0
    busy_end, prev_name = gpu[0][1], gpu[0][2]
    for start, end, name in gpu[1:]:
        if start - busy_end >= MIN_GAP_US:
            gap, mid = start - busy_end, (start + busy_end) / 2
            total += gap
            by_pair[(prev_name[:70], name[:70])] += gap
            first = bisect.bisect_right(starts, mid)
            covering = [c for c in cpu[max(0, first - 3000):first] if c[1] >= mid]
            inner = min(covering, key=lambda c: c[1] - c[0])[2] if covering else "(no CPU op)"
            by_cpu[inner[:90]] += gap
        if end > busy_end:
            busy_end, prev_name = end, name
    with path.open("w") as f:
        print(f"# {steps} steps; gaps >= {MIN_GAP_US} us: {total / steps / 1000:.2f} ms a step", file=f)
        print("# ms a step, innermost CPU op at the gap's middle", file=f)
        for name, us in by_cpu.most_common(25):
            print(f"{us / steps / 1000:7.3f}  {name}", file=f)
        print("# ms a step, kernel before -> kernel after", file=f)
        for (a, b), us in by_pair.most_common(40):
            print(f"{us / steps / 1000:7.3f}  {a} -> {b}", file=f)


def write_profile(profiler, path, steps):
    _write_profile(profiler, path, steps)
    write_gaps(profiler, path.with_suffix(".gaps.txt"), steps)


if __name__ == "__main__":
    train_gpt.write_profile = write_profile
    train_gpt.main(sys.argv[1:])
