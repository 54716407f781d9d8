"""report.py beyond test_report.py's runs: files that would hang or crash it, flags without effect, and the figure
of accuracy against a setting (--against, --series)."""
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image

import report
from test_report import call_report, cpu_config, edit_json, folders_of, read_rows, write_run


def test_what_would_hang_or_crash_the_report_is_skipped_in_a_line(tmp_path):
    """A FIFO hung the report (open() waits for a writer); a 400-digit integer was an OverflowError; 1e308 and text
    were accuracies. Each run is skipped, its file and why in a line."""
    spoilt = {"1e308": {"best_accuracy": 1e308}, "huge": {"last_epoch": 10 ** 400},
              "text": {"last_accuracy": "19.6"}, "true": {"teacher_accuracy": True}}
    for name, change in spoilt.items():
        write_run(tmp_path / name, cpu_config(), 50.0)
        edit_json(tmp_path / name / "summary.json", **change)
    for file in ("config.json", "log.csv", "summary.json"):
        write_run(tmp_path / f"fifo-{file}", cpu_config(), 50.0)
        (tmp_path / f"fifo-{file}" / file).unlink()
        os.mkfifo(tmp_path / f"fifo-{file}" / file)
    write_run(tmp_path / "over", cpu_config(), 50.0, test_acc=101)
    write_run(tmp_path / "good", cpu_config(), 50.0)
    result = subprocess.run([sys.executable, "report.py", str(tmp_path), "--no-plot"], cwd=Path(__file__).parent,
                            capture_output=True, text=True, timeout=60)  # a hang: TimeoutExpired
    assert result.returncode == 0 and result.stderr.splitlines() == [f"skipped {tmp_path}/{line}" for line in (
        "1e308/summary.json: best_accuracy is not a percentage: 1e+308", *(
            f"fifo-{file}/{file}: not a regular file" for file in ("config.json", "log.csv", "summary.json")),
        "huge/summary.json: last_epoch is not a number: 100000000000000000...0000000000000000000",
        "over/log.csv: test_acc in row 1 is not a percentage: '101'",
        "text/summary.json: last_accuracy is not a percentage: '19.6'",
        "true/summary.json: teacher_accuracy is not a percentage: True")]


def test_a_flag_without_effect_splits_no_row(tmp_path):
    """--hidden-dim under --projector linear changes nothing (cli.inert): such runs share a row, with one recorded as
    train.py records it (None); under mlp it is an experiment of its own. KD shows no projector flags."""
    linear = cpu_config("--teacher", "resnet8", "--projector", "linear")
    configs = {"a": linear, "b": dict(linear, seed=1, hidden_dim=512), "c": dict(linear, seed=2, hidden_dim=None),
               "mlp": cpu_config("--teacher", "resnet8", "--hidden-dim", "512"),
               "kd": dict(cpu_config("--teacher", "resnet8", "--method", "kd"), projector="linear", alpha=2.0)}
    for i, (folder, config) in enumerate(configs.items()):
        write_run(tmp_path / folder, config, 60.0 + i)
    code, _, stderr = call_report(tmp_path, "--no-plot")
    assert code == 0, stderr
    assert {row["setting"]: folders_of(row, tmp_path) for row in read_rows(tmp_path / "report.csv")} == {
        "--projector linear": {"a", "b", "c"}, "--hidden-dim 512": {"mlp"}, "": {"kd"}}


def test_accuracy_against_a_setting_is_a_line_per_series(tmp_path, monkeypatch):
    """--against alpha --series LABEL DIR...: a line per series through each row's mean (error bars its std, a dot per
    run), at the rows' alpha as recorded: the matched series' weights differ per alpha, and it is still one line."""
    for alpha, seed, accuracy in ((2.0, 0, 20.0), (2.0, 1, 22.0), (4.0, 0, 15.0), (4.0, 1, 16.0)):
        flags = ("--teacher", "resnet8", "--alpha", str(alpha), "--seed", str(seed))
        write_run(tmp_path / f"fixed/a{alpha}-{seed}", cpu_config(*flags), accuracy)
        write_run(tmp_path / f"matched/a{alpha}-{seed}", cpu_config(*flags, "--feat-weight", str(alpha / 8)),
                  accuracy + 5)
    figures, real = [], report.plot_against
    monkeypatch.setattr(report, "plot_against", lambda *args: figures.append(real(*args)))
    code, out, stderr = call_report(tmp_path, "--out", tmp_path / "out", "--against", "alpha", "--series",
                                    "weight 2.0", tmp_path / "fixed", "--series", "matched", tmp_path / "matched")
    assert code == 0 and f"{tmp_path / 'out' / 'against-alpha.png'}" in out, stderr
    lines = {c.get_label(): (list(c.lines[0].get_xdata()), list(c.lines[0].get_ydata())) for c in
             figures[0].axes[0].containers}
    assert lines == {"weight 2.0": ([2.0, 4.0], [21.0, 15.5]), "matched": ([2.0, 4.0], [26.0, 20.5])}
    assert matplotlib.image.imread(tmp_path / "out" / "against-alpha.png").shape[2] == 4  # a PNG was written
    for argv in (["--against", "alpha"], ["--series", "x", tmp_path], ["--against", "alpha", "--series", "x"]):
        assert call_report(tmp_path, *argv)[0] == 2  # the two go together, a series has folders
    code, _, stderr = call_report(tmp_path, "--against", "alpha", "--series", "none", tmp_path / "out")
    assert code == "error: --series none: no finished run, or one without alpha in its record"
