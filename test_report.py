"""report.py on real runs of train.py (resnet8, fake data, 2 epochs): grouping, statistics, bad input, outputs.

Real-data reports are checked on run folders written here without training (write_run)."""
import contextlib
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import matplotlib.container
import pytest

import data
import report
import runs
import train

TINY = ["--student", "resnet8", "--epochs", "2", "--batch-size", "32", "--dataset", "fake", "--device", "cpu"]
# which run folders must share a row (the old-format copy is made from alone/seed1 in the fixture)
GROUPS = {"alone": {"alone/seed0", "alone/seed1", "alone-old/seed2"}, "alone-lr": {"alone-lr/seed0"},
          "kd": {"kd/seed0", "kd/seed1"}, "srd": {"srd/seed0", "srd/seed1"}}
MD, CSV, PNG = "report.md", "report.csv", "curves.png"


def edit_json(path, **changes):
    """path's JSON object with changes: each a value, or a function of the object as it was."""
    content = json.loads(path.read_text())
    path.write_text(json.dumps({**content, **{k: v(content) if callable(v) else v for k, v in changes.items()}}))


def call_report(*argv):
    """report.main in this process -> (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            report.main([str(a) for a in argv])
            code = 0
        except SystemExit as exit_info:
            code = exit_info.code
    return code, out.getvalue(), err.getvalue()


def setting(config):
    return " ".join(report.flags(config))


def cpu_config(*argv):
    """What train.py records for a resnet8 run with these flags on the CPU."""
    return train.resolve_config(train.parse_args(["--student", "resnet8", *argv, "--device", "cpu"]))


def write_run(folder, config, accuracy, epochs=1, columns=runs.LOG_COLUMNS, **cells):
    """A finished run folder written without training: config.json, a log.csv of `epochs` rows (test_acc = accuracy,
    a cell given in `cells` as given, the projector's spectrum empty as without one, every other 1), summary.json."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    values = {**{column: 1 for column in columns}, **{column: "" for column in report.SPECTRUM_COLUMNS},
              "test_acc": accuracy, **cells}
    (folder / "log.csv").write_text("\n".join([",".join(columns), *(",".join(
        str(epoch if column == "epoch" else values[column]) for column in columns) for epoch in range(1, epochs + 1))])
        + "\n")
    (folder / "summary.json").write_text(json.dumps(
        {"last_accuracy": accuracy, "best_accuracy": accuracy + 1.0, "last_epoch": epochs, "teacher_accuracy": None,
         "wall_time_s": 1.0}))


def figure_of(*roots):
    """report.plot's figures of every run below roots, as one: axes [accuracy, loss] (figure.png), then [count,
    effective rank] (spectrum.png) where there is a spectrum; and the groups."""
    groups = report.group_runs(report.find_runs(roots)[0])
    curves, spectrum = report.plot(groups, roots[0] / "figure.png", roots[0] / "spectrum.png")
    assert (spectrum is None) != (roots[0] / "spectrum.png").exists()
    return types.SimpleNamespace(axes=[*curves.axes, *(spectrum.axes if spectrum else [])],
                                 _suptitle=curves._suptitle), groups  # noqa: SLF001 (no public getter)


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def folders_of(row, root):
    return {Path(folder).relative_to(root).as_posix() for folder in row["folders"].split()}


