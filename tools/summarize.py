"""Summarise a folder of train_gpt.py logs: statistics per group of comparable runs, and a PNG of curves if asked.

Usage:
    python tools/summarize.py records/<tag> [--target 3.28] [--markdown] [--png PATH [--force]]

Every `*.txt` file in the folder or its subfolders is read; files with neither step lines nor the log's
"=" * 100 rules (benchmark outputs, notes) are not logs and are ignored. A log opens with the script's source,
a rule, the environment report (Python, PyTorch, `world_size N, device D`, nvidia-smi, `name = value` per
hyperparameter), another rule, and then the run's lines, such as
    resumed from <checkpoint> at step 500
    step:125/1393 val_loss:4.3692 train_time:29512ms step_avg:236.10ms
    peak memory allocated: 38912 MiB reserved: 40120 MiB

Runs are grouped by code (a short sha256 of the logged source), world size and hyperparameters (except tag,
resume, checkpoint_every, checkpoint_dir and profile_at, which only name or bookkeep a run); resumed runs form
groups of their own, as their train time is not comparable. Logs without the header (synthetic ones) fall in
a group with code "unknown". Each group is reported on its own and nothing is averaged across groups.

A run is complete when it has a val_loss line for step T/T. Cut-off, malformed or unreadable logs, and runs
whose T differs from the most common T of their group, are listed under "skipped" and never averaged.

Prints for each group a header (code, world size, the hyperparameters that differ between groups, number of
logs), then n runs, mean/std of the final val loss, the one-sided t-test p-value for mean < target, mean/std
train time, mean ms/step, mean peak memory, then one row per run. The p-value is "n/a" for a single run and
when every final loss of the group is the same (std 0): t is then undefined, and identical runs (one seed
repeated, say) are no evidence about run-to-run noise. Exits 1 when no complete run remains.

Only with --png PATH are the val-loss and step-time curves of the counted runs drawn, to PATH: one colour and
legend entry per group, for at most 8 groups (those with the most counted runs; how many were left out is said
in the legend's title and on stdout, and every group is still in the text), resumed groups dotted, a dashed line
at the target, the loss axis framed on the evaluations after each run's first. Nothing is written otherwise, so
summarising a record folder leaves its committed files alone. Exits 2, with one line on stderr and before any
log is read, when PATH's folder does not exist (it is not created) or when git tracks PATH and --force is not
given (a file is untracked outside a git repository or without git).
"""
import argparse
import hashlib
import math
import re
import subprocess
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
RESUMED_RE = re.compile(r"^resumed from (.*) at step (\d+)$")
RULE = "=" * 100  # train_gpt.py's separator around the environment report
WORLD_RE = re.compile(r"^world_size (\d+), device (\w+)$")
HPARAM_RE = re.compile(r"^([A-Za-z_]\w*) = (.*)$")
# Hyperparameters that only name or bookkeep a run; they do not change what it computes, so runs that differ
# only in them are pooled. Whether a run was resumed is part of the grouping key on its own (Run.resumed).
BOOKKEEPING = frozenset({"tag", "resume", "checkpoint_every", "checkpoint_dir", "profile_at"})
NOT_A_LOG = "not a log: no step lines and no environment report"
MAX_PLOTTED_GROUPS = 8  # more legend entries than this no longer read as a legend


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
    code: str = "unknown"  # short sha256 of the logged source; "unknown" for logs without the header
    world_size: int | None = None
    hparams: dict[str, str] = field(default_factory=dict)  # name -> value as logged (its repr)
    resumed_at: int | None = None  # the step of the "resumed from" line
    error: str | None = None

    @property
    def complete(self) -> bool:
        return self.error is None

    @property
    def resumed(self) -> bool:
        return self.resumed_at is not None or self.hparams.get("resume", "''") not in ("''", '""')

    @property
    def group_key(self) -> tuple:
        hparams = tuple((k, v) for k, v in self.hparams.items() if k not in BOOKKEEPING)
        return self.code, self.world_size, hparams, self.resumed

    @property
    def label(self) -> str:
        """The run id, marked when the run was resumed from a checkpoint."""
        if self.resumed_at is not None:
            return f"{self.run_id} (resumed at step {self.resumed_at})"
        return self.run_id + " (resumed)" * self.resumed

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


