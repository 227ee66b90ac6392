"""Summarise a folder of train_gpt.py logs: one table of statistics and one PNG of curves.

Usage:
    python tools/summarize.py records/<tag> [--target 3.28] [--png PATH] [--markdown]

Every `*.txt` file in the folder is one training run. A log opens with arbitrary text (the script's
source, versions, nvidia-smi, hyperparameters), then has lines such as
    step:125/1393 val_loss:4.3692 train_time:29512ms step_avg:236.10ms
    peak memory allocated: 38912 MiB reserved: 40120 MiB
A run is complete when it has a val_loss line for step T/T. Cut-off, malformed or unreadable logs, and
runs whose T differs from the most common T, are listed under "skipped" and never averaged.

Prints: n runs, mean/std of the final val loss, the one-sided t-test p-value for mean < target,
mean/std train time, mean ms/step, mean peak memory, then one row per run. Writes val-loss and
step-time curves to <folder>/summary.png (or --png). Exits 1 when no complete run remains.
"""
import argparse
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Whole-line matches only: the source code embedded at the top of each log holds f-strings that look
# like these lines ("step:{step}/{args.num_iterations} val_loss:..."), which must not be picked up.
_NUM = r"(?:nan|[-+]?inf|[-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)"
STEP_RE = re.compile(
    rf"^step:(\d+)/(\d+) (val_loss|train_loss):({_NUM}) train_time:(\d+)ms step_avg:({_NUM})ms$")
PEAK_RE = re.compile(r"^peak memory allocated: (\d+) MiB reserved: (\d+) MiB$")


@dataclass
class Run:
    """One parsed log. `error` is None for a complete run, else the reason it cannot be used."""
    run_id: str
    path: Path
    total_steps: int | None = None
    val_steps: list[int] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    time_steps: list[int] = field(default_factory=list)  # one entry per distinct step seen
    train_times_ms: list[int] = field(default_factory=list)
    peak_alloc_mib: int | None = None
    peak_reserved_mib: int | None = None
    error: str | None = None

    @property
    def complete(self) -> bool:
        return self.error is None

    @property
    def final_val_loss(self) -> float:
        return self.val_losses[-1]

    @property
    def final_train_time_ms(self) -> int:
        return self.train_times_ms[-1]

    @property
    def ms_per_step(self) -> float:
        return self.final_train_time_ms / self.total_steps

    def step_times_ms(self) -> tuple[np.ndarray, np.ndarray]:
        """(step, ms per step) from consecutive train_time values; gaps of several steps are averaged."""
        s = np.asarray(self.time_steps, dtype=float)
        t = np.asarray(self.train_times_ms, dtype=float)
        if len(s) < 2:
            return np.empty(0), np.empty(0)
        ms = np.diff(t) / np.diff(s)
        # A timer reset (some trainers restart the clock after warm-up steps) shows up as a negative
        # difference; it is not a step time, so drop it rather than plot a spike below zero.
        ms[ms < 0] = np.nan
        return s[1:], ms


