"""train.py end to end on CPU: tiny models, fake data, a couple of epochs each."""
import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import devices
import models
import runs
import train

TINY = ["--dataset", "fake", "--epochs", "2", "--device", "cpu"]


@pytest.fixture
def small_fake_data(monkeypatch):
    """--dataset fake at 256 training and 100 test images: for tests of what a run does, not of what it learns."""
    monkeypatch.setitem(data.FAKE_SIZES, "fake", (256, 100))
OUTPUTS = ("config.json", "log.csv", "last.pt", "best.pt", "summary.json")
CHANCE = 1.0  # % on 100 classes


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory):
    """A resnet8 trained alone for 2 epochs, re-saved in the published ckpt_epoch_240.pth layout."""
    folder = tmp_path_factory.mktemp("teacher")
    summary = train.main(["--student", "resnet8", *TINY, "--out", str(folder / "run")])
    ours = torch.load(folder / "run" / "last.pt", weights_only=True)
    published = {"model": ours["model"], "epoch": 240, "accuracy": torch.tensor(ours["accuracy"]),
                 "optimizer": ours["optimizer"]}
    torch.save(published, folder / "ckpt_epoch_240.pth")
    return folder / "ckpt_epoch_240.pth", summary


def read_log(folder):
    with open(folder / "log.csv") as f:
        return list(csv.DictReader(f))


def test_student_alone_writes_every_output_and_learns(teacher_checkpoint):
    _, summary = teacher_checkpoint
    folder = teacher_checkpoint[0].parent / "run"
    assert all((folder / name).exists() for name in OUTPUTS)
    assert [int(r["epoch"]) for r in read_log(folder)] == [1, 2]
    rows = read_log(folder)
    accuracies = [float(r["test_acc"]) for r in rows]
    assert summary["last_epoch"] == 2 and summary["last_accuracy"] == pytest.approx(accuracies[-1])
    assert summary["best_accuracy"] == pytest.approx(max(accuracies))
    assert summary["best_epoch"] == 1 + accuracies.index(max(accuracies))
    assert summary["last_accuracy"] > 5 * CHANCE
    checkpoint = torch.load(folder / "last.pt", weights_only=True)
    model = models.build_model("resnet8")
    model.load_state_dict(checkpoint["model"])  # the published format: other codebases load it the same way


@pytest.mark.parametrize("method", ["srd", "kd"])
def test_distillation_with_published_teacher(method, teacher_checkpoint, tmp_path, capsys):
    path, teacher_summary = teacher_checkpoint
    summary = train.main(["--teacher", "resnet8", "--teacher-ckpt", str(path), "--student", "resnet8",
                          "--method", method, *TINY, "--out", str(tmp_path / "run")])
    assert all((tmp_path / "run" / name).exists() for name in OUTPUTS)
    assert summary["teacher_accuracy"] == pytest.approx(teacher_summary["last_accuracy"])
    assert f"teacher resnet8 test accuracy {teacher_summary['last_accuracy']:.2f}" in capsys.readouterr().out
    assert summary["last_accuracy"] > 5 * CHANCE
    rows = read_log(tmp_path / "run")
    used = {"srd": "loss_feat", "kd": "loss_kd"}[method]
    assert all(float(r[used]) != 0 for r in rows)
    if method == "srd":
        assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["projector"]  # projector saved


