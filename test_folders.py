"""Run folders, fourth pass (issue 37) and the idempotent --resume (issue 36): each test here failed before its fix.

A deleted .lock, another run's records, a teacher still training or stopped, a stale summary.json, signals together,
a stop during the imports, and the refusals that used to come late or as tracebacks.
"""
import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import data
import runs
import train
from test_failures import PROJECT, exit_message, snapshot, start_and_wait_for_epoch_1

TINY = ["--student", "resnet8", "--dataset", "fake", "--device", "cpu"]
SMALL = [*TINY, "--train-subset", "100"]  # two steps an epoch, for the processes started here


@pytest.fixture(autouse=True)
def small_fake_data(monkeypatch):
    monkeypatch.setitem(data.FAKE_SIZES, "fake", (64, 50))  # an epoch in a fraction of a second


def checkpoint_of(folder):
    return torch.load(folder / "last.pt", weights_only=True)


def equal(a, b):
    """Nested states (dicts, lists, tensors, numbers) equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(equal, a, b))
    return a == b


# ---- data lost or written over ----------------------------------------------------------------------------------

def test_a_lock_removed_under_a_running_run_stops_it_before_it_saves(tmp_path):
    out = tmp_path / "run"
    first = start_and_wait_for_epoch_1([*SMALL, "--epochs", "400", "--out", str(out)])
    try:
        (out / ".lock").unlink()  # by hand; a second run then creates and locks its own
        (out / ".lock").write_text("process 1 on elsewhere")
        _, stderr = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 1 and "Traceback" not in stderr, stderr
    assert f"{out / '.lock'} was removed or replaced while this process held it" in stderr and "unsaved" in stderr
    logged = [row["epoch"] for row in runs.logged_rows(out)]
    assert logged == list(range(1, len(logged) + 1)) and checkpoint_of(out)["epoch"] == logged[-1]  # whole epochs
    assert (out / ".lock").read_text() == "process 1 on elsewhere"  # the other run's lock, left alone


def test_another_run_s_records_are_not_written_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"student": "resnet20", "lr": 0.1}))
    before = snapshot(out)
    assert "holds another run's records (student" in exit_message([*TINY, "--epochs", "1", "--out", str(out)])
    (out / "config.json").unlink()
    (out / "log.csv").write_text("epoch,acc\n1,50\n")  # someone's log, without a config.json
    assert "holds another run's records" in exit_message([*TINY, "--epochs", "1", "--out", str(out)])
    assert (out / "log.csv").read_text() == "epoch,acc\n1,50\n" and before.keys() - {"config.json"} <= {"log.csv"}
    (out / "log.csv").unlink()


def test_a_start_stopped_before_its_first_epoch_starts_again_as_advised(tmp_path, monkeypatch):
    """A full disk at epoch 1's log: no epoch saved, so the way on is the same command, which its own records allow."""
    real_write_log, out = runs.write_log, tmp_path / "run"

    def disk_full_at_the_first_row(folder, rows):
        if rows:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write_log(folder, rows)

    monkeypatch.setattr(runs, "write_log", disk_full_at_the_first_row)
    message = exit_message([*TINY, "--epochs", "1", "--out", str(out)])
    assert "then run the same command again (no epoch was saved" in message and "--resume" not in message
    monkeypatch.setattr(runs, "write_log", real_write_log)
    assert train.main([*TINY, "--epochs", "1", "--out", str(out)])["last_epoch"] == 1


def test_a_run_folder_removed_mid_run_is_said_in_one_paragraph(tmp_path, monkeypatch):
    real_save_epoch, out = runs.save_epoch, tmp_path / "run"
    monkeypatch.setattr(runs, "save_epoch", lambda folder, *rest, **named: (shutil.rmtree(folder),
                                                                            real_save_epoch(folder, *rest, **named)))
    message = exit_message([*TINY, "--epochs", "1", "--out", str(out)])
    assert f"the run folder {out} was removed while this run wrote into it: it stops, epoch 1 unsaved" in message


# ---- an experiment silently changed --------------------------------------------------------------------------------

def teacher_run(folder, epochs, record_epochs=None):
    """A resnet8 teacher run on fake data; record_epochs: as if it had been started for that many and stopped."""
    train.main([*TINY, "--epochs", str(epochs), "--out", str(folder)])
    if record_epochs:
        checkpoint = checkpoint_of(folder)
        checkpoint["config"]["epochs"] = record_epochs
        torch.save(checkpoint, folder / "last.pt")
        (folder / "summary.json").unlink()
    return folder / "last.pt"


