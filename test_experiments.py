"""The run lists under experiments/ (one train.py command a line) and the teacher they share, committed beside them.

Every line parses with train.py's own parser and ends with --resume (the same line starts, resumes or says done); the
rows are the tables' rows; the teacher file loads strictly, safely, and is the one the READMEs name by its sha256.
"""
import ast
import json
import re
import shlex
from pathlib import Path

import pytest

import data
import models
import train

EXPERIMENTS = Path(__file__).resolve().parent / "experiments"
TEACHER = EXPERIMENTS / "teacher-resnet20.pt"


def parsed(name):
    """The argparse namespaces of experiments/<name>'s lines, each checked to be `python train.py ... --resume`."""
    lines = (EXPERIMENTS / name).read_text().splitlines()
    assert lines and all(line.startswith("python train.py ") and line.endswith(" --resume") for line in lines)
    return [train.parse_args(shlex.split(line)[2:]) for line in lines]


def test_the_ablation_list_holds_the_teacher_then_11_rows_of_3_seeds():
    """experiments/ablations.txt (the paper's Tables 6.1-6.3 in its few-shot protocol): the full-data resnet20 teacher
    first, then resnet8 students on the same 10,000-image subset and epochs, each row at seeds 0, 1, 2."""
    teacher, *students = parsed("ablations.txt")
    assert (teacher.student, teacher.method, teacher.train_subset, teacher.epochs) == ("resnet20", "none", None, 25)
    assert len(students) == 33 and {(s.student, s.train_subset, s.epochs) for s in students} == {("resnet8", 10000, 6)}
    rows = {(s.method, s.norm, s.alpha, s.distance) for s in students}
    assert len(rows) == 11 and sorted(s.seed for s in students) == [0] * 11 + [1] * 11 + [2] * 11
    assert {row for row in rows if row[0] == "srd"} == {("srd", n, 4.0, "logsum") for n in ("bn", "none", "l2", "gn")} \
        | {("srd", "bn", a, "logsum") for a in (1.0, 2.0, 3.0, 5.0)} | {("srd", "bn", 4.0, "mse")}
    assert {s.teacher_ckpt for s in students if s.teacher} == {"experiments/teacher-resnet20.pt"}
    assert len({s.out for s in students}) == 33


def test_the_committed_teacher_loads_strictly_and_is_the_one_the_readmes_name():
    checkpoint = models.load_weights(models.build_model("resnet20"), TEACHER)  # weights_only, strict
    assert set(checkpoint) == {"model", "epoch", "accuracy", "model_name", "config"}  # no optimizer: weights, record
    record = checkpoint["config"]
    assert (checkpoint["epoch"], record["epochs"], record["student"], record["method"]) == (25, 25, "resnet20", "none")
    assert (record["dataset"], record["train_subset"], record["seed"]) == ("cifar100", None, 0)
    assert TEACHER.stat().st_size < 1.5e6
    digest = data.digest_of(TEACHER, "sha256")
    for readme in (EXPERIMENTS / "README.md", EXPERIMENTS.parent / "README.md"):
        named = re.findall(r"teacher-resnet20\.pt\D{0,80}sha256 `?([0-9a-f]{64})", readme.read_text())
        assert named == [digest] * len(named) and named, readme


@pytest.mark.parametrize("name", sorted(path.name for path in EXPERIMENTS.glob("*.txt")))
def test_every_list_names_the_committed_teacher_or_none(name):
    lines = parsed(name)
    assert {s.teacher_ckpt for s in lines if s.teacher_ckpt} <= {"experiments/teacher-resnet20.pt",
                                                                 "runs/smoke/teacher/last.pt"}


def test_the_alpha_scale_list_matches_the_notebook_s_weights_and_sweeps_two_distances():
    """experiments/alpha-scale.txt (issue 35): alpha = 1..5 each at the --feat-weight theory.ipynb's section 8.2
    measured to give alpha = 2's initial pull at 2.0 (its saved output), and alpha = 4 and MSE at 0.5, 1, 2 and 4;
    the table's protocol and teacher, seeds 0, 1, 2; a line equal to one of the table's is the same run (its --out)."""
    notebook = json.loads((EXPERIMENTS.parent / "theory.ipynb").read_text())
    printed = "".join(text for cell in notebook["cells"] for output in cell.get("outputs", [])
                      for text in output.get("text", []))
    measured = ast.literal_eval(re.search(r"matched --feat-weight: (\{.*\})", printed).group(1))
    lines = parsed("alpha-scale.txt")
    assert {(s.student, s.train_subset, s.epochs, s.teacher_ckpt) for s in lines} == {
        ("resnet8", 10000, 6, "experiments/teacher-resnet20.pt")}
    rows = {(s.distance, s.alpha or 4.0, s.feat_weight or 2.0) for s in lines}
    assert rows == {("logsum", float(a), measured[a]) for a in (1, 2, 3, 4, 5)} | {
        (distance, 4.0, w) for distance in ("logsum", "mse") for w in (0.5, 1.0, 2.0, 4.0)}
    assert len(lines) == 3 * len(rows) and sorted(s.seed for s in lines) == [0] * 13 + [1] * 13 + [2] * 13
    table = {line.split(" --out ")[1]: line for line in (EXPERIMENTS / "ablations.txt").read_text().splitlines()}
    for line in (EXPERIMENTS / "alpha-scale.txt").read_text().splitlines():
        assert table.get(line.split(" --out ")[1], line) == line  # a folder of the table's: its very line


def test_the_longer_list_runs_the_deciding_rows_for_20_epochs():
    """experiments/longer.txt (issue 35): the student alone, KD, SRD as published (alpha 4 at 2.0), SRD at the best
    alpha of alpha-scale.txt's matched rows with its matched weight, and MSE at 2.0; 20 epochs, seeds 0, 1, 2."""
    lines = parsed("longer.txt")
    assert {(s.student, s.train_subset, s.epochs) for s in lines} == {("resnet8", 10000, 20)}
    rows = {(s.method or "none", s.distance or "logsum", s.alpha or 4.0, s.feat_weight or 2.0) for s in lines
            if s.method != "kd"} | {("kd",) for s in lines if s.method == "kd"}
    matched = {(s.alpha or 4.0, s.feat_weight or 2.0) for s in parsed("alpha-scale.txt") if s.distance != "mse"}
    best = [row for row in rows if row[0] == "srd" and row[1:3] != ("logsum", 4.0) and row[1] != "mse"]
    assert len(rows) == 5 and len(best) == 1 and best[0][2:] in matched
    assert {("none", "logsum", 4.0, 2.0), ("kd",), ("srd", "logsum", 4.0, 2.0), ("srd", "mse", 4.0, 2.0)} < rows
    assert sorted(s.seed for s in lines) == [0] * 5 + [1] * 5 + [2] * 5 and len({s.out for s in lines}) == 15