@pytest.fixture(scope="module")
def clean(tmp_path_factory, one_torch_thread):
    """Seven runs by train.py (resnet8 alone, seeds 0 and 1; alone with --lr 0.1; KD and SRD (mlp projector) from the
    first, seeds 0 and 1), an older run of the first experiment, and the report over them."""
    root = tmp_path_factory.mktemp("runs")
    datasets = (data.fake_cifar100(64, seed=0), data.fake_cifar100(64, seed=1))

    def make(folder, *flags):
        train.run(train.resolve_config(train.parse_args([*TINY, *flags])), root / folder, datasets=datasets)

    for seed in ("0", "1"):
        make(f"alone/seed{seed}", "--seed", seed)
    make("alone-lr/seed0", "--lr", "0.1")
    # the teacher: the better of the two, so that its accuracy is not a zero any wrong reading could give
    teacher = max(("alone/seed0", "alone/seed1"),
                  key=lambda f: json.loads((root / f / "summary.json").read_text())["last_accuracy"])
    for method in ("kd", "srd"):
        for seed in ("0", "1"):
            make(f"{method}/seed{seed}", "--teacher", "resnet8", "--teacher-ckpt", str(root / teacher / "last.pt"),
                 "--method", method, "--seed", seed)
    # the first experiment as an older train.py on a GPU machine recorded it: keys missing (they take their
    # defaults, "precision" among them (fp32), others set that do not change the experiment; its
    # accuracies moved so that no two runs tie
    shutil.copytree(root / "alone/seed1", root / "alone-old/seed2")
    config = json.loads((root / "alone-old/seed2/config.json").read_text())
    for key in ("hidden_dim", "alpha", "precision", "train_subset", "device_name", "capability"):
        del config[key]
    config.update(seed=2, device="cuda:0", data_dir="/elsewhere", compile=True, channels_last=True, fused_sgd=True)
    (root / "alone-old/seed2/config.json").write_text(json.dumps(config))
    edit_json(root / "alone-old/seed2/summary.json", last_accuracy=lambda s: s["last_accuracy"] + 3.125,
              best_accuracy=lambda s: s["best_accuracy"] + 4.6875)
    edit_json(root / "srd/seed1/summary.json", last_accuracy=lambda s: s["last_accuracy"] + 0.5,  # apart from seed
              best_accuracy=lambda s: s["best_accuracy"] + 0.5)  # 0's: 64 images score in steps of 1.5625, never 0.5
    edit_json(root / "alone/seed0/config.json", teacher_cache=True)  # a newer flag, bit-identical results
    # last and best apart: one run whose best epoch was the first, 12.5 points above its last (moved off seed 0's)
    edit_json(root / "kd/seed1/summary.json", best_epoch=1, last_accuracy=lambda s: s["last_accuracy"] + 0.5,
              best_accuracy=lambda s: s["last_accuracy"] + 13.0)
    code, stdout, stderr = call_report(root)
    assert code == 0, stderr
    return root, stdout, stderr, teacher


