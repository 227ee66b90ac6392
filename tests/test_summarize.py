"""Tests for tools/summarize.py on synthetic logs written to tmp_path.

Pins: whole-line parsing that ignores look-alike f-strings in the embedded source preamble; the parsed
values (steps, losses, train times, peak memory, step times); mean/std/one-sided p-value against numbers
computed here with numpy/scipy (seed record: 32 runs, mean 3.27869, p 0.0001); no p-value and no warning
for identical losses (std 0); cut-off, malformed, unreadable and different-T logs listed as skipped and excluded
from the mean; exit code 1 for an empty or all-bad folder; Markdown output; the CLI entry point. Grouping: logs
found in subfolders, non-logs ignored; code versions, world sizes, hyperparameters and resumed runs in groups of
their own, never pooled, while tag, resume and checkpoint settings do not split; the plot draws only counted runs,
one legend entry per group for the 8 groups with the most runs (the rest counted in the legend and on stdout), a
target line, a frame holding every evaluation after the first. The PNG: written only with --png, never into a
folder that does not exist nor over a file git tracks unless --force (exit 2, one line). No scipy or matplotlib
on import. Every file is written under tmp_path.

Run: python -m pytest tests/test_summarize.py -q
"""
import hashlib
import importlib.util
import re
import shutil
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "summarize.py"
# records/ is not a package, so load the script by path.
_spec = importlib.util.spec_from_file_location("summarize", SCRIPT)
sm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sm)

SEED_LOSSES = [3.276, 3.2785, 3.2796, 3.2788, 3.2789, 3.2768, 3.2775, 3.2784, 3.2767, 3.2792, 3.2807, 3.2801,
               3.2805, 3.2777, 3.2789, 3.2799, 3.2786, 3.2776, 3.2791, 3.2808, 3.2776, 3.2786, 3.2774, 3.2832,
               3.277, 3.2789, 3.2784, 3.2766, 3.2755, 3.2784, 3.2798, 3.2825]

# What train_gpt.py puts above the real log lines: its own source, whose f-strings resemble log lines
# (some even fully numeric, but indented or quoted), plus versions, nvidia-smi and other noise.
PREAMBLE = '''import torch
def log(step, args, val_loss, training_time_ms):
    print0(f"step:{step}/{args.num_iterations} val_loss:{val_loss:.4f} train_time:{training_time_ms:.0f}ms")
    print0(f"step:{step + 1}/{args.num_iterations} train_loss:{loss.item():.4f} train_time:{t:.0f}ms step_avg:{a}ms")
    print0(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 1024 // 1024} MiB reserved: {r} MiB")
    # example: step:3/3 val_loss:1.0000 train_time:1ms step_avg:1.00ms
    """
    step:3/3 val_loss:1.0000 train_time:1ms step_avg:1.00ms
    """
s = "step:3/3 val_loss:1.0000 train_time:1ms step_avg:1.00ms"
Running Python 3.12.3 | PyTorch 2.9.0
+-----------------------------------------------------------------------------+
| NVIDIA-SMI 570.00   Driver Version: 570.00   CUDA Version: 12.8              |
+-----------------------------------------------------------------------------+
num_iterations: 20 val_loss_every: 5
====================================================================================================
'''


def make_log(total=20, final_loss=3.28, ms=236, val_every=5, peak=38912, cut_at=None, preamble=PREAMBLE, start=0):
    """A log as train_gpt.py writes it; cut_at ends it at that step (a crashed run: no final val line); start > 0
    is a run resumed at that step."""
    lines = [preamble.rstrip("\n"), "warmup_time:71.2s", "fp8 head: off", "log: records/test/run.txt"]
    for step in range(start, total + 1):
        if cut_at is not None and step > cut_at:
            break
        t = ms * step
        if step % val_every == 0 or step == total:
            loss = final_loss if step == total else final_loss + 8 * (1 - step / total) ** 2
            avg = t / step if step else 0.0
            lines.append(f"step:{step}/{total} val_loss:{loss:.4f} train_time:{t}ms step_avg:{avg:.2f}ms")
        if step < total and step != cut_at:
            t = ms * (step + 1)
            lines.append(f"step:{step + 1}/{total} train_loss:{final_loss + 1:.4f} train_time:{t}ms "
                         f"step_avg:{t / (step + 1):.2f}ms")
    if peak is not None and cut_at is None:
        lines.append(f"peak memory allocated: {peak} MiB reserved: {peak + 1208} MiB")
    return "\n".join(lines) + "\n"