def parse_header(lines: list[str]) -> tuple[str, int | None, dict[str, str], int]:
    """(code hash, world size, hyperparameters, index of the first line after the header) from the lines of a
    log (with their line ends); ("unknown", None, {}, 0) when there is no environment report between rules."""
    rules = [i for i, line in enumerate(lines) if line.rstrip("\r\n") == RULE]
    for a, b in zip(rules, rules[1:]):
        env = [line.rstrip() for line in lines[a + 1:b]]
        world = next((m for line in env if (m := WORLD_RE.match(line))), None)
        # A rule inside the source itself (a docstring, say) is not followed by the report: look further.
        if env and env[0].startswith("Python ") and world:
            code = hashlib.sha256("".join(lines[:a]).encode()).hexdigest()[:10]
            hparams = dict(m.groups() for line in env if (m := HPARAM_RE.match(line)))
            return code, int(world[1]), hparams, b + 1
    return "unknown", None, {}, 0


def parse_log(path, root=None) -> Run:
    """Parse one log; never raises for bad content, records the reason in `Run.error` instead.
    The run id is the path relative to `root` without ".txt" (the file name's stem without a root)."""
    path = Path(path)
    run_id = path.relative_to(root).with_suffix("").as_posix() if root is not None else path.stem
    run = Run(run_id=run_id, path=path)
    try:
        # errors="replace": a stray byte in the nvidia-smi banner should not cost us the whole run.
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        run.error = f"unreadable: {e.strerror or e}"
        return run
    lines = text.splitlines(keepends=True)
    run.code, run.world_size, run.hparams, body = parse_header(lines)
    run.error = _parse_body(run, lines[body:], body)
    if run.error == "malformed: no step lines" and body == 0 and not any(line.rstrip() == RULE for line in lines):
        run.error = NOT_A_LOG
    return run


def _parse_body(run: Run, lines: list[str], first_lineno: int) -> str | None:
    """Fill the run's steps, losses, times and peak memory from its own lines; -> the error, or None."""
    seen = set()  # (step, kind): the same kind twice for one step means two runs were concatenated
    last_step = -1
    for lineno, line in enumerate(lines, first_lineno + 1):
        line = line.rstrip()
        if m := PEAK_RE.match(line):
            run.peak_alloc_mib, run.peak_reserved_mib = int(m[1]), int(m[2])
            continue
        if m := RESUMED_RE.match(line):
            run.resumed_at = int(m[2])
            continue
        m = STEP_RE.match(line)
        if not m:
            continue
        step, total, kind, value, time_ms = int(m[1]), int(m[2]), m[3], float(m[4]), int(m[5])
        if run.total_steps is None:
            run.total_steps = total
        elif total != run.total_steps:
            return f"malformed: inconsistent total steps ({total} vs {run.total_steps}, line {lineno})"
        if step > total:
            return f"malformed: step {step} beyond total {total} (line {lineno})"
        # The val line for step s and the train line for step s legitimately share s: non-decreasing.
        if step < last_step or (step, kind) in seen:
            return f"malformed: steps not monotone (step {step} after {last_step}, line {lineno})"
        seen.add((step, kind))
        if step != last_step:
            run.time_steps.append(step)
            run.train_times_ms.append(time_ms)
        last_step = step
        if kind == "val_loss":
            run.val_steps.append(step)
            run.val_losses.append(value)
    if run.total_steps is None:
        return "malformed: no step lines"
    if not run.val_steps or run.val_steps[-1] != run.total_steps:
        t = run.total_steps
        return f"cut off: no val_loss line for step {t}/{t} (last step {last_step})"
    return None


def find_logs(folder: Path) -> tuple[list[Run], list[Path]]:
    """(parsed logs, files that are not logs) among the *.txt files of a folder and its subfolders.
    Profiles (*.profile.tsv) and summaries (*.md, *.png) do not match *.txt."""
    runs, ignored = [], []
    for path in sorted(p for p in folder.rglob("*.txt") if p.is_file()):
        run = parse_log(path, root=folder)
        if run.error == NOT_A_LOG:
            ignored.append(path)
        else:
            runs.append(run)
    return runs, ignored


def _natural_key(run: Run):
    # run2 before run10
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", run.run_id)]


@dataclass
class Group:
    """Runs with one code, world size and set of hyperparameters, resumed or not: the unit of statistics."""
    number: int  # 1, 2, ...: the label shared by the text and the plot's legend
    code: str
    world_size: int | None
    hparams: dict[str, str]  # bookkeeping fields left out
    resumed: bool
    runs: list[Run]