def test_teacher_is_trained_first_when_absent(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    summary = train.main(["--teacher", "resnet8", "--student", "resnet8", *TINY[:2], "--epochs", "1",
                          "--device", "cpu"])
    out = capsys.readouterr().out
    assert "data: synthetic (--dataset fake), 2,000 training images and 500 test images" in out
    plan = out.index("the job, in two parts")  # said up front, before the first epoch of either part
    assert plan < out.index("epoch   1/1")
    assert "1. train resnet8 alone, 1 epochs, in runs/fake/resnet8; 2. distil resnet8 from it" in out
    assert (tmp_path / "runs/fake/resnet8/summary.json").exists()
    assert (tmp_path / "runs/fake/resnet8-resnet8-srd-seed0/summary.json").exists()
    teacher_summary = json.loads((tmp_path / "runs/fake/resnet8/summary.json").read_text())
    assert summary["teacher_accuracy"] == pytest.approx(teacher_summary["last_accuracy"])


def test_unfinished_teacher_is_finished_as_recorded_and_the_student_keeps_its_teacher(tmp_path, monkeypatch, capsys, small_fake_data):
    """A job whose teacher run was interrupted finishes it with its own recorded recipe (not the job's), and a resumed
    distillation uses exactly the teacher file it started with (by sha256), however runs/<teacher> changes since."""
    monkeypatch.chdir(tmp_path)
    teacher = Path("runs/fake/resnet8")
    train.main(["--student", "resnet8", *TINY[:2], "--epochs", "1", "--lr", "0.1", "--device", "cpu"])
    (teacher / "summary.json").unlink()  # as if stopped after epoch 1 of 2: both records say 2 epochs
    checkpoint = torch.load(teacher / "last.pt", weights_only=True)
    checkpoint["config"]["epochs"] = 2
    torch.save(checkpoint, teacher / "last.pt")
    (teacher / "config.json").write_text(json.dumps(checkpoint["config"]))
    job = ["--teacher", "resnet8", "--student", "resnet8", *TINY[:2], "--device", "cpu"]
    train.main([*job, "--epochs", "1"])
    assert "1. finish training resnet8 alone, 2 epochs, in runs/fake/resnet8" in capsys.readouterr().out
    # the teacher's own lr and schedule (milestones [1], recorded for 1 epoch), not the job's 0.05
    assert [float(r["lr"]) for r in read_log(teacher)] == [0.1, pytest.approx(1e-2)]
    assert json.loads((teacher / "config.json").read_text())["lr"] == 0.1
    student = Path("runs/fake/resnet8-resnet8-srd-seed0")
    saved = json.loads((student / "config.json").read_text())
    assert saved["teacher_file"] == str((teacher / "last.pt").resolve())
    assert saved["teacher_sha256"] == data.digest_of(teacher / "last.pt", "sha256")

    summary = train.main([*job, "--epochs", "2", "--resume"])  # extends: the 2-epoch teacher is the recorded one
    assert summary["last_epoch"] == 2
    train.main(["--student", "resnet8", *TINY[:2], "--epochs", "3", "--device", "cpu", "--resume"])  # teacher moves on
    with pytest.raises(SystemExit) as exit_info:
        train.main([*job, "--epochs", "3", "--resume"])
    assert "distils from the teacher in" in str(exit_info.value.code)
    assert "which is no longer that file" in str(exit_info.value.code)


def test_resume_equals_uninterrupted_run(teacher_checkpoint, tmp_path, small_fake_data):
    # the paper's method, so the projector and its optimizer state must come back too
    common = ["--teacher", "resnet8", "--teacher-ckpt", str(teacher_checkpoint[0]), "--student", "resnet8",
              "--dataset", "fake", "--device", "cpu", "--milestones", "2"]  # one schedule: a 2-epoch run's own differs
    train.main([*common, "--epochs", "3", "--out", str(tmp_path / "straight")])
    train.main([*common, "--epochs", "2", "--out", str(tmp_path / "resumed")])
    saved = json.loads((tmp_path / "resumed/config.json").read_text())
    del saved["tf32"]  # as a run started before that switch existed recorded its config
    (tmp_path / "resumed/config.json").write_text(json.dumps(saved))
    train.main([*common, "--epochs", "3", "--out", str(tmp_path / "resumed"), "--resume"])
    straight = torch.load(tmp_path / "straight/last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed/last.pt", weights_only=True)
    assert straight["epoch"] == resumed["epoch"] == 3
    for part in ("model", "projector"):
        for key, tensor in straight[part].items():
            assert torch.equal(tensor, resumed[part][key]), (part, key)
    untimed = [c for c in runs.LOG_COLUMNS if c not in ("epoch_time_s", "images_per_s", "warmup_s")]
    assert [[r[c] for c in untimed] for r in read_log(tmp_path / "straight")] == \
           [[r[c] for c in untimed] for r in read_log(tmp_path / "resumed")]


def test_projector_is_optimised_and_changes(monkeypatch):
    config = train.resolve_config(train.parse_args(["--teacher", "resnet8", "--student", "resnet8", *TINY]))
    teacher = models.build_model("resnet8").eval().requires_grad_(False)
    student, distill, optimizer = train.build_student(config, teacher)
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    projector = list(distill.projector.parameters())
    assert projector and all(id(p) in optimised for p in projector)
    before = [p.detach().clone() for p in projector]
    images, labels = data.fake_cifar100(128, seed=0)
    loader = data.Loader(images, labels, 64, True, "cpu")
    loss_fn = train.make_loss_fn(student, teacher, distill, config)
    monkeypatch.setattr(sys, "stderr", Terminal())
    train.train_one_epoch(loss_fn, optimizer, torch.amp.GradScaler("cpu", enabled=False), loader, config)
    assert all(not torch.equal(b, p) for b, p in zip(before, projector))
    assert sys.stderr.getvalue().startswith("\r\033[K  step 1/2  ")  # the epoch shows its progress on a terminal


@pytest.mark.parametrize("argv, message", [
    (["--student", "resnet9"], "invalid choice: 'resnet9'"),
    (["--student", "resnet8", "--batch-size", "1"], "argument --batch-size: must be at least 2"),
    (["--student", "resnet8", "--method", "srd"], "--method srd needs --teacher"),
])
def test_bad_arguments_fail_fast(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_model_lists_the_valid_ones(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--student", "resnet8", "--teacher", "resnet999"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "resnet999" in error and all(name in error for name in models.MODEL_NAMES)


def test_teacher_checkpoint_of_another_architecture(teacher_checkpoint, tmp_path):
    path, _ = teacher_checkpoint
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--teacher", "resnet14", "--teacher-ckpt", str(path), "--student", "resnet8", *TINY,
                    "--out", str(tmp_path / "run")])
    assert "--teacher-ckpt: " in str(exit_info.value.code) and "layer1.1" in str(exit_info.value.code)


def test_missing_data_without_download(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--student", "resnet8", "--data-dir", str(tmp_path / "nowhere"), "--no-download",
                    "--device", "cpu", "--epochs", "1", "--out", str(tmp_path / "run")])
    assert str(tmp_path / "nowhere") in str(exit_info.value.code)