BROKEN = {  # name -> (file, how it is spoilt)
    "summary_not_json": ("summary.json", lambda text: "{not json"),
    "summary_truncated": ("summary.json", lambda text: text[:len(text) // 2]),
    "summary_not_an_object": ("summary.json", lambda text: "[72.5, 73.0]"),
    "summary_missing_key": ("summary.json", lambda text: text.replace('"best_accuracy"', '"best_accuracy_was"')),
    "summary_non_numeric": ("summary.json", lambda text: json.dumps({**json.loads(text), "last_accuracy": "n/a"})),
    "log_non_numeric": ("log.csv", lambda text: text.replace("\n1,", "\nabc,", 1)),
    "log_row_cut": ("log.csv", lambda text: text.rstrip("\r\n")[:text.rstrip("\r\n").rindex("\n")] + "\n2,0.05,4.6\n"),
    "log_row_missing": ("log.csv", lambda text: "\n".join(text.splitlines()[:-1]) + "\n"),
    "log_empty": ("log.csv", lambda text: ""),
    "config_truncated": ("config.json", lambda text: text[:20]),
    "config_epochs_text": ("config.json", lambda text: json.dumps({**json.loads(text), "epochs": "abc"})),
}


@pytest.fixture(scope="module")
def messy(clean, tmp_path_factory):
    """The same runs plus broken and unfinished copies of alone/seed0 (with new seeds: counted, they would change
    the first row), reported into a separate folder without the figure."""
    root = tmp_path_factory.mktemp("messy")
    shutil.copytree(clean[0], root, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.pt", "*report.*", "*.png"))
    source = clean[0] / "alone/seed0"
    for i, (name, (spoilt, spoil)) in enumerate(BROKEN.items()):
        (root / name).mkdir()
        for file in ("config.json", "summary.json", "log.csv"):
            shutil.copy(source / file, root / name)
        edit_json(root / name / "config.json", seed=100 + i)
        (root / name / spoilt).write_text(spoil((root / name / spoilt).read_text()))
    (root / "unfinished_partial").mkdir()
    shutil.copy(source / "config.json", root / "unfinished_partial")
    (root / "unfinished_partial/log.csv").write_text("".join((source / "log.csv").read_text().splitlines(True)[:2]))
    (root / "unfinished_started").mkdir()
    shutil.copy(source / "config.json", root / "unfinished_started")
    out = tmp_path_factory.mktemp("messy_report")
    code, stdout, stderr = call_report(root, "--out", out, "--no-plot")
    assert code == 0, stderr
    return root, out, stdout, stderr


def test_runs_differing_only_in_seed_and_speed_keys_share_a_row(clean):
    root = clean[0]
    rows = read_rows(root / CSV)
    assert sorted(map(sorted, (folders_of(row, root) for row in rows))) == sorted(map(sorted, GROUPS.values()))
    by_name = {name: row for name in GROUPS for row in rows if folders_of(row, root) == GROUPS[name]}
    assert by_name["alone"]["seeds"] == "0 1 2" and by_name["alone"]["method"] == "none"
    assert "--lr 0.1" in by_name["alone-lr"]["setting"] and "--lr" not in by_name["alone"]["setting"]
    assert by_name["kd"]["teacher"] == "resnet8" and by_name["kd"]["method"] == "kd"


def test_means_and_sample_stds_match_numpy_on_the_summaries(clean):
    root = clean[0]
    table = (root / MD).read_text()
    for row in read_rows(root / CSV):
        summaries = [json.loads((root / f / "summary.json").read_text()) for f in sorted(folders_of(row, root))]
        cells = []
        for which in ("last", "best"):
            values = np.array([s[f"{which}_accuracy"] for s in summaries])
            assert float(row[f"{which}_acc_mean"]) == pytest.approx(values.mean(), abs=1e-9)
            if len(values) > 1:
                assert values.std(ddof=1) > 0  # the fixture's runs do not tie, so a wrong formula cannot pass
                assert float(row[f"{which}_acc_std"]) == pytest.approx(values.std(ddof=1), abs=1e-9)
                cells.append(f"{values.mean():.2f} ± {values.std(ddof=1):.2f}")
            else:
                assert row[f"{which}_acc_std"] == ""
                cells.append(f"{values.mean():.2f} ± –")
        assert float(row["wall_time_s"]) == pytest.approx(np.mean([s["wall_time_s"] for s in summaries]))
        line = next(line for line in table.splitlines() if f"| {row['setting']} | {row['runs']} |" in line
                    and f"| {row['method']} |" in line)
        assert f"| {cells[0]} | {cells[1]} |" in line
        teachers = [s["teacher_accuracy"] for s in summaries if s["teacher_accuracy"] is not None]
        assert (row["teacher_acc"] == "") if not teachers else float(row["teacher_acc"]) == pytest.approx(
            np.mean(teachers))
    assert "ddof=1" in table and "RepDistiller" in table and "mdistiller" in table


def test_last_and_best_epoch_are_kept_apart(clean):
    root = clean[0]
    kd = next(row for row in read_rows(root / CSV) if folders_of(row, root) == GROUPS["kd"])
    last = [json.loads((root / f / "summary.json").read_text())["last_accuracy"] for f in sorted(GROUPS["kd"])]
    best = [json.loads((root / f / "summary.json").read_text())["best_accuracy"] for f in sorted(GROUPS["kd"])]
    assert float(kd["last_acc_mean"]) == pytest.approx(np.mean(last))
    assert float(kd["best_acc_mean"]) == pytest.approx(np.mean(best))
    assert float(kd["best_acc_mean"]) - float(kd["last_acc_mean"]) > 6  # the edited run's 12.5 over two runs


def test_teacher_accuracy_is_the_teachers_own(clean):
    root = clean[0]
    kd = next(row for row in read_rows(root / CSV) if folders_of(row, root) == GROUPS["kd"])
    teacher = json.loads((root / clean[3] / "summary.json").read_text())  # kd's --teacher-ckpt
    assert teacher["last_accuracy"] > 0 and float(kd["teacher_acc"]) == pytest.approx(teacher["last_accuracy"])


def test_curves_and_spectrum_pngs_are_written(clean):
    for name in (PNG, "spectrum.png", "accuracy.png"):  # the runs include srd, which has a projector
        png = (clean[0] / name).read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000, name


def test_accuracy_png_has_a_dot_per_run_and_each_rows_mean_and_std(clean, tmp_path):
    groups = report.group_runs(report.find_runs([clean[0]])[0])
    axes = report.plot_rows(groups, [report.summarise(g) for g in groups], tmp_path / "accuracy.png").axes[0]
    dots = [line for line in axes.lines if line.get_marker() == "o"]
    bars = [c for c in axes.containers if isinstance(c, matplotlib.container.ErrorbarContainer)]
    labels = [label.get_text() for label in axes.get_yticklabels()]
    assert len(dots) == len(bars) == len(labels) == len(groups) == 4
    for i, (runs, line, bar, label) in enumerate(zip(groups, dots, bars, labels)):
        accuracies = [json.loads((r["folder"] / "summary.json").read_text())["last_accuracy"] for r in runs]
        assert sorted(line.get_xdata()) == sorted(accuracies) and set(line.get_ydata()) == {-i}
        low, high = bar.lines[2][0].get_segments()[0][:, 0]
        assert (bar.lines[0].get_xdata()[0], bar.lines[0].get_ydata()[0]) == (pytest.approx(np.mean(accuracies)), -i)
        assert (high - low) / 2 == pytest.approx(np.std(accuracies, ddof=1) if len(runs) > 1 else 0)
        assert label.startswith(report.name(runs[0]["config"])) and label.endswith(f" (n={len(runs)})")
        assert ("--lr 0.1" in label) == (runs[0]["config"]["lr"] == 0.1)  # each row named by its own runs


def test_broken_and_unfinished_runs_hide_nothing(clean, messy):
    root, out, stdout, _ = messy
    clean_rows, messy_rows = read_rows(clean[0] / CSV), read_rows(out / CSV)
    assert [{**r, "folders": folders_of(r, clean[0])} for r in clean_rows] == \
           [{**r, "folders": folders_of(r, root)} for r in messy_rows]
    assert not (out / PNG).exists()  # --no-plot
    for listing in (stdout, (out / MD).read_text()):
        assert f"{root / 'unfinished_partial'}: 1 of 2 epochs logged" in listing
        assert f"{root / 'unfinished_started'}: 0 of 2 epochs logged" in listing


@pytest.mark.parametrize("name", BROKEN)
def test_each_broken_file_is_named(name, messy):
    root, out, _, stderr = messy
    assert f"skipped {root / name / BROKEN[name][0]}" in stderr
    skipped = (out / MD).read_text().split("Skipped runs")[1]  # report.md too, under its own heading
    assert f"- {root / name / BROKEN[name][0]}" in skipped


def test_why_a_run_is_skipped_is_said_truly(messy):
    """A config.json whose epochs is text was a traceback that ended the report; a 0-byte log.csv was reported as
    lacking columns: it is empty, which train.py's log never is (it writes the header before the first epoch)."""
    root, _, _, stderr = messy
    epochs = root / "config_epochs_text/config.json"
    assert f"skipped {epochs}: epochs is not a positive whole number: 'abc'\n" in stderr
    assert f"skipped {root / 'log_empty/log.csv'}: empty (no header, no epoch)\n" in stderr


def test_several_folders_are_pooled_into_the_first(clean, tmp_path):
    shutil.copytree(clean[0] / "alone", tmp_path / "a")
    shutil.copytree(clean[0] / "alone-old", tmp_path / "b")
    code, _, stderr = call_report(tmp_path / "a", tmp_path / "b", "--no-plot")
    assert code == 0, stderr
    rows = read_rows(tmp_path / "a" / CSV)
    assert len(rows) == 1 and rows[0]["runs"] == "3" and not (tmp_path / "b" / CSV).exists()


def test_no_runs_or_no_folder_exits_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, "report.py", str(tmp_path)], cwd=Path(__file__).parent,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and result.stderr.count("\n") == 1 and "no finished run" in result.stderr
    code, _, _ = call_report(tmp_path / "nowhere")
    assert code and "nowhere is not a folder" in code


def test_report_does_not_import_torch(clean, tmp_path):
    script = f"import sys, report; report.main([{str(clean[0])!r}, '--out', {str(tmp_path)!r}]); " \
             "assert 'torch' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parent, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("argv", [["--teacher", "resnet8"], ["--teacher", "resnet8", "--method", "kd"], [],
                                  ["--student", "MobileNetV2"], ["--teacher", "resnet8", "--student", "ShuffleV1"]])