def parse_log(path) -> Run:
    """Parse one log; never raises for bad content, records the reason in `Run.error` instead."""
    path = Path(path)
    run = Run(run_id=path.stem, path=path)
    try:
        # errors="replace": a stray byte in the nvidia-smi banner should not cost us the whole run.
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        run.error = f"unreadable: {e.strerror or e}"
        return run
    seen = set()  # (step, kind): the same kind twice for one step means two runs were concatenated
    last_step = -1
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.rstrip()
        if m := PEAK_RE.match(line):
            run.peak_alloc_mib, run.peak_reserved_mib = int(m[1]), int(m[2])
            continue
        m = STEP_RE.match(line)
        if not m:
            continue
        step, total, kind, value, time_ms = int(m[1]), int(m[2]), m[3], float(m[4]), int(m[5])
        if run.total_steps is None:
            run.total_steps = total
        elif total != run.total_steps:
            run.error = f"malformed: inconsistent total steps ({total} vs {run.total_steps}, line {lineno})"
            return run
        if step > total:
            run.error = f"malformed: step {step} beyond total {total} (line {lineno})"
            return run
        # The val line for step s and the train line for step s legitimately share s: non-decreasing.
        if step < last_step or (step, kind) in seen:
            run.error = f"malformed: steps not monotone (step {step} after {last_step}, line {lineno})"
            return run
        seen.add((step, kind))
        if step != last_step:
            run.time_steps.append(step)
            run.train_times_ms.append(time_ms)
        last_step = step
        if kind == "val_loss":
            run.val_steps.append(step)
            run.val_losses.append(value)
    if run.total_steps is None:
        run.error = "malformed: no step lines"
    elif not run.val_steps or run.val_steps[-1] != run.total_steps:
        t = run.total_steps
        run.error = f"cut off: no val_loss line for step {t}/{t} (last step {last_step})"
    return run


def _natural_key(run: Run):
    # run2 before run10
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", run.run_id)]


def split_runs(runs: list[Run]) -> tuple[list[Run], list[tuple[Run, str]]]:
    """(usable runs, [(skipped run, reason)]): complete runs with the most common T are usable."""
    runs = sorted(runs, key=_natural_key)
    counts = Counter(r.total_steps for r in runs if r.complete)
    if not counts:
        return [], [(r, r.error) for r in runs]
    # Ties go to the longer run length so the choice is deterministic.
    total = max(counts, key=lambda t: (counts[t], t))
    good, skipped = [], []
    for r in runs:
        if not r.complete:
            skipped.append((r, r.error))
        elif r.total_steps != total:
            skipped.append((r, f"T={r.total_steps} differs from the most common T={total}"))
        else:
            good.append(r)
    return good, skipped


def _table(header: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    """First column left-aligned, the rest right-aligned (numbers); Markdown or plain text."""
    if markdown:
        sep = "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"
        return ["| " + " | ".join(header) + " |", sep] + ["| " + " | ".join(r) + " |" for r in rows]
    widths = [max(len(c) for c in col) for col in zip(header, *rows)]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in [header] + rows]


def _fmt_p(p: float) -> str:
    # Four decimals reads well for the usual p ~ 0.01; tiny p-values would all print as 0.0000.
    return f"{p:.4f}" if not p < 1e-4 else f"{p:.1e}"


def summarize(runs: list[Run], target: float = 3.28, markdown: bool = False) -> str:
    """Statistics over the usable runs, one row per run, and the skipped runs with reasons."""
    good, skipped = split_runs(runs)
    if not good:
        raise ValueError("no complete run to summarise")
    n = len(good)
    losses = np.array([r.final_val_loss for r in good])
    times_s = np.array([r.final_train_time_ms / 1000 for r in good])
    ms_step = np.array([r.ms_per_step for r in good])
    peaks = [r.peak_alloc_mib for r in good if r.peak_alloc_mib is not None]

    def std(x, fmt):
        return format(np.std(x, ddof=1), fmt) if n > 1 else "n/a"

    from scipy import stats  # here, not on import: profile_summary.py imports this module for STEP_RE

    p = _fmt_p(stats.ttest_1samp(losses, target, alternative="less").pvalue) if n > 1 else "n/a"
    peak_label = "peak alloc MiB" + (f" ({len(peaks)} of {n} runs)" if 0 < len(peaks) < n else "")
    summary = [
        ["n runs", str(n), ""],
        ["final val loss", f"{losses.mean():.5f}", std(losses, ".5f")],
        [f"p(mean < {target:g})", p, ""],
        ["train time s", f"{times_s.mean():.2f}", std(times_s, ".2f")],
        ["ms/step", f"{ms_step.mean():.2f}", ""],
        [peak_label, f"{np.mean(peaks):.0f}" if peaks else "n/a", ""],
    ]
    per_run = [[r.run_id, f"{r.final_val_loss:.4f}", f"{r.final_train_time_ms / 1000:.2f}", f"{r.ms_per_step:.2f}",
                str(r.peak_alloc_mib) if r.peak_alloc_mib is not None else "n/a"] for r in good]
    out = [f"summary: {n} complete run{'s' * (n > 1)} of {good[0].total_steps} steps, target val loss {target:g}", ""]
    out += _table(["metric", "mean", "std"], summary, markdown) + [""]
    out += _table(["run", "val loss", "train time s", "ms/step", "peak MiB"], per_run, markdown)
    if skipped:
        out += ["", f"skipped ({len(skipped)}):"]
        out += [f"{'-' if markdown else ' '} {r.run_id}: {reason}" for r, reason in skipped]
    return "\n".join(out) + "\n"