def test_existing_run_is_never_overwritten(teacher_checkpoint):
    folder = teacher_checkpoint[0].parent / "run"
    before = (folder / "last.pt").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--student", "resnet8", *TINY, "--out", str(folder)])
    assert "--resume" in str(exit_info.value.code)
    assert (folder / "last.pt").read_bytes() == before


def test_non_finite_loss_stops_with_the_epoch(tmp_path):
    # lr 10 and weight decay 1 (the largest each flag takes) make the weights, hence the loss, overflow in epoch 1
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--student", "resnet8", *TINY, "--lr", "10", "--weight-decay", "1", "--out", str(tmp_path / "run")])
    assert "non-finite loss in epoch 1" in str(exit_info.value.code)
    assert "it was the first epoch, so no checkpoint was written" in str(exit_info.value.code)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_command_line_exit_status(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--student", "resnet8", "--no-download",
                             "--data-dir", str(tmp_path / "nowhere"), "--device", "cpu",
                             "--out", str(tmp_path / "run")],
                            cwd=Path(__file__).parent, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "error:" in result.stderr


def test_short_real_data_run_learns(cifar100_root, tmp_path):
    (train_images, train_labels) = data.load_cifar100(cifar100_root, train=True)
    test_set = data.load_cifar100(cifar100_root, train=False)
    subset = ((train_images[:5000], train_labels[:5000]), (test_set[0][:1000], test_set[1][:1000]))
    config = train.resolve_config(train.parse_args(["--student", "resnet8", "--epochs", "2", "--device", "cpu"]))
    summary = train.run(config, tmp_path / "run", datasets=subset)
    assert summary["last_accuracy"] > 3 * CHANCE


def test_lr_schedule_follows_crd():
    config = train.resolve_config(train.parse_args(["--student", "resnet8", "--device", "cpu"]))
    assert config["lr"] == 0.05 and config["epochs"] == 240 and config["batch_size"] == 64
    expected = {1: 0.05, 150: 0.05, 151: 0.005, 180: 0.005, 181: 5e-4, 210: 5e-4, 211: 5e-5, 240: 5e-5}
    for epoch, lr in expected.items():
        assert train.lr_at(config, epoch) == pytest.approx(lr), epoch
    small = train.resolve_config(train.parse_args(["--student", "ShuffleV2", "--device", "cpu"]))
    assert small["lr"] == 0.01