def test_defaults_are_train_pys(argv):
    config = train.resolve_config(train.parse_args(["--student", "resnet8", *argv, "--device", "cpu"]))
    defaults = report.recipe_defaults(config)
    assert set(defaults) <= set(config)  # every default is a key train.py records (tf32 among them, false everywhere)
    assert {key: config[key] for key in defaults if key not in report.COLUMNS_OF_THE_TABLE} == \
           {key: value for key, value in defaults.items() if key not in report.COLUMNS_OF_THE_TABLE}
    assert config["tf32"] is defaults["tf32"] is False
    # every key train.py records is known here: either a recipe default, a column, or not part of the experiment
    assert set(config) <= {*defaults, *report.COLUMNS_OF_THE_TABLE, *report.NOT_THE_EXPERIMENT}
    assert setting(config) == ""


def test_the_teacher_is_told_apart_by_its_file_not_its_path(clean):
    recorded = json.loads((clean[0] / "kd/seed0/config.json").read_text())  # as train.py wrote it
    assert set(recorded) <= {*report.recipe_defaults(recorded), *report.COLUMNS_OF_THE_TABLE,
                             *report.NOT_THE_EXPERIMENT, report.TEACHER_IDENTITY}
    assert not any(word in setting(recorded) for word in ("sha256", "teacher-file", "teacher-ckpt"))  # hashed: no path
    moved = dict(recorded, teacher_ckpt="/another/machine/last.pt", teacher_file="/another/machine/last.pt")
    assert report.experiment(moved) == report.experiment(recorded)
    assert report.experiment(dict(recorded, teacher_sha256="0" * 64)) != report.experiment(recorded)
    older = {key: value for key, value in recorded.items() if key not in ("teacher_file", "teacher_sha256")}
    assert report.experiment(dict(older, teacher_ckpt="/elsewhere.pt")) != report.experiment(older)  # path alone
    assert "--teacher-ckpt /elsewhere.pt" in report.flags(dict(older, teacher_ckpt="/elsewhere.pt"))  # said, then