def write(folder, name, text):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return folder / name


def summary_lines(text):
    """metric row name -> cells of the plain-text summary table."""
    rows = {}
    for line in text.splitlines():
        for key in ("n runs", "final val loss", "p(mean", "train time s", "ms/step", "peak alloc MiB"):
            if line.startswith(key):
                rows[key] = line[len(key):].split()
    return rows


def test_parse_values_ignores_preamble_lookalikes(tmp_path):
    run = sm.parse_log(write(tmp_path, "run1.txt", make_log(total=20, final_loss=3.2787, ms=236)))
    assert run.complete and run.error is None
    assert run.run_id == "run1" and run.total_steps == 20
    assert run.val_steps == [0, 5, 10, 15, 20]
    assert run.val_losses[0] == pytest.approx(11.2787) and run.final_val_loss == pytest.approx(3.2787)
    assert run.time_steps == list(range(21))  # one time per distinct step, preamble lines not counted
    assert run.train_times_ms == [236 * s for s in range(21)]
    assert run.final_train_time_ms == 4720 and run.ms_per_step == pytest.approx(236.0)
    assert (run.peak_alloc_mib, run.peak_reserved_mib) == (38912, 40120)
    steps, ms = run.step_times_ms()
    assert list(steps) == list(range(1, 21)) and np.allclose(ms, 236.0)


def test_step_times_average_over_gaps_and_drop_timer_resets(tmp_path):
    text = "\n".join(["step:0/4 val_loss:10.0000 train_time:0ms step_avg:0.00ms",
                      "step:2/4 train_loss:9.0000 train_time:400ms step_avg:200.00ms",
                      "step:3/4 train_loss:8.0000 train_time:100ms step_avg:33.33ms",  # clock restarted
                      "step:4/4 val_loss:3.0000 train_time:300ms step_avg:75.00ms"])
    steps, ms = sm.parse_log(write(tmp_path, "r.txt", text)).step_times_ms()
    assert list(steps) == [2, 3, 4]
    assert ms[0] == 200.0 and np.isnan(ms[1]) and ms[2] == 200.0


def test_seed_record_statistics(tmp_path):
    for i, loss in enumerate(SEED_LOSSES):
        write(tmp_path, f"seed{i}.txt", make_log(final_loss=loss, ms=235 + i % 3, peak=38900 + i))
    runs = [sm.parse_log(p) for p in sorted(tmp_path.glob("*.txt"))]
    x = np.array(SEED_LOSSES)
    mean, std = x.mean(), x.std(ddof=1)
    p = stats.ttest_1samp(x, 3.28, alternative="less").pvalue
    assert round(mean, 5) == 3.27869 and round(p, 4) == 0.0001

    rows = summary_lines(sm.summarize(runs, 3.28))
    assert rows["n runs"] == ["32"]
    assert rows["final val loss"] == [f"{mean:.5f}", f"{std:.5f}"]
    assert float(rows["p(mean"][-1]) == pytest.approx(p, rel=0.05)
    times = np.array([(235 + i % 3) * 20 / 1000 for i in range(32)])
    assert rows["train time s"] == [f"{times.mean():.2f}", f"{times.std(ddof=1):.2f}"]
    assert rows["ms/step"] == [f"{times.mean() * 1000 / 20:.2f}"]
    assert rows["peak alloc MiB"] == [f"{np.mean([38900 + i for i in range(32)]):.0f}"]


def test_single_run_has_no_std_or_p(tmp_path):
    run = sm.parse_log(write(tmp_path, "only.txt", make_log(peak=None)))
    rows = summary_lines(sm.summarize([run], 3.28))
    assert rows["final val loss"] == ["3.28000", "n/a"]
    assert rows["p(mean"][-1] == "n/a" and rows["train time s"][-1] == "n/a"
    assert rows["peak alloc MiB"] == ["n/a"]