def test_short_teacher_run_is_not_reused_silently(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train.main(["--student", "resnet8", *TINY[:2], "--epochs", "1", "--device", "cpu"])  # runs/fake/resnet8
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--teacher", "resnet8", "--student", "resnet8", *TINY])
    assert "trained for 1 epochs, fewer than this run's 2" in str(exit_info.value.code)


def test_last_batch_of_one_image_is_refused(tmp_path):
    with pytest.raises(SystemExit) as exit_info:  # fake data: 2000 = 1 x 1999 + 1
        train.main(["--student", "resnet8", *TINY, "--batch-size", "1999", "--out", str(tmp_path / "run")])
    assert "last batch of one image" in str(exit_info.value.code)


def test_fake_full_has_cifar100_sizes_and_its_own_run_folders(monkeypatch):
    requested = []
    small = data.fake_cifar100
    monkeypatch.setattr(data, "fake_cifar100", lambda n, seed: requested.append((n, seed)) or small(4, seed))
    config = train.resolve_config(train.parse_args(["--teacher", "resnet8", "--student", "resnet8", "--dataset",
                                                    "fake-full", "--device", "cpu"]))
    data.load_datasets(config["dataset"], config["data_dir"])
    assert requested == [(50_000, 0), (10_000, 1)]
    assert runs.default_folder(config) == Path("runs/fake-full/resnet8-resnet8-srd-seed0")
    assert runs.default_folder(train.teachers.training_config(config)) == Path("runs/fake-full/resnet8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_run_cannot_resume_without_cuda(teacher_checkpoint, tmp_path):
    shutil.copytree(teacher_checkpoint[0].parent / "run", tmp_path / "run")
    (tmp_path / "run/summary.json").unlink()
    checkpoint = torch.load(tmp_path / "run/last.pt", weights_only=True)
    checkpoint["config"]["device"] = "cuda"  # as a run on a GPU machine recorded it
    torch.save(checkpoint, tmp_path / "run/last.pt")
    (tmp_path / "run/config.json").write_text(json.dumps(checkpoint["config"]))
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--resume", str(tmp_path / "run"), "--epochs", "3"])
    assert "no CUDA device to resume it on" in str(exit_info.value.code)


@pytest.mark.parametrize("removed, flag", [("teacher_cache", "--teacher-cache"), ("cuda_graphs", "--cuda-graphs")])
def test_a_record_of_a_removed_flag_resumes_where_it_was_off(removed, flag, tmp_path, small_fake_data):
    """--teacher-cache and --cuda-graphs are gone (in git at b3fc172): a run that recorded one off resumes, its record
    rewritten without it; a run that used one is refused by name, its folder untouched."""
    folder = tmp_path / "run"
    train.main(["--student", "resnet8", *TINY[:2], "--epochs", "1", "--device", "cpu", "--out", str(folder)])
    checkpoint = torch.load(folder / "last.pt", weights_only=True)
    for value in (True, False):  # as that train.py recorded it, in last.pt and config.json
        checkpoint["config"][removed] = value
        torch.save(checkpoint, folder / "last.pt")
        (folder / "config.json").write_text(json.dumps(checkpoint["config"]))
        if value:
            with pytest.raises(SystemExit) as exit_info:
                train.main(["--resume", str(folder), "--epochs", "2"])
            assert str(exit_info.value.code) == f"error: cannot resume {folder}: this train.py no longer has {flag}; " \
                                                f"resume it with the commit that ran it, b3fc172, or start a new run"
            assert torch.load(folder / "last.pt", weights_only=True)["epoch"] == 1
    assert train.main(["--resume", str(folder), "--epochs", "2"])["last_epoch"] == 2
    assert removed not in json.loads((folder / "config.json").read_text())
    assert removed not in torch.load(folder / "last.pt", weights_only=True)["config"]


# ---- short runs that make sense: the schedule follows --epochs, and a fixed training subset --------------------

@pytest.mark.parametrize("epochs, milestones", [(240, [150, 180, 210]), (15, [9, 11, 13]), (8, [5, 6, 7]),
                                                (3, [1, 2]), (2, [1]), (1, [1])])  # never two drops at once
def test_default_milestones_are_5_6_and_7_eighths_of_the_run(epochs, milestones):
    config = train.resolve_config(train.parse_args(["--student", "resnet8", "--epochs", str(epochs), "--device", "cpu"]))
    assert config["milestones"] == milestones
    explicit = train.resolve_config(train.parse_args(["--student", "resnet8", "--epochs", str(epochs), "--milestones",
                                                      "1", "--device", "cpu"]))
    assert explicit["milestones"] == [1]


def test_a_resumed_run_keeps_its_recorded_milestones(tmp_path, capsys, small_fake_data):
    train.main([*TINY, "--student", "resnet8", "--out", str(tmp_path / "run")])  # 2 epochs: [1]
    out = capsys.readouterr().out  # printed with the resolved configuration, and as a schedule
    assert "milestones=[1]" in out and "\nlr by epoch: 1 0.05, 2 0.005\n" in out
    train.main(["--resume", str(tmp_path / "run"), "--epochs", "4"])
    assert json.loads((tmp_path / "run/config.json").read_text())["milestones"] == [1]  # not 4 epochs' [2, 3]
    assert [float(r["lr"]) for r in read_log(tmp_path / "run")][2:] == [pytest.approx(5e-3)] * 2
    assert "\nlr by epoch: 1 0.05, 2-4 0.005\n" in capsys.readouterr().out


def test_a_class_balanced_subset_is_the_first_images_of_each_class():
    labels = torch.tensor([3, 1, 3, 0, 1, 0, 3, 2, 2, 1, 0, 2])
    assert data.class_balanced_subset(labels, 8, num_classes=4).tolist() == [0, 1, 2, 3, 4, 5, 7, 8]
    with pytest.raises(data.DataError, match="asks 4 images of each of the 4 classes, and the 12 training images hold "
                                             "3 of the rarest class: choose at most 12"):
        data.class_balanced_subset(labels, 16, num_classes=4)


def test_train_subset_is_the_same_images_for_every_seed_and_the_test_set_stays_whole(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(train, "fit", lambda config, out, resume, teacher, datasets: seen.append(datasets))
    for seed in ("0", "1"):
        train.main(["--student", "resnet8", *TINY, "--train-subset", "500", "--seed", seed,
                    "--out", str(tmp_path / seed)])
    (images, labels), (test_images, _) = seen[0]
    assert torch.equal(images, seen[1][0][0]) and torch.equal(labels, seen[1][0][1])
    assert torch.bincount(labels, minlength=100).tolist() == [5] * 100 and len(test_images) == 500


@pytest.mark.parametrize("subset, says", [("150", "--train-subset 150: not a multiple of 100 classes"),
                                          ("0", "argument --train-subset: must be at least 1")])
def test_a_train_subset_that_is_not_balanced_is_refused(subset, says, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--student", "resnet8", "--train-subset", subset])
    assert says in capsys.readouterr().err


def test_a_train_subset_larger_than_the_data_is_refused(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--student", "resnet8", *TINY, "--train-subset", "5000", "--out", str(tmp_path / "run")])
    assert "--train-subset 5000 asks 50 images of each of the 100 classes" in str(exit_info.value.code)
    assert not (tmp_path / "run").exists()


def test_subset_and_full_data_teachers_are_kept_apart(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    job = ["--teacher", "resnet8", "--student", "resnet8", *TINY[:2], "--epochs", "1", "--device", "cpu"]
    train.main([*job, "--train-subset", "500"])
    assert "in runs/fake/subset500/resnet8; 2. distil" in capsys.readouterr().out
    assert json.loads(Path("runs/fake/subset500/resnet8/config.json").read_text())["train_subset"] == 500
    train.main(job)  # full data: trains its own teacher, never the subset's
    assert "in runs/fake/resnet8; 2. distil" in capsys.readouterr().out
    shutil.rmtree("runs/fake/resnet8")
    shutil.copytree("runs/fake/subset500/resnet8", "runs/fake/resnet8")  # a subset teacher moved by hand
    with pytest.raises(SystemExit) as exit_info:
        train.main([*job, "--seed", "1"])
    assert "runs/fake/resnet8 holds a teacher trained with --train-subset 500, not this run's None" in \
        str(exit_info.value.code)
    with pytest.raises(SystemExit) as exit_info:  # and a resumed subset run keeps its subset
        train.main(["--resume", "runs/fake/subset500/resnet8-resnet8-srd-seed0", "--train-subset", "1000"])
    assert "was run with --train-subset 500" in str(exit_info.value.code)


# ---- the paper's mechanism in every run: the projector's spectrum in log.csv ----------------------------------

def test_the_projector_spectrum_is_logged_for_srd_and_empty_otherwise(teacher_checkpoint, tmp_path, small_fake_data):
    path, _ = teacher_checkpoint
    for method, projector in (("srd", "mlp"), ("srd", "linear"), ("kd", "mlp")):
        train.main(["--teacher", "resnet8", "--teacher-ckpt", str(path), "--student", "resnet8", "--method", method,
                    *(["--projector", projector] if method == "srd" else []),  # kd's is inert: refused if given
                    *TINY, "--epochs", "1", "--out", str(tmp_path / f"{method}-{projector}")])
    columns = ["proj1_sv_over_1pct", "proj1_effective_rank", "proj2_sv_over_1pct", "proj2_effective_rank"]
    for name, filled in (("srd-mlp", 4), ("srd-linear", 2), ("kd-mlp", 0)):
        row = read_log(tmp_path / name)[-1]
        assert sum(row[c] != "" for c in columns) == filled, name
    # the logged values against numpy's SVD of the projector the checkpoint holds after that epoch
    projector = torch.load(tmp_path / "srd-mlp/last.pt", weights_only=True)["projector"]
    row = read_log(tmp_path / "srd-mlp")[-1]
    for layer, key in ((1, "projector.0.weight"), (2, "projector.2.weight")):
        singular_values = np.linalg.svd(projector[key].double().numpy(), compute_uv=False)
        p = singular_values / singular_values.sum()
        assert int(row[f"proj{layer}_sv_over_1pct"]) == (singular_values > 0.01 * singular_values[0]).sum()
        assert float(row[f"proj{layer}_effective_rank"]) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-4)


def test_resume_follows_the_job_into_its_unfinished_teacher(tmp_path, monkeypatch, capsys, small_fake_data):
    """Stopped in the teacher part, the job's own command with --resume finishes the teacher, then distils; a resumed
    run needs only its folder (--resume FOLDER, or --out FOLDER --resume)."""
    monkeypatch.chdir(tmp_path)
    teacher = Path("runs/fake/resnet8")
    train.main(["--student", "resnet8", *TINY[:2], "--epochs", "1", "--device", "cpu"])
    (teacher / "summary.json").unlink()  # as if stopped after epoch 1 of 2
    checkpoint = torch.load(teacher / "last.pt", weights_only=True)
    checkpoint["config"]["epochs"] = 2
    torch.save(checkpoint, teacher / "last.pt")
    (teacher / "config.json").write_text(json.dumps(checkpoint["config"]))
    job = ["--teacher", "resnet8", "--student", "resnet8", *TINY]
    summary = train.main([*job, "--resume"])
    out = capsys.readouterr().out
    assert "nothing was saved in runs/fake/resnet8-resnet8-srd-seed0 yet: the job resumes with its first part" in out
    assert "1. finish training resnet8 alone, 2 epochs" in out and "resuming runs/fake/resnet8 at epoch 2" in out
    assert summary["last_epoch"] == 2 and json.loads((teacher / "summary.json").read_text())["last_epoch"] == 2
    student = "runs/fake/resnet8-resnet8-srd-seed0"
    assert train.main(["--out", student, "--resume", "--epochs", "3"])["last_epoch"] == 3
    assert train.main(["--resume", student, "--epochs", "4"])["last_epoch"] == 4
    assert json.loads(Path(student, "config.json").read_text())["method"] == "srd"


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_drawn_on_a_terminal_only_and_erased(monkeypatch):
    clock = iter(range(2, 100, 2))  # each reading of the clock 2 s after the one before
    monkeypatch.setattr(devices.time, "perf_counter", lambda: next(clock))
    loader = data.Loader(torch.zeros(10, 3, 32, 32, dtype=torch.uint8), torch.arange(10), 4, False, "cpu")
    terminal, log = Terminal(), io.StringIO()
    assert [batch[1].tolist() for batch in devices.shown(loader, terminal)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    erase = "\r\033[K"  # each line drawn over the whole old one, and the last erased before the epoch's line
    assert terminal.getvalue() == (f"{erase}  step 1/3  1 img/s  6s left in this epoch"  # 4 images in 4 s, 6 to go
                                   f"{erase}  step 2/3  1 img/s  2s left in this epoch"
                                   f"{erase}  step 3/3  1 img/s  0s left in this epoch{erase}")
    assert len(list(devices.shown(loader, log))) == 3 and log.getvalue() == ""  # nothing into a file or a pipe
    stopped = Terminal()
    with pytest.raises(KeyboardInterrupt):
        for step, _ in enumerate(devices.shown(loader, stopped)):
            if step == 1:
                raise KeyboardInterrupt  # a stop mid-epoch: its message must start on a clean line
    assert stopped.getvalue().endswith(f"left in this epoch{erase}")
    monkeypatch.setattr(sys, "stderr", None)  # closed by a daemon: training goes on, silently
    assert len(list(devices.shown(loader))) == 3