def test_default_milestones_follow_the_epochs():
    """train.py's milestones are 5/8, 6/8 and 7/8 of --epochs: a shorter run with them departs only in --epochs."""
    config = cpu_config("--epochs", "15")
    assert config["milestones"] == report.recipe_defaults(config)["milestones"] == [9, 11, 13]
    assert setting(config) == "--epochs 15"
    assert setting(cpu_config("--epochs", "15", "--milestones", "5", "10")) == "--epochs 15 --milestones 5 10"
    assert setting(cpu_config("--milestones", "150", "180", "210")) == ""


def test_precisions_stay_apart_and_an_old_run_joins_fp32(tmp_path):
    """bf16, fp16 and fp32 runs make three rows; an older config without "precision" (all on the CPU) joins fp32; the
    GPU's name and capability split nothing; --train-subset is part of the experiment."""
    plain = cpu_config()
    old = {key: value for key, value in plain.items() if key not in ("precision", "device_name", "capability")}
    configs = {"fp32/seed0": plain, "fp32-old/seed1": dict(old, seed=1),
               "bf16/seed0": dict(plain, precision="bf16", device_name="NVIDIA H200", capability="9.0"),
               "bf16/seed1": dict(plain, seed=1, precision="bf16", device_name="NVIDIA A100", capability="8.0"),
               "fp16/seed0": dict(plain, precision="fp16", device_name="Tesla V100-SXM2-16GB", capability="7.0"),
               "subset/seed0": dict(plain, train_subset=10000)}
    for i, (folder, config) in enumerate(configs.items()):
        write_run(tmp_path / folder, config, 60.0 + i)
    code, _, stderr = call_report(tmp_path, "--no-plot")
    assert code == 0, stderr
    assert {row["setting"]: folders_of(row, tmp_path) for row in read_rows(tmp_path / "report.csv")} == {
        "": {"fp32/seed0", "fp32-old/seed1"}, "--precision bf16": {"bf16/seed0", "bf16/seed1"},
        "--precision fp16": {"fp16/seed0"}, "--train-subset 10000": {"subset/seed0"}}