def group_runs(runs: list[Run]) -> list[Group]:
    """Runs grouped by Run.group_key; groups with the header first, then in order of code, world size."""
    by_key: dict[tuple, list[Run]] = {}
    for r in runs:
        by_key.setdefault(r.group_key, []).append(r)

    def order(key):
        code, world_size, hparams, resumed = key
        return code == "unknown", code, world_size or 0, resumed, hparams

    return [Group(i, k[0], k[1], dict(k[2]), k[3], sorted(by_key[k], key=_natural_key))
            for i, k in enumerate(sorted(by_key, key=order), 1)]


def differing_hparams(groups: list[Group]) -> list[str]:
    """Names of the hyperparameters whose values are not the same in every group that logged them."""
    known = [g.hparams for g in groups if g.hparams]
    names = dict.fromkeys(name for h in known for name in h)  # logged order, no duplicates
    return [name for name in names if len({h.get(name) for h in known}) > 1]


def describe(group: Group, names: list[str]) -> tuple[str, str]:
    """('code 1a2b3c4d5e, world size 4, resumed', 'num_iterations = 1393, ...'): what tells the group apart."""
    world = group.world_size if group.world_size is not None else "?"
    ids = ", ".join([f"code {group.code}", f"world size {world}"] + ["resumed"] * group.resumed)
    return ids, ", ".join(f"{name} = {group.hparams[name]}" for name in names if name in group.hparams)


def split_runs(runs: list[Run]) -> tuple[list[Run], list[tuple[Run, str]]]:
    """(usable runs, [(skipped run, reason)]) of one group: complete runs with the most common T are usable."""
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


def _p_value(losses: np.ndarray, target: float) -> str:
    """The one-sided t-test p-value for mean < target; "n/a" for one run or for identical losses."""
    # Identical losses (std 0): t is +-inf or 0/0 and scipy warns; and identical runs, one seed repeated say,
    # say nothing about the noise between runs, so no p-value is claimed from them.
    if len(losses) < 2 or np.ptp(losses) == 0:
        return "n/a"
    from scipy import stats  # here, not on import: profile_summary.py imports this module for STEP_RE

    return _fmt_p(stats.ttest_1samp(losses, target, alternative="less").pvalue)


def _statistics(good: list[Run], target: float, markdown: bool) -> list[str]:
    """The summary table and the per-run rows of one group's usable runs."""
    n = len(good)
    losses = np.array([r.final_val_loss for r in good])
    times_s = np.array([r.final_train_time_ms / 1000 for r in good])
    ms_step = np.array([r.ms_per_step for r in good])
    peaks = [r.peak_alloc_mib for r in good if r.peak_alloc_mib is not None]

    def std(x, fmt):
        return format(np.std(x, ddof=1), fmt) if n > 1 else "n/a"

    peak_label = "peak alloc MiB" + (f" ({len(peaks)} of {n} runs)" if 0 < len(peaks) < n else "")
    summary = [
        ["n runs", str(n), ""],
        ["final val loss", f"{losses.mean():.5f}", std(losses, ".5f")],
        [f"p(mean < {target:g})", _p_value(losses, target), ""],
        ["train time s", f"{times_s.mean():.2f}", std(times_s, ".2f")],
        ["ms/step", f"{ms_step.mean():.2f}", ""],
        [peak_label, f"{np.mean(peaks):.0f}" if peaks else "n/a", ""],
    ]
    per_run = [[r.label, f"{r.final_val_loss:.4f}", f"{r.final_train_time_ms / 1000:.2f}", f"{r.ms_per_step:.2f}",
                str(r.peak_alloc_mib) if r.peak_alloc_mib is not None else "n/a"] for r in good]
    out = [f"summary: {n} complete run{'s' * (n > 1)} of {good[0].total_steps} steps, target val loss {target:g}", ""]
    out += _table(["metric", "mean", "std"], summary, markdown) + [""]
    return out + _table(["run", "val loss", "train time s", "ms/step", "peak MiB"], per_run, markdown)


def _group_section(group: Group, names: list[str], target: float, markdown: bool) -> list[str]:
    good, skipped = split_runs(group.runs)
    n = len(group.runs)
    ids, hparams = describe(group, names)
    out = [f"{'### ' * markdown}group {group.number}: {ids}; {n} log{'s' * (n > 1)}"]
    out += ([f"{'  ' * (not markdown)}{hparams}"] if hparams else []) + [""]
    out += _statistics(good, target, markdown) if good else ["no complete run"]
    if skipped:
        out += ["", f"skipped ({len(skipped)}):"]
        out += [f"{'-' if markdown else ' '} {r.label}: {reason}" for r, reason in skipped]
    return out


