"""Tests for tools/summarize.py on synthetic logs written to tmp_path.

Pins: whole-line parsing that ignores look-alike f-strings in the embedded source preamble; the parsed
values (steps, losses, train times, peak memory, step times); mean/std/one-sided p-value against numbers
computed here with numpy/scipy (seed record: 32 runs, mean 3.27869, p 0.0001); cut-off, malformed,
unreadable and different-T logs listed as skipped and excluded from the mean; exit code 1 for an empty
or all-bad folder; a valid PNG; Markdown output; the CLI entry point.

Run: python -m pytest tests/test_summarize.py -q
"""
import importlib.util
import subprocess
import sys
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


def make_log(total=20, final_loss=3.28, ms=236, val_every=5, peak=38912, cut_at=None, preamble=PREAMBLE):
    """A log as train_gpt.py writes it; cut_at ends it at that step (a crashed run: no final val line)."""
    lines = [preamble.rstrip("\n"), "warmup_time:71.2s", "fp8 head: off", "log: records/test/run.txt"]
    for step in range(total + 1):
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


def test_main_writes_png(tmp_path, capsys):
    write(tmp_path, "a.txt", make_log(final_loss=3.279))
    write(tmp_path, "b.txt", make_log(final_loss=3.281, ms=240))
    write(tmp_path, "c.txt", make_log(cut_at=7))  # drawn dashed, not averaged
    assert sm.main([str(tmp_path)]) == 0
    png = (tmp_path / "summary.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    import matplotlib.image
    img = matplotlib.image.imread(tmp_path / "summary.png")
    assert img.ndim == 3 and img.shape[1] > img.shape[0]  # two subplots side by side
    assert sm.main([str(tmp_path), "--png", str(tmp_path / "other.png")]) == 0
    assert (tmp_path / "other.png").read_bytes()[:4] == b"\x89PNG"


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
    assert res.stdout.startswith("summary: 2 complete runs of 20 steps, target val loss 3.28")
    assert (tmp_path / "p.png").exists()