@pytest.mark.parametrize("loss", [3.2787, 3.28, 3.2813])  # below, at and above the target
def test_identical_losses_have_no_p_value_and_no_warning(tmp_path, loss):
    runs = [sm.parse_log(write(tmp_path, f"r{i}.txt", make_log(final_loss=loss))) for i in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's t-test on zero variance warns; the std-0 case must not reach it
        rows = summary_lines(sm.summarize(runs, 3.28))
    assert rows["n runs"] == ["3"] and rows["final val loss"] == [f"{loss:.5f}", "0.00000"]
    assert rows["p(mean"][-1] == "n/a"


def test_bad_logs_are_skipped_and_excluded(tmp_path):
    write(tmp_path, "good1.txt", make_log(final_loss=3.27))
    write(tmp_path, "good2.txt", make_log(final_loss=3.29))
    write(tmp_path, "cut.txt", make_log(final_loss=1.0, cut_at=12))
    write(tmp_path, "nosteps.txt", PREAMBLE)
    write(tmp_path, "twice.txt", make_log(final_loss=1.0) + make_log(final_loss=1.0, preamble=""))
    write(tmp_path, "mixed_t.txt", make_log(final_loss=1.0).replace("step:20/20 val", "step:20/30 val"))
    write(tmp_path, "longer.txt", make_log(total=30, final_loss=1.0))
    (tmp_path / "dir.txt").mkdir()  # unreadable as a file
    runs = [sm.parse_log(p) for p in sorted(tmp_path.glob("*.txt"))]
    reasons = {r.run_id: r.error for r in runs}
    assert reasons["cut"].startswith("cut off") and "last step 12" in reasons["cut"]
    assert reasons["nosteps"] == "malformed: no step lines"
    assert reasons["twice"].startswith("malformed: steps not monotone")
    assert reasons["mixed_t"].startswith("malformed: inconsistent total steps")
    assert reasons["dir"].startswith("unreadable")
    assert reasons["longer"] is None and reasons["good1"] is None

    text = sm.summarize(runs, 3.28)
    rows = summary_lines(text)
    assert rows["n runs"] == ["2"]
    assert rows["final val loss"] == ["3.28000", f"{np.std([3.27, 3.29], ddof=1):.5f}"]
    skipped = text.split("skipped (6):")[1]
    for name in ("cut", "nosteps", "twice", "mixed_t", "dir"):
        assert f"  {name}: {reasons[name]}" in skipped
    assert "longer: T=30 differs from the most common T=20" in skipped
    per_run = text.split("skipped")[0]
    assert "good1" in per_run and "cut" not in per_run and "longer" not in per_run


def test_empty_folder_exits_1(tmp_path, capsys):
    assert sm.main([str(tmp_path)]) == 1
    assert "no *.txt logs" in capsys.readouterr().err
    assert sm.main([str(tmp_path / "missing")]) == 1


def test_all_bad_folder_exits_1(tmp_path, capsys):
    write(tmp_path, "cut.txt", make_log(cut_at=3))
    write(tmp_path, "nosteps.txt", PREAMBLE)
    assert sm.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "no complete run" in err and "cut: cut off" in err and "nosteps: malformed" in err
    assert not (tmp_path / "summary.png").exists()


def test_main_writes_png_only_when_asked(tmp_path, capsys):
    write(tmp_path, "a.txt", make_log(final_loss=3.279))
    write(tmp_path, "b.txt", make_log(final_loss=3.281, ms=240))
    write(tmp_path, "c.txt", make_log(cut_at=7))  # neither averaged nor drawn
    before = sorted(tmp_path.iterdir())
    assert sm.main([str(tmp_path)]) == 0
    assert sorted(tmp_path.iterdir()) == before and "wrote" not in capsys.readouterr().err  # no default PNG
    assert sm.main([str(tmp_path), "--png", str(tmp_path / "summary.png")]) == 0
    png = (tmp_path / "summary.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    import matplotlib.image
    img = matplotlib.image.imread(tmp_path / "summary.png")
    assert img.ndim == 3 and img.shape[1] > img.shape[0]  # two subplots side by side


def test_png_in_a_missing_folder_is_refused(tmp_path, capsys):
    write(tmp_path, "a.txt", make_log(final_loss=3.279))
    png = tmp_path / "missing" / "dir" / "x.png"
    assert sm.main([str(tmp_path), "--png", str(png)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "missing/dir does not exist" in err
    assert not (tmp_path / "missing").exists()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_png_tracked_by_git_is_refused_unless_forced(tmp_path, capsys):
    write(tmp_path, "a.txt", make_log(final_loss=3.279))
    repo = tmp_path / "repo"
    tracked = write(repo, "summary.png", "committed plot")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "summary.png"], cwd=repo, check=True)
    assert sm.main([str(tmp_path), "--png", str(tracked)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "tracked by git" in err and "--force" in err
    assert tracked.read_text() == "committed plot"
    assert sm.main([str(tmp_path), "--png", str(repo / "new.png")]) == 0  # untracked, in the same repository
    assert sm.main([str(tmp_path), "--png", str(tracked), "--force"]) == 0
    assert tracked.read_bytes()[:4] == b"\x89PNG"


def test_png_counts_as_untracked_outside_a_repository_or_without_git(tmp_path, monkeypatch):
    png = write(tmp_path, "x.png", "")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no repository above tmp_path counts
    assert not sm.tracked_by_git(png)
    monkeypatch.setenv("PATH", str(tmp_path))  # no git to run
    assert not sm.tracked_by_git(png) and sm.png_refusal(png, force=False) is None


def test_markdown(tmp_path, capsys):
    write(tmp_path, "a.txt", make_log(final_loss=3.279))
    write(tmp_path, "b.txt", make_log(final_loss=3.281))
    write(tmp_path, "c.txt", make_log(cut_at=7))
    assert sm.main([str(tmp_path), "--markdown", "--target", "3.3"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "| metric | mean | std |" in lines and "|---|---:|---:|" in lines
    assert "| final val loss | 3.28000 | 0.00141 |" in lines
    assert any(line.startswith("| p(mean < 3.3) | ") for line in lines)
    assert "| run | val loss | train time s | ms/step | peak MiB |" in lines
    assert "| a | 3.2790 | 4.72 | 236.00 | 38912 |" in lines
    assert any(line.startswith("- c: cut off") for line in lines)


def test_cli(tmp_path):
    write(tmp_path, "a.txt", make_log(final_loss=3.279))
    write(tmp_path, "b.txt", make_log(final_loss=3.277))
    res = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--png", str(tmp_path / "p.png")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()  # a group header first: synthetic logs without the header, one group
    assert lines[0] == "group 1: code unknown, world size ?; 2 logs"
    assert lines[2] == "summary: 2 complete runs of 20 steps, target val loss 3.28"
    assert (tmp_path / "p.png").exists()


# --- grouping: logs with the header train_gpt.py writes (source, rule, environment report, rule) -------------

RULE = "=" * 100
SOURCE_V1 = 'import torch\nprint0(f"step:{step}/{T} val_loss:{val_loss:.4f} train_time:{t:.0f}ms step_avg:{a}ms")\n'
SOURCE_V2 = SOURCE_V1 + "# a changed line\n"
HPARAMS = dict(train_files="data/synthetic/fineweb_train_*.bin", num_iterations=20, seed=0, tag="",
               checkpoint_every=0, checkpoint_dir="checkpoints", resume="", profile_at=0, preset="")


def header(source=SOURCE_V1, world_size=1, resumed_at=None, **hparams):
    """Parts 1-4 of a log: the source, a rule, the environment report, a rule; then "resumed from" if resumed."""
    env = ["Python 3.12.3 (main, Aug 31 2026, 10:18:26) [GCC 13.3.0]", "PyTorch 2.13.0+cpu, CUDA None",
           f"world_size {world_size}, device cpu", "nvidia-smi: not available"]
    env += [f"{name} = {value!r}" for name, value in {**HPARAMS, **hparams}.items()]
    resumed = [f"resumed from {hparams['resume']} at step {resumed_at}"] if resumed_at is not None else []
    return "\n".join([source, RULE, *env, RULE, *resumed])


def sections(text):
    """The output split at its group headers: [(header line, section text)]."""
    return [(part.splitlines()[0], part) for part in re.split(r"^(?=group \d+: )", text, flags=re.M) if part]


def summarize_folder(folder):
    return sm.summarize([sm.parse_log(p, folder) for p in sorted(folder.rglob("*.txt"))], 3.28)


def test_logs_in_subfolders_are_found_and_non_logs_ignored(tmp_path, capsys):
    write(tmp_path / "round1", "a.txt", make_log(final_loss=3.279, preamble=header()))
    write(tmp_path / "round2" / "x1", "b.txt", make_log(final_loss=3.281, preamble=header()))
    write(tmp_path, "bench.txt", "matmul 4096^3: 0.21 ms, 650 TFLOP/s\n")  # a benchmark's output, not a log
    write(tmp_path / "round1", "a.profile.tsv", "1.0\t0.0\t1\tforward_backward\n")
    assert sm.main([str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "ignored, not logs (1): bench.txt" in err
    assert len(sections(out)) == 1 and summary_lines(out)["n runs"] == ["2"]
    assert "\nround1/a " in out and "\nround2/x1/b " in out
    assert not (tmp_path / "summary.png").exists()


def test_code_versions_are_grouped_apart_and_never_pooled(tmp_path):
    for i, loss in enumerate([3.27, 3.28]):
        write(tmp_path, f"v1_{i}.txt", make_log(final_loss=loss, preamble=header(SOURCE_V1)))
    for i, loss in enumerate([3.30, 3.32]):
        write(tmp_path, f"v2_{i}.txt", make_log(final_loss=loss, preamble=header(SOURCE_V2)))
    text = summarize_folder(tmp_path)
    # The code is the short sha256 of part 1 exactly as logged: the source and the newline print() adds.
    codes = {f"code {hashlib.sha256((src + chr(10)).encode()).hexdigest()[:10]}" for src in (SOURCE_V1, SOURCE_V2)}
    found = sections(text)
    assert len(found) == 2 and {h.split(": ")[1].split(",")[0] for h, _ in found} == codes
    means = sorted(summary_lines(body)["final val loss"][0] for _, body in found)
    assert means == ["3.27500", "3.31000"]
    assert "3.29500" not in text  # the mean over both versions is printed nowhere
    assert all(("v1_0" in body) != ("v2_0" in body) for _, body in found)


def test_world_sizes_are_grouped_apart(tmp_path):
    write(tmp_path, "one.txt", make_log(final_loss=3.27, ms=900, preamble=header(world_size=1)))
    write(tmp_path, "two.txt", make_log(final_loss=3.29, ms=460, preamble=header(world_size=2)))
    found = sections(summarize_folder(tmp_path))
    assert [h for h, _ in found] == [f"group 1: code {sm.parse_log(tmp_path / 'one.txt').code}, world size 1; 1 log",
                                     f"group 2: code {sm.parse_log(tmp_path / 'two.txt').code}, world size 2; 1 log"]
    assert [summary_lines(body)["ms/step"] for _, body in found] == [["900.00"], ["460.00"]]


def test_resumed_runs_are_marked_and_not_pooled(tmp_path):
    write(tmp_path, "a.txt", make_log(final_loss=3.27, preamble=header()))
    write(tmp_path, "b.txt", make_log(final_loss=3.29, preamble=header()))
    for name, loss, ckpt in (("r1", 3.5, "ck/x/step_000010.pt"), ("r2", 3.52, "ck/y/step_000010.pt")):
        resumed = header(resume=ckpt, resumed_at=10)
        write(tmp_path, f"{name}.txt", make_log(final_loss=loss, start=10, preamble=resumed))
    runs = [sm.parse_log(p) for p in sorted(tmp_path.glob("*.txt"))]
    assert [r.resumed_at for r in runs] == [None, None, 10, 10]
    found = sections(sm.summarize(runs, 3.28))
    assert len(found) == 2  # the two resumed runs differ only in their checkpoint path: pooled with each other
    (plain_header, plain), (resumed_header, resumed) = found
    assert "resumed" not in plain_header and summary_lines(plain)["final val loss"][0] == "3.28000"
    assert resumed_header.endswith(", resumed; 2 logs") and summary_lines(resumed)["n runs"] == ["2"]
    assert "\nr1 (resumed at step 10) " in resumed and "r1" not in plain
    fig = sm.draw(runs, 3.28)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert len(labels) == 2 and "resumed" in labels[1] and "resumed" not in labels[0]
    styles = {line.get_linestyle() for line in fig.axes[0].get_lines() if len(line.get_xdata()) > 2}
    assert styles == {"-", ":"}  # the resumed group is dotted
    plt_close(fig)


def test_hyperparameters_split_groups_but_bookkeeping_does_not(tmp_path):
    write(tmp_path, "a.txt", make_log(final_loss=3.27, preamble=header(tag="run_a")))
    write(tmp_path, "b.txt", make_log(final_loss=3.29, preamble=header(
        tag="run_b", checkpoint_every=5, checkpoint_dir="/tmp/ck", profile_at=3)))
    write(tmp_path, "c.txt", make_log(final_loss=3.40, preamble=header(seed=1)))
    found = sections(summarize_folder(tmp_path))
    assert len(found) == 2
    assert summary_lines(found[0][1])["n runs"] == ["2"] and summary_lines(found[1][1])["n runs"] == ["1"]
    # Each header says what tells its group apart, and only that.
    assert found[0][1].splitlines()[1] == "  seed = 0" and found[1][1].splitlines()[1] == "  seed = 1"
    assert "tag" not in found[0][1] and "checkpoint" not in found[0][1]


def test_plot_draws_counted_runs_one_entry_per_group(tmp_path):
    write(tmp_path, "v1_a.txt", make_log(final_loss=3.27, preamble=header(SOURCE_V1)))
    write(tmp_path, "v1_b.txt", make_log(final_loss=3.29, preamble=header(SOURCE_V1)))
    write(tmp_path, "v1_cut.txt", make_log(final_loss=1.0, cut_at=12, preamble=header(SOURCE_V1)))  # not drawn
    write(tmp_path, "v2.txt", make_log(final_loss=3.6, ms=300, preamble=header(SOURCE_V2)))
    write(tmp_path, "synthetic.txt", make_log(final_loss=3.9, ms=120))  # no header: group "unknown"
    runs = [sm.parse_log(p) for p in sorted(tmp_path.glob("*.txt"))]
    fig = sm.draw(runs, 3.28)
    ax_loss, ax_time = fig.axes
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert [label.split(":")[0] for label in labels] == ["1", "2", "3"] and "code unknown" in labels[2]
    target = [line for line in ax_loss.get_lines() if line.get_linestyle() == "--"]
    assert len(target) == 1 and set(target[0].get_ydata()) == {3.28}
    curves = [line for line in ax_loss.get_lines() if line.get_linestyle() != "--"]
    assert len(curves) == 4 and len(ax_time.get_lines()) == 4  # the cut-off run is not drawn
    assert sorted(Counter(c.get_color() for c in curves).values()) == [1, 1, 2]  # a colour per group
    lo, hi = ax_loss.get_ylim()
    for c in curves:
        assert all(lo < y < hi for y in c.get_ydata()[1:])  # every evaluation after the first is in the frame
    assert all(c.get_ydata()[0] > hi for c in curves) and "step-0 losses above" in ax_loss.get_title()
    assert ax_time.get_ylim() == (0, 600)  # 2x the slowest counted run's 300 ms step
    plt_close(fig)


def test_plot_keeps_the_groups_with_most_runs(tmp_path, capsys):
    # Ten groups (seeds 0-9): seeds 0 and 1 have one run each, the others two, so groups 1 and 2 are left out.
    for seed in range(10):
        for i in range(1 + (seed > 1)):
            write(tmp_path, f"s{seed}_{i}.txt", make_log(final_loss=3.27 + i / 100, preamble=header(seed=seed)))
    runs = [sm.parse_log(p) for p in sorted(tmp_path.glob("*.txt"))]
    fig = sm.draw(runs, 3.28)
    legend = fig.legends[0]
    assert [t.get_text().split(":")[0] for t in legend.get_texts()] == [str(n) for n in range(3, 11)]
    assert legend.get_title().get_text().startswith("2 groups with fewer runs left out of the plot")
    curves = [line for line in fig.axes[0].get_lines() if line.get_linestyle() != "--"]
    assert len(curves) == 16 and len({c.get_color() for c in curves}) == 8  # no colour shared by two groups
    plt_close(fig)
    assert sm.main([str(tmp_path), "--png", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    assert len(sections(out)) == 10  # the text still reports every group
    assert out.splitlines()[-1] == "plot: 2 groups with fewer runs left out of the plot: 1, 2"


def test_png_goes_to_the_png_path(tmp_path, capsys):
    write(tmp_path / "logs", "a.txt", make_log(final_loss=3.279, preamble=header()))
    png = tmp_path / "plots" / "mine.png"
    png.parent.mkdir()
    assert sm.main([str(tmp_path / "logs"), "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {png}" in capsys.readouterr().err
    assert not (tmp_path / "logs" / "summary.png").exists()


def test_import_leaves_scipy_and_matplotlib_unloaded():
    code = (f"import sys; sys.path.insert(0, {str(SCRIPT.parent)!r}); import summarize; "
            "assert 'scipy' not in sys.modules and 'matplotlib' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def plt_close(fig):
    import matplotlib.pyplot as plt
    plt.close(fig)