def summarize(runs: list[Run], target: float = 3.28, markdown: bool = False) -> str:
    """Per group: a header, statistics over its usable runs, one row per run, its skipped runs with reasons."""
    groups = group_runs(runs)
    if not any(split_runs(g.runs)[0] for g in groups):
        raise ValueError("no complete run to summarise")
    names = differing_hparams(groups)
    sections = [_group_section(g, names, target, markdown) for g in groups]
    return "\n\n".join("\n".join(s) for s in sections) + "\n"


def _loss_limits(runs: list[Run], target: float) -> tuple[float, float]:
    """A val-loss range holding the target and every evaluation after each run's first (the step-0 loss of
    ~10.8 would squash the interesting end near the target, so it may lie above the frame)."""
    points = [target] + [v for r in runs for v in (r.val_losses[1:] or r.val_losses) if np.isfinite(v)]
    lo, hi = min(points), max(points)
    pad = 0.05 * (hi - lo) or 0.01
    return lo - pad, hi + pad


def _time_limit(runs: list[Run]) -> float | None:
    """Twice the median step time of the slowest run: compile steps and pauses, many times the typical step,
    are clipped off, while a 1-GPU group stays in the frame beside a faster 8-GPU one."""
    medians = [np.median(ms[np.isfinite(ms)]) for r in runs if np.isfinite(ms := r.step_times_ms()[1]).any()]
    return 2 * max(medians) if medians else None


def _legend_label(group: Group, names: list[str], n: int) -> str:
    label = f"{group.number}: {n} run{'s' * (n > 1)}, {', '.join(filter(None, describe(group, names)))}"
    # The full description is in the printed text under the same number; two columns must fit the page.
    return label if len(label) <= 100 else label[:99] + "\u2026"


def _frame_loss(ax, runs: list[Run], target: float):
    ax.axhline(target, color="black", ls="--", lw=1)
    if runs:
        ax.set_ylim(*_loss_limits(runs, target))
    above = any(v > ax.get_ylim()[1] for r in runs for v in r.val_losses)
    ax.set(xlabel="step", ylabel="val loss",
           title=f"validation loss (dashed: target {target:g}" + ("; step-0 losses above" if above else "") + ")")


def _frame_time(ax, runs: list[Run]):
    ax.set(xlabel="step", ylabel="ms / step", title="step time (y clipped at 2x the slowest run's median)")
    if (top := _time_limit(runs)) is not None:
        ax.set_ylim(0, top)


def plotted_groups(groups: list[Group], max_groups: int = MAX_PLOTTED_GROUPS):
    """([(group, its usable runs)] to draw, in group order; [groups with usable runs left out]): the max_groups
    groups with the most usable runs, ties to the lower number, so that the legend stays readable."""
    counted = [(g, good) for g in groups if (good := split_runs(g.runs)[0])]
    kept = {g.number for g, good in sorted(counted, key=lambda c: (-len(c[1]), c[0].number))[:max_groups]}
    return [(g, good) for g, good in counted if g.number in kept], [g for g, _ in counted if g.number not in kept]


def draw(runs: list[Run], target: float = 3.28, max_groups: int = MAX_PLOTTED_GROUPS):
    """The figure: val loss and ms/step vs step for the usable runs only, one colour and legend entry per
    group for the plotted_groups() only (the legend's title counts the rest), resumed groups dotted, a dashed
    line at the target."""
    import matplotlib
    matplotlib.use("Agg")  # headless: no display on the training or CI machines
    import matplotlib.pyplot as plt

    groups = group_runs(runs)
    names = differing_hparams(groups)
    counted, left_out = plotted_groups(groups, max_groups)
    ncol = 1 if len(counted) < 7 else 2
    legend_in = 0.17 * (math.ceil(len(counted) / ncol) + bool(left_out)) + 0.2  # inches below the axes
    fig, (ax_loss, ax_time) = plt.subplots(1, 2, figsize=(14, 5 + legend_in))
    for i, (g, good) in enumerate(counted):
        # A colour per drawn group, not per group number: at most max_groups colours, none repeated.
        style = dict(color=f"C{i % 10}", ls=":" if g.resumed else "-", lw=1)
        for j, r in enumerate(good):
            label = _legend_label(g, names, len(good)) if j == 0 else "_nolegend_"
            ax_loss.plot(r.val_steps, r.val_losses, marker=".", ms=3, label=label, **style)
            ax_time.plot(*r.step_times_ms(), alpha=0.7, **style)
    drawn = [r for _, good in counted for r in good]
    _frame_loss(ax_loss, drawn, target)
    _frame_time(ax_time, drawn)
    for ax in (ax_loss, ax_time):
        ax.grid(alpha=0.3)
    if counted:  # below the axes: group labels are long and would cover the curves
        title = f"{_left_out_note(left_out)}; every group is in the text" if left_out else None
        fig.legend(loc="lower center", fontsize=7, ncol=ncol, frameon=False, title=title, title_fontsize=7)
    fig.tight_layout(rect=(0, legend_in / (5 + legend_in), 1, 1))
    return fig