def plot(runs: list[Run], png_path) -> None:
    """Val loss vs step and ms/step vs step, one line per run; runs that are not complete are dashed."""
    import matplotlib
    matplotlib.use("Agg")  # headless: no display on the training or CI machines
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    runs = sorted((r for r in runs if r.time_steps), key=_natural_key)
    fig, (ax_loss, ax_time) = plt.subplots(1, 2, figsize=(14, 5.5))
    all_ms = []
    for r in runs:
        style = dict(lw=1, ls="-" if r.complete else "--", label=r.run_id + ("" if r.complete else " (skipped)"))
        line, = ax_loss.plot(r.val_steps, r.val_losses, marker=".", ms=3, **style)
        steps, ms = r.step_times_ms()
        ax_time.plot(steps, ms, color=line.get_color(), alpha=0.7, **style)
        all_ms.append(ms[np.isfinite(ms)])
    # Losses fall from ~11 to ~3.3; a log axis keeps the late, interesting part readable.
    ax_loss.set(xlabel="step", ylabel="val loss", yscale="log", title="validation loss")
    for axis in (ax_loss.yaxis.set_major_formatter, ax_loss.yaxis.set_minor_formatter):
        axis(FormatStrFormatter("%g"))  # plain 4, 6, 10 instead of 4x10^0
    ax_time.set(xlabel="step", ylabel="ms / step", title="step time")
    finite = np.concatenate(all_ms) if all_ms else np.empty(0)
    if finite.size:
        # The compile step and validation pauses are many times the typical step; clip them off.
        ax_time.set_ylim(0, 2 * np.median(finite))
        ax_time.set_title("step time (y clipped at 2x median)")
    for ax in (ax_loss, ax_time):
        ax.grid(alpha=0.3)
    if runs:
        ax_loss.legend(fontsize=6, ncol=math.ceil(len(runs) / 16))
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Summarise the train_gpt.py logs (*.txt) in a folder.")
    ap.add_argument("folder", type=Path)
    ap.add_argument("--target", type=float, default=3.28, help="val loss to beat (one-sided t-test)")
    ap.add_argument("--png", type=Path, help="plot path (default: <folder>/summary.png)")
    ap.add_argument("--markdown", action="store_true", help="print Markdown tables")
    args = ap.parse_args(argv)

    if not args.folder.is_dir():
        print(f"error: {args.folder} is not a folder", file=sys.stderr)
        return 1
    logs = sorted(args.folder.glob("*.txt"))
    if not logs:
        print(f"error: no *.txt logs in {args.folder}", file=sys.stderr)
        return 1
    runs = [parse_log(p) for p in logs]
    good, skipped = split_runs(runs)
    if not good:
        for r, reason in skipped:
            print(f"skipped {r.run_id}: {reason}", file=sys.stderr)
        print(f"error: no complete run among {len(logs)} logs in {args.folder}", file=sys.stderr)
        return 1
    print(summarize(runs, args.target, markdown=args.markdown), end="")
    png = args.png or args.folder / "summary.png"
    plot(runs, png)
    # stderr, so stdout stays a clean table to paste into a README
    print(f"wrote {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