def spectrum_means(folders, column):
    """A column's per-epoch mean over the log.csv files of folders, read here without report.py."""
    return np.mean([[float(row[column]) for row in read_rows(folder / "log.csv")] for folder in folders], axis=0)


def test_projector_spectrum_is_plotted_as_the_logs_means(clean, tmp_path):
    shutil.copytree(clean[0], tmp_path / "runs", ignore=shutil.ignore_patterns("*.pt", "*report.*", "*.png"))
    figure, groups = figure_of(tmp_path / "runs")
    assert (tmp_path / "runs/figure.png").stat().st_size > 10_000 and len(groups) == len(GROUPS)
    assert (tmp_path / "runs/spectrum.png").stat().st_size > 10_000
    accuracy_axes, _, rank_axes = figure.axes  # no count: 64 singular values above 1% in each layer and epoch
    srd_folders = [tmp_path / "runs" / folder for folder in sorted(GROUPS["srd"])]
    counts = {row[f"proj{i}_sv_over_1pct"] for f in srd_folders for row in read_rows(f / "log.csv") for i in (1, 2)}
    assert counts == {"64"}
    # only srd has a projector: 2 linear layers (mlp), a line per layer, none for CE or KD
    assert [line.get_label().split(": ")[1] for line in rank_axes.lines] == [
        "proj1_effective_rank", "proj2_effective_rank"]
    for line in rank_axes.lines:
        assert " srd" in line.get_label()
        assert line.get_ydata() == pytest.approx(spectrum_means(srd_folders, line.get_label().split(": ")[1]))
    ranks = [[float(row["proj1_effective_rank"]) for row in read_rows(f / "log.csv")] for f in srd_folders]
    assert ranks[0] != ranks[1]  # the seeds differ, so only their mean matches
    srd_accuracy = next(line for line in accuracy_axes.lines if " srd" in line.get_label())
    assert srd_accuracy.get_ydata() == pytest.approx(spectrum_means(srd_folders, "test_acc"))