def _left_out_note(left_out: list[Group]) -> str:
    n = len(left_out)
    return f"{n} group{'s' * (n > 1)} with fewer runs left out of the plot"


def plot(runs: list[Run], png_path, target: float = 3.28) -> None:
    """Write draw()'s figure to png_path, whose folder must exist."""
    import matplotlib.pyplot as plt

    fig = draw(runs, target)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def tracked_by_git(path: Path) -> bool:
    """Whether git tracks path, asked in path's folder; False outside a repository or without git."""
    try:
        res = subprocess.run(["git", "ls-files", "--error-unmatch", path.name], cwd=path.parent,
                             capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):  # no git, or a folder git cannot enter
        return False
    return res.returncode == 0


def png_refusal(png: Path, force: bool) -> str | None:
    """Why --png PATH must not be written, or None: a folder that does not exist, or a file git tracks."""
    if not png.parent.is_dir():
        return f"error: --png {png}: folder {png.parent} does not exist (it is not created)"
    if not force and tracked_by_git(png):
        return f"error: --png {png}: the file is tracked by git; pass --force to overwrite it"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="Summarise the train_gpt.py logs (*.txt, subfolders included) in a folder: one table per "
                    "group of runs with the same code, world size and hyperparameters (resumed runs apart); "
                    "never averaged across groups.",
        epilog=f"Hyperparameters left out of the grouping: {', '.join(sorted(BOOKKEEPING))}. Logs without the "
               "header form a group with code 'unknown'; *.txt files with neither step lines nor a header are "
               "ignored. The plot (only with --png) shows the counted runs only, one legend entry per group for at "
               f"most {MAX_PLOTTED_GROUPS} groups (those with the most runs), a dashed line at --target, and "
               "frames the val losses after each run's first evaluation.")
    ap.add_argument("folder", type=Path, help="searched recursively for *.txt logs")
    ap.add_argument("--target", type=float, default=3.28, help="val loss to beat (one-sided t-test, plot line)")
    ap.add_argument("--markdown", action="store_true", help="print Markdown tables")
    ap.add_argument("--png", type=Path, help="write the plot here (default: no plot); its folder must exist")
    ap.add_argument("--force", action="store_true", help="let --png overwrite a file that git tracks")
    args = ap.parse_args(argv)

    if args.png is not None and (refusal := png_refusal(args.png, args.force)):
        print(refusal, file=sys.stderr)
        return 2

    if not args.folder.is_dir():
        print(f"error: {args.folder} is not a folder", file=sys.stderr)
        return 1
    runs, ignored = find_logs(args.folder)
    if ignored:
        print(f"ignored, not logs ({len(ignored)}): "
              + ", ".join(p.relative_to(args.folder).as_posix() for p in ignored), file=sys.stderr)
    if not runs:
        print(f"error: no *.txt logs in {args.folder} or its subfolders", file=sys.stderr)
        return 1
    if not any(split_runs(g.runs)[0] for g in group_runs(runs)):
        for r in sorted(runs, key=_natural_key):
            print(f"skipped {r.run_id}: {r.error}", file=sys.stderr)
        print(f"error: no complete run among {len(runs)} logs in {args.folder}", file=sys.stderr)
        return 1
    print(summarize(runs, args.target, markdown=args.markdown), end="")
    if args.png is None:
        return 0
    plot(runs, args.png, args.target)
    if left_out := plotted_groups(group_runs(runs))[1]:
        print(f"\nplot: {_left_out_note(left_out)}: " + ", ".join(str(g.number) for g in left_out))
    # stderr, so stdout stays the text to paste into a README
    print(f"wrote {args.png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
