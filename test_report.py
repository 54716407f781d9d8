"""report.py on real runs of train.py (resnet8, fake data, 2 epochs): grouping, statistics, bad input, outputs."""
import contextlib
import csv
import io
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import data
import report
import train

TINY = ["--student", "resnet8", "--epochs", "2", "--batch-size", "32", "--dataset", "fake", "--device", "cpu"]
# which run folders must share a row (the old-format copy is made from alone/seed1 in the fixture)
GROUPS = {"alone": {"alone/seed0", "alone/seed1", "alone-old/seed2"}, "alone-lr": {"alone-lr/seed0"},
          "kd": {"kd/seed0", "kd/seed1"}}


def edit_json(path, **changes):
    content = json.loads(path.read_text())
    content.update(changes)
    path.write_text(json.dumps(content))
    return content


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


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def folders_of(row, root):
    return {Path(folder).relative_to(root).as_posix() for folder in row["folders"].split()}


@pytest.fixture(scope="module")
def clean(tmp_path_factory, one_torch_thread):
    """Five runs by train.py (resnet8 alone, seeds 0 and 1; alone with --lr 0.1; KD from the first, seeds 0 and 1),
    an older run of the first experiment, and the report over them."""
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
    for seed in ("0", "1"):
        make(f"kd/seed{seed}", "--teacher", "resnet8", "--teacher-ckpt", str(root / teacher / "last.pt"),
             "--method", "kd", "--seed", seed)
    # the first experiment as an older train.py on a GPU machine recorded it: keys missing (they take their
    # defaults), others set that do not change the experiment; its accuracies moved so that no two runs tie
    shutil.copytree(root / "alone/seed1", root / "alone-old/seed2")
    config = json.loads((root / "alone-old/seed2/config.json").read_text())
    for key in ("cuda_graphs", "hidden_dim", "alpha", "bf16"):
        del config[key]
    config.update(seed=2, device="cuda:0", data_dir="/elsewhere", compile=True, channels_last=True, fused_sgd=True)
    (root / "alone-old/seed2/config.json").write_text(json.dumps(config))
    summary = json.loads((root / "alone-old/seed2/summary.json").read_text())
    edit_json(root / "alone-old/seed2/summary.json", last_accuracy=summary["last_accuracy"] + 3.125,
              best_accuracy=summary["best_accuracy"] + 4.6875)
    edit_json(root / "alone/seed0/config.json", teacher_cache=True)  # a newer flag, bit-identical results
    # last and best apart: one run whose best epoch was the first, 12.5 points above its last
    summary = json.loads((root / "kd/seed1/summary.json").read_text())
    edit_json(root / "kd/seed1/summary.json", best_epoch=1, best_accuracy=summary["last_accuracy"] + 12.5)
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
}


@pytest.fixture(scope="module")
def messy(clean, tmp_path_factory):
    """The same runs plus broken and unfinished copies of alone/seed0 (with new seeds: counted, they would change
    the first row), reported into a separate folder without the figure."""
    root = tmp_path_factory.mktemp("messy")
    shutil.copytree(clean[0], root, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.pt", "report.*", "*.png"))
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
    rows = read_rows(root / "report.csv")
    assert sorted(map(sorted, (folders_of(row, root) for row in rows))) == sorted(map(sorted, GROUPS.values()))
    by_name = {name: row for name in GROUPS for row in rows if folders_of(row, root) == GROUPS[name]}
    assert by_name["alone"]["seeds"] == "0 1 2" and by_name["alone"]["method"] == "none"
    assert "--lr 0.1" in by_name["alone-lr"]["setting"] and "--lr" not in by_name["alone"]["setting"]
    assert by_name["kd"]["teacher"] == "resnet8" and by_name["kd"]["method"] == "kd"


def test_means_and_sample_stds_match_numpy_on_the_summaries(clean):
    root = clean[0]
    table = (root / "report.md").read_text()
    for row in read_rows(root / "report.csv"):
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
    kd = next(row for row in read_rows(root / "report.csv") if folders_of(row, root) == GROUPS["kd"])
    last = [json.loads((root / f / "summary.json").read_text())["last_accuracy"] for f in sorted(GROUPS["kd"])]
    best = [json.loads((root / f / "summary.json").read_text())["best_accuracy"] for f in sorted(GROUPS["kd"])]
    assert float(kd["last_acc_mean"]) == pytest.approx(np.mean(last))
    assert float(kd["best_acc_mean"]) == pytest.approx(np.mean(best))
    assert float(kd["best_acc_mean"]) - float(kd["last_acc_mean"]) > 6  # the edited run's 12.5 over two runs


def test_teacher_accuracy_is_the_teachers_own(clean):
    root = clean[0]
    kd = next(row for row in read_rows(root / "report.csv") if folders_of(row, root) == GROUPS["kd"])
    teacher = json.loads((root / clean[3] / "summary.json").read_text())  # kd's --teacher-ckpt
    assert teacher["last_accuracy"] > 0 and float(kd["teacher_acc"]) == pytest.approx(teacher["last_accuracy"])


def test_curves_png_is_written(clean):
    png = (clean[0] / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_broken_and_unfinished_runs_hide_nothing(clean, messy):
    root, out, stdout, _ = messy
    clean_rows, messy_rows = read_rows(clean[0] / "report.csv"), read_rows(out / "report.csv")
    assert [{**r, "folders": folders_of(r, clean[0])} for r in clean_rows] == \
           [{**r, "folders": folders_of(r, root)} for r in messy_rows]
    assert not (out / "curves.png").exists()  # --no-plot
    for listing in (stdout, (out / "report.md").read_text()):
        assert f"{root / 'unfinished_partial'}: 1 of 2 epochs logged" in listing
        assert f"{root / 'unfinished_started'}: 0 of 2 epochs logged" in listing


@pytest.mark.parametrize("name", BROKEN)
def test_each_broken_file_is_named(name, messy):
    root, _, _, stderr = messy
    assert f"skipped {root / name / BROKEN[name][0]}" in stderr


def test_several_folders_are_pooled_into_the_first(clean, tmp_path):
    shutil.copytree(clean[0] / "alone", tmp_path / "a")
    shutil.copytree(clean[0] / "alone-old", tmp_path / "b")
    code, _, stderr = call_report(tmp_path / "a", tmp_path / "b", "--no-plot")
    assert code == 0, stderr
    rows = read_rows(tmp_path / "a/report.csv")
    assert len(rows) == 1 and rows[0]["runs"] == "3" and not (tmp_path / "b/report.csv").exists()


def test_no_runs_or_no_folder_exits_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, "report.py", str(tmp_path)], cwd=Path(__file__).parent,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and result.stderr.count("\n") == 1 and "no finished run" in result.stderr
    code, _, _ = call_report(tmp_path / "nowhere")
    assert code and "nowhere is not a folder" in code


def test_report_does_not_import_torch(clean, tmp_path):
    script = f"import sys, report; report.main([{str(clean[0])!r}, '--no-plot', '--out', {str(tmp_path)!r}]); " \
             "assert 'torch' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parent, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("argv", [["--teacher", "resnet8"], ["--teacher", "resnet8", "--method", "kd"], [],
                                  ["--student", "MobileNetV2"], ["--teacher", "resnet8", "--student", "ShuffleV1"]])