def test_a_linear_projector_and_an_older_log_show_what_they_have(tmp_path):
    """A linear projector logs one layer (proj2_* empty); a log from before the spectrum columns has none. A count of
    singular values the same everywhere (64 in the ablations' figure) is not drawn: it told no group apart."""
    config = dict(cpu_config("--teacher", "resnet8", "--projector", "linear"), dataset="fake")
    for folder, norm, count, effective in (("linear", "bn", 7, 3.5), ("linear-gn", "gn", 6, 3.0)):
        write_run(tmp_path / folder, dict(config, norm=norm), 50.0, epochs=3, proj2_sv_over_1pct="",
                  proj2_effective_rank="", proj1_sv_over_1pct=count, proj1_effective_rank=effective)
    old_columns = runs.LOG_COLUMNS[:runs.LOG_COLUMNS.index("images_per_s") + 1]
    write_run(tmp_path / "old", dict(config, projector="mlp"), 40.0, epochs=2, columns=old_columns)
    figure, groups = figure_of(tmp_path)
    assert [len(group) for group in groups] == [1, 1, 1]  # all read
    _, _, count_axes, rank_axes = figure.axes
    assert [(line.get_label(), list(line.get_ydata())) for line in count_axes.lines] == [
        ("resnet8 -> resnet8 srd on fake --projector linear: proj1_sv_over_1pct", [7, 7, 7]),
        ("resnet8 -> resnet8 srd on fake --norm gn --projector linear: proj1_sv_over_1pct", [6, 6, 6])]
    assert count_axes.get_title() == "projector: singular values above 1% of the largest, mean over seeds"
    assert [text.get_text() for text in count_axes.get_legend().get_texts()] == ["linear layer 1"]
    assert [list(line.get_ydata()) for line in rank_axes.lines] == [[3.5, 3.5, 3.5], [3.0, 3.0, 3.0]]
    shutil.rmtree(tmp_path / "linear-gn")  # one count, 7 throughout: only the effective rank is drawn
    _, _, rank = figure_of(tmp_path)[0].axes
    assert [(rank.get_ylabel(), list(line.get_ydata())) for line in rank.lines] == [("effective_rank", [3.5] * 3)]
    assert set(report.SPECTRUM_COLUMNS) < set(runs.LOG_COLUMNS)  # the names train.py logs


def test_short_curves_have_markers(tmp_path):
    """A one-epoch run is a single point: without a marker it would not be drawn at all."""
    write_run(tmp_path / "one", cpu_config(), 40.0, epochs=1)
    write_run(tmp_path / "long", cpu_config("--lr", "0.1"), 45.0, epochs=report.MARKERS_UP_TO + 1)
    figure, _ = figure_of(tmp_path)
    marked = {line.get_label(): (len(line.get_xdata()), line.get_marker()) for line in figure.axes[0].lines}
    assert marked == {"resnet8 alone (n=1)": (1, "o"), "resnet8 alone --lr 0.1 (n=1)": (21, "None")}
    assert all(line.get_marker() == "o" for line in figure.axes[1].lines if len(line.get_xdata()) == 1)


def test_the_title_says_what_is_plotted_and_what_all_groups_share(clean, tmp_path):
    figure, _ = figure_of(clean[0])
    title = figure._suptitle.get_text()  # noqa: SLF001 (matplotlib has no public getter)
    assert title == ("Test accuracy and training loss per epoch, 4 groups, mean over seeds\n"
                     "all groups: --batch-size 32 --epochs 2")
    write_run(tmp_path / "a", cpu_config(), 40.0)
    write_run(tmp_path / "b", cpu_config("--lr", "0.1"), 41.0)
    figure, _ = figure_of(tmp_path)  # nothing shared: no subtitle
    assert figure._suptitle.get_text() == "Test accuracy and training loss per epoch, 2 groups, mean over seeds"


def test_the_loss_legend_names_only_the_styles_drawn(clean, tmp_path):
    figure, _ = figure_of(clean[0])
    assert [text.get_text() for text in figure.axes[1].get_legend().get_texts()] == ["ce", "feat", "kd"]
    shutil.copytree(clean[0] / "alone", tmp_path / "alone", ignore=shutil.ignore_patterns("*.pt"))
    figure, _ = figure_of(tmp_path)  # cross-entropy alone
    assert [text.get_text() for text in figure.axes[1].get_legend().get_texts()] == ["ce"]
    assert {line.get_linestyle() for line in figure.axes[1].lines} == {"-"}