def test_a_teacher_still_training_is_waited_for_and_a_stopped_one_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runs, "WAIT_S", 0.05)
    teacher = teacher_run(tmp_path / "teacher", 1, record_epochs=2)
    job = ["--teacher", "resnet8", "--teacher-ckpt", str(teacher), *TINY, "--epochs", "1", "--out"]
    message = exit_message([*job, str(tmp_path / "a")])
    assert f"--teacher-ckpt {teacher} is epoch 1 of a 2-epoch run that stopped: finish it first" in message
    finished = teacher_run(tmp_path / "finished", 2)
    lock = open(teacher.parent / ".lock", "r+")  # as the teacher's own process holds it while it trains
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    lock.write("process 7 on the-teacher's-node")
    lock.flush()

    def teacher_finishes():
        time.sleep(0.5)
        shutil.copy(finished, teacher)  # its last epoch saved, then its lock released
        fcntl.flock(lock, fcntl.LOCK_UN)

    finishing = threading.Thread(target=teacher_finishes)
    finishing.start()
    summary = train.main([*job, str(tmp_path / "b")])
    finishing.join()
    assert f"waiting for the run in {teacher.parent} (process 7 on the-teacher's-node) to finish" in \
        capsys.readouterr().out
    recorded = json.loads((tmp_path / "b/config.json").read_text())
    assert summary["last_epoch"] == 1 and recorded["teacher_sha256"] == data.digest_of(teacher, "sha256")