def test_defaults_are_train_pys(argv):
    config = train.resolve_config(train.parse_args(["--student", "resnet8", *argv, "--device", "cpu"]))
    defaults = report.recipe_defaults(config)
    assert {key: config[key] for key in defaults if key not in report.COLUMNS_OF_THE_TABLE} == \
           {key: value for key, value in defaults.items() if key not in report.COLUMNS_OF_THE_TABLE}
    # every key train.py records is known here: either a recipe default, a column, or not part of the experiment
    assert set(config) <= {*defaults, *report.COLUMNS_OF_THE_TABLE, *report.NOT_THE_EXPERIMENT}
    assert report.setting(config) == ""


def test_the_teacher_is_told_apart_by_its_file_not_its_path(clean):
    recorded = json.loads((clean[0] / "kd/seed0/config.json").read_text())  # as train.py wrote it
    assert set(recorded) <= {*report.recipe_defaults(recorded), *report.COLUMNS_OF_THE_TABLE,
                             *report.NOT_THE_EXPERIMENT, report.TEACHER_IDENTITY}
    assert "sha256" not in report.setting(recorded) and "teacher-file" not in report.setting(recorded)
    moved = dict(recorded, teacher_ckpt="/another/machine/last.pt", teacher_file="/another/machine/last.pt")
    assert report.experiment(moved) == report.experiment(recorded)
    assert report.experiment(dict(recorded, teacher_sha256="0" * 64)) != report.experiment(recorded)
    older = {key: value for key, value in recorded.items() if key not in ("teacher_file", "teacher_sha256")}
    assert report.experiment(dict(older, teacher_ckpt="/elsewhere.pt")) != report.experiment(older)  # path alone


def test_readme_commands_make_one_row_per_pair_and_method(tmp_path):
    """The README's "Reproducing the table" commands, as configurations (no training): four rows of three seeds."""
    readme = (Path(__file__).parent / "README.md").read_text()
    section = readme[readme.index("## Reproducing the table"):readme.index("## The pieces")]
    commands = [shlex.split(line)[2:] for line in section.splitlines() if line.startswith("python train.py")]
    log = ",".join(train.LOG_COLUMNS) + "\n" + ",".join(["1"] * len(train.LOG_COLUMNS)) + "\n"
    for i, argv in enumerate(commands):
        config = train.resolve_config(train.parse_args([*argv, "--device", "cpu"]))
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "config.json").write_text(json.dumps(config))
        (tmp_path / str(i) / "log.csv").write_text(log)
        (tmp_path / str(i) / "summary.json").write_text(json.dumps(
            {"last_accuracy": 70.0 + i, "best_accuracy": 71.0 + i, "last_epoch": 1, "teacher_accuracy": None,
             "wall_time_s": 1.0}))
    code, _, stderr = call_report(tmp_path, "--no-plot")
    assert code == 0, stderr
    rows = read_rows(tmp_path / "report.csv")
    assert sorted((r["teacher"], r["student"], r["method"], r["seeds"]) for r in rows) == [
        ("", "resnet8x4", "none", "0 1 2"), ("resnet32x4", "resnet8x4", "kd", "0 1 2"),
        ("resnet32x4", "resnet8x4", "srd", "0 1 2"), ("wrn_40_2", "wrn_16_2", "srd", "0 1 2")]