def test_report_md_names_each_rows_folders(clean):
    root = clean[0]
    folders = (root / MD).read_text().split("Run folders of each row:\n")[1].split("\n\n")[0].splitlines()
    rows = read_rows(root / CSV)
    assert len(folders) == len(rows)
    for line, row in zip(folders, rows):
        assert line == f"- {row['dataset']} | {row['teacher'] or '–'} | {row['student']} | {row['method']} | " \
                       f"{row['setting']}: {row['folders']}"


def test_a_seed_twice_is_warned_in_report_md_too(clean, tmp_path):
    for copy in ("a", "b"):
        shutil.copytree(clean[0] / "alone/seed0", tmp_path / copy / "seed0", ignore=shutil.ignore_patterns("*.pt"))
    code, _, stderr = call_report(tmp_path / "a", tmp_path / "b", "--no-plot")
    assert code == 0, stderr
    warning = f"resnet8 alone on fake --batch-size 32 --epochs 2: a seed appears twice " \
              f"({tmp_path / 'a/seed0'} {tmp_path / 'b/seed0'})"
    assert f"warning: {warning}" in stderr and f"Warnings:\n- {warning}" in (tmp_path / "a" / MD).read_text()


def test_synthetic_runs_are_rows_of_their_own(clean, tmp_path):
    """Real and synthetic runs of one configuration in one folder: two rows, the dataset in a column (and in the
    figure's labels), the CIFAR-100 row first."""
    shutil.copytree(clean[0] / "kd", tmp_path / "fake", ignore=shutil.ignore_patterns("*.pt"))
    for folder in GROUPS["kd"]:
        shutil.copytree(clean[0] / folder, tmp_path / "real" / folder, ignore=shutil.ignore_patterns("*.pt"))
        edit_json(tmp_path / "real" / folder / "config.json", dataset="cifar100")
    code, _, stderr = call_report(tmp_path)
    assert code == 0, stderr
    rows = read_rows(tmp_path / CSV)
    assert [row["dataset"] for row in rows] == ["cifar100", "fake"] and rows[0]["setting"] == rows[1]["setting"]
    assert [folders_of(row, tmp_path) for row in rows] == [{f"real/{f}" for f in GROUPS["kd"]},
                                                           {"fake/seed0", "fake/seed1"}]
    table = (tmp_path / MD).read_text()
    for row in rows:
        assert f"| {row['dataset']} | resnet8 | resnet8 | kd | {row['setting']} | 2 |" in table
    figure, _ = figure_of(tmp_path)
    assert [line.get_label() for line in figure.axes[0].lines] == ["resnet8 -> resnet8 kd (n=2)",
                                                                  "resnet8 -> resnet8 kd on fake (n=2)"]


@pytest.mark.parametrize("where, why", [("a file", "File exists"), ("below a file", "Not a directory")])
def test_an_out_that_is_a_file_is_refused_in_one_line(clean, tmp_path, where, why):
    (tmp_path / "file").write_text("kept")
    out = tmp_path / ("file" if where == "a file" else "file/sub")
    code, _, _ = call_report(clean[0], "--no-plot", "--out", out)
    assert code.startswith(f"error: cannot write the report into {out}: ") and why in code and "\n" not in code
    assert code.endswith("(--out FOLDER chooses where it goes)")
    assert [p.name for p in tmp_path.iterdir()] == ["file"] and (tmp_path / "file").read_text() == "kept"


@pytest.mark.parametrize("where", ["itself", "its parent"])
def test_a_read_only_out_is_refused_in_one_line(clean, tmp_path, where):
    (read_only := tmp_path / "read-only").mkdir()
    read_only.chmod(0o555)
    try:
        if os.access(read_only, os.W_OK):
            pytest.skip("this user writes into read-only folders (root)")
        out = read_only if where == "itself" else read_only / "new"
        code, _, _ = call_report(clean[0], "--no-plot", "--out", out)
        assert code.startswith(f"error: cannot write the report into {out}: ") and "Permission denied" in code
        assert not any(read_only.iterdir())
    finally:
        read_only.chmod(0o755)