def test_a_finished_teacher_extended_and_stopped_is_not_taken_as_finished(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    folder = Path("runs/fake/resnet8")  # the job's own teacher run: 2 epochs, then resumed for 4, stopped after 3
    train.main([*TINY, "--epochs", "2"])
    real_epoch_line = runs.epoch_line
    monkeypatch.setattr(runs, "epoch_line", lambda row, epochs: real_epoch_line(row, epochs) if row["epoch"] < 3
                        else os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(SystemExit):
        train.main([*TINY, "--epochs", "4", "--resume"])
    monkeypatch.setattr(runs, "epoch_line", real_epoch_line)
    assert checkpoint_of(folder)["epoch"] == 3 and not (folder / "summary.json").exists()
    (folder / "summary.json").write_text(json.dumps({"last_epoch": 2}))  # as an older train.py left it behind
    capsys.readouterr()
    train.main(["--teacher", "resnet8", *TINY, "--epochs", "2"])
    assert "1. finish training resnet8 alone, 4 epochs, in runs/fake/resnet8" in capsys.readouterr().out
    student = json.loads(Path("runs/fake/resnet8-resnet8-srd-seed0/config.json").read_text())
    assert checkpoint_of(folder)["epoch"] == 4 and student["teacher_sha256"] == data.digest_of(folder / "last.pt",
                                                                                                 "sha256")


def test_a_teacher_of_other_data_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(data.FAKE_SIZES, "fake", (2000, 50))  # subsets of 100 and 200 images
    train.main([*TINY, "--epochs", "1", "--train-subset", "100", "--out", str(tmp_path / "teacher")])
    teacher = tmp_path / "teacher/last.pt"
    train.main(["--teacher", "resnet8", "--teacher-ckpt", str(teacher), *TINY, "--epochs", "1", "--train-subset", "200",
                "--out", str(tmp_path / "student")])
    assert f"note: the teacher in {teacher} was trained with --train-subset 100; this run has 200" in \
        capsys.readouterr().out


# ---- tracebacks and wrong statuses -------------------------------------------------------------------------------

def test_sigterm_and_ctrl_c_together_are_one_stop_reported_as_sigterm(tmp_path):
    process = start_and_wait_for_epoch_1([*SMALL, "--epochs", "400", "--out", str(tmp_path / "run")])
    try:
        os.kill(process.pid, signal.SIGTERM)
        os.kill(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 143 and "stopped by SIGTERM" in stderr, stderr
    assert "race condition" not in stderr and "Traceback" not in stderr and "Exception ignored" not in stderr


def test_a_stop_while_torch_loads_is_one_line(tmp_path):
    process = subprocess.Popen([sys.executable, "train.py", *TINY, "--out", str(tmp_path / "run")], cwd=PROJECT,
                               text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(0.5)  # the interpreter is up; torch takes seconds to import
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert (process.returncode, stderr) == (130, "stopped while starting: nothing was written\n")
    assert not (tmp_path / "run").exists()


def test_refusals_that_came_late_come_first(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    message = exit_message(["--teacher", "resnet8", "--student", "resnet8x4", "--projector", "none", *TINY[2:]])
    assert "--projector none compares the features as they are, but their widths differ (resnet8x4 256, resnet8 " \
           "64)" in message
    message = exit_message(["--teacher", "resnet8", *TINY, "--out", "runs/fake/resnet8"])
    assert "--out runs/fake/resnet8 is where this job trains its teacher resnet8" in message
    assert not Path("runs").exists()  # neither trained a teacher first
    for flag in ("--temperature", "--feat-weight", "--kd-weight", "--ce-weight"):
        with pytest.raises(SystemExit):
            train.parse_args([*TINY, flag, "1e200"])
        assert "at most" in capsys.readouterr().err


def test_an_absurd_value_in_a_run_s_record_is_refused_by_name(tmp_path):
    out = tmp_path / "run"
    train.main([*TINY, "--epochs", "1", "--out", str(out)])
    checkpoint = checkpoint_of(out)
    checkpoint["config"]["lr"] = 1e300
    torch.save(checkpoint, out / "last.pt")
    before = snapshot(out)
    message = exit_message(["--resume", str(out), "--epochs", "2"])
    assert f"cannot resume: {out}'s record holds lr 1e+300, out of --lr's range" in message
    assert snapshot(out) == before


# ---- one line that starts, resumes or says done (issue 36) -------------------------------------------------------

def test_the_same_line_starts_resumes_after_sigterm_and_then_says_done(tmp_path):
    def line(out, *extra):
        return [sys.executable, "train.py", *SMALL, "--epochs", "4", "--out", str(out), "--resume", *extra]

    single_thread = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = subprocess.run(line(tmp_path / "straight"), cwd=PROJECT, capture_output=True, text=True, env=single_thread)
    assert straight.returncode == 0 and "nothing was saved in" in straight.stdout, straight.stderr
    process = subprocess.Popen(line(tmp_path / "stopped"), cwd=PROJECT, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=single_thread)
    for text in process.stdout:
        if text.startswith("epoch   2/"):
            process.send_signal(signal.SIGTERM)
            break
    process.communicate(timeout=60)
    assert process.returncode == 143
    again = subprocess.run(line(tmp_path / "stopped"), cwd=PROJECT, capture_output=True, text=True, env=single_thread)
    assert again.returncode == 0 and "resuming" in again.stdout, again.stderr
    for key in ("model", "optimizer", "loader", "rng_cpu"):
        assert equal(checkpoint_of(tmp_path / "straight")[key], checkpoint_of(tmp_path / "stopped")[key]), key
    done = subprocess.run(line(tmp_path / "stopped"), cwd=PROJECT, capture_output=True, text=True, env=single_thread)
    assert (done.returncode, done.stderr) == (0, "") and done.stdout.count("\n") == 1
    assert done.stdout.startswith(f"done: {tmp_path / 'stopped'} finished its 4 epochs before; nothing to train")
    other = subprocess.run(line(tmp_path / "stopped", "--lr", "0.1"), cwd=PROJECT, capture_output=True, text=True)
    assert other.returncode == 1 and "was run with --lr 0.05; this command asks for --lr 0.1" in other.stderr


def test_a_flag_that_would_change_nothing_is_refused_by_name(tmp_path, capsys):
    for flags, useless in ((["--projector", "linear", "--hidden-dim", "512"], "--hidden-dim"),
                           (["--distance", "mse", "--alpha", "3"], "--alpha"), (["--temperature", "2"], "--temperature"),
                           (["--method", "kd", "--norm", "l2", "--alpha", "2"], "--alpha, --norm")):
        message = exit_message(["--teacher", "resnet8", *TINY, *flags, "--out", str(tmp_path / "run")])
        assert message.startswith(f"error: {useless} would change nothing in this run (--method ")
    assert not (tmp_path / "run").exists()
    kd_beside_srd = train.parse_args(["--teacher", "resnet8", *TINY, "--kd-weight", "0.5", "--temperature", "2"])
    assert train.resolve_config(kd_beside_srd)["temperature"] == 2  # the KD term's temperature counts
