"""A run folder damaged the ways real ones are over weeks (a file deleted or edited by hand, a disk that fills, a sync
tool that truncates, an immutable file): one paragraph, nothing lost, never a silent change of the experiment."""
import errno
import json
import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import data
import models
import runs
import train
from test_failures import exit_message, pixels, snapshot, start_and_wait_for_epoch_1, write_batch

PROJECT = Path(__file__).resolve().parent
TINY = ["--student", "resnet8", "--dataset", "fake", "--device", "cpu"]


@pytest.fixture(autouse=True)
def small_fake_data(monkeypatch):
    monkeypatch.setitem(data.FAKE_SIZES, "fake", (64, 50))  # an epoch in a fraction of a second


@pytest.fixture
def run(tmp_path):
    """A finished one-epoch run, without its summary: resumable to --epochs 2."""
    folder = tmp_path / "run"
    train.main([*TINY, "--epochs", "1", "--out", str(folder)])
    (folder / "summary.json").unlink()
    return folder


def refused_unchanged(argv, folder, resumed=False):
    """The refusal's message, checking that nothing in folder changed (but config.json, which a resumed run rewrites
    with its new --epochs before its first epoch, and only in that)."""
    before = snapshot(folder)
    recorded = json.loads((folder / "config.json").read_text()) if resumed else None
    message = exit_message(argv)
    after = snapshot(folder)
    if resumed:
        del before["config.json"], after["config.json"]
        assert dict(json.loads((folder / "config.json").read_text()), epochs=recorded["epochs"]) == recorded
    assert after == before and not list(folder.glob("*.tmp"))
    return message


# ---- 1. the configuration a run was trained with ---------------------------------------------------------------

def test_without_config_json_the_checkpoint_s_record_is_checked(run, capsys):
    (run / "config.json").unlink()
    message = refused_unchanged([*TINY, "--resume", "--out", str(run), "--lr", "0.2", "--epochs", "2"], run)
    assert "was run with --lr 0.05; this command asks for --lr 0.2" in message
    assert "config.json is missing" in capsys.readouterr().out  # which file was trusted
    assert train.main(["--resume", str(run), "--epochs", "2"])["last_epoch"] == 2
    assert json.loads((run / "config.json").read_text())["lr"] == 0.05  # rewritten from the record
    assert [float(row["lr"]) for row in runs.logged_rows(run)] == [0.05, pytest.approx(5e-3)]  # milestones [1]


def test_a_config_json_edited_by_hand_does_not_change_the_experiment(run, capsys):
    (run / "config.json").write_text(json.dumps(dict(json.loads((run / "config.json").read_text()), lr=0.2)))
    train.main(["--resume", str(run), "--epochs", "2"])
    assert "differs from the configuration last.pt was trained with (lr): last.pt's record is trusted" in \
        capsys.readouterr().out
    assert json.loads((run / "config.json").read_text())["lr"] == 0.05


@pytest.mark.parametrize("content, says", [("[]", "is not a JSON object"), ('{"student": "resnet8"}', "lacks"),
                                           (None, "is missing")])
def test_an_older_checkpoint_without_a_record_needs_a_whole_config_json(content, says, run):
    checkpoint = torch.load(run / "last.pt", weights_only=True)
    del checkpoint["config"]  # as train.py wrote checkpoints before they carried it
    torch.save(checkpoint, run / "last.pt")
    (run / "config.json").unlink() if content is None else (run / "config.json").write_text(content)
    message = refused_unchanged([*TINY, "--resume", "--out", str(run), "--epochs", "2"], run)
    assert says in message and "records no configuration" in message


# ---- 2. a checkpoint called good must be good ------------------------------------------------------------------

def poison_after(monkeypatch, epochs):
    """After the first `epochs` epochs of a (resumed) run, an infinite BatchNorm running variance in the student, as a
    diverging run can leave while its mean loss stays finite."""
    students, done = [], []
    real_build, real_epoch = train.build_student, train.train_one_epoch

    def build_and_keep(*args, **kwargs):
        built = real_build(*args, **kwargs)
        students.append(built[0])
        return built

    def epoch_then_poison(*args, **kwargs):
        result = real_epoch(*args, **kwargs)
        done.append(1)
        if len(done) >= epochs:
            students[-1].bn1.running_var.fill_(float("inf"))
        return result

    monkeypatch.setattr(train, "build_student", build_and_keep)
    monkeypatch.setattr(train, "train_one_epoch", epoch_then_poison)


def test_non_finite_buffers_stop_the_run_before_the_checkpoint(run, monkeypatch):
    poison_after(monkeypatch, 1)
    message = refused_unchanged(["--resume", str(run), "--epochs", "2"], run, resumed=True)
    assert "non-finite weights or buffers after epoch 2 (1: bn1.running_var), though its mean loss is finite" in message
    assert f"{run / 'last.pt'} (epoch 1) is the last good checkpoint (its values checked)" in message
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1


def test_a_checkpoint_holding_non_finite_values_is_not_called_good(run, monkeypatch):
    checkpoint = torch.load(run / "last.pt", weights_only=True)
    checkpoint["model"]["bn1.running_var"].fill_(float("inf"))  # as a train.py that checked only the losses saved it
    torch.save(checkpoint, run / "last.pt")
    poison_after(monkeypatch, 1)
    message = refused_unchanged(["--resume", str(run), "--epochs", "2"], run, resumed=True)
    assert "(epoch 1) holds non-finite values too" in message and "last good" not in message


# ---- 3, 4. a full disk, an immutable file -----------------------------------------------------------------------

def test_a_full_disk_stops_with_one_paragraph_and_the_way_back(tmp_path, monkeypatch):
    real_save, checkpoints = torch.save, []

    def disk_fills_at_last_pt(obj, f, *args, **kwargs):  # epoch 1 saves best.pt, then last.pt
        checkpoints.extend(["model" in obj] if isinstance(obj, dict) else [])
        if sum(checkpoints) == 2:
            f.write(b"the first bytes")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_fills_at_last_pt)
    folder = tmp_path / "run"
    message = exit_message([*TINY, "--epochs", "1", "--out", str(folder)])
    assert f"could not save epoch 1 in {folder} (No space left on device; " in message and "MB free on its disk" in message
    assert "best.pt (epoch 1," in message and "holds a full checkpoint: copy it over last.pt" in message
    assert f"continue with: python train.py --resume {folder}" in message
    assert not list(folder.glob("*.tmp")) and not (folder / "last.pt").exists()
    monkeypatch.setattr(torch, "save", real_save)  # space freed; last.pt is still missing
    message = exit_message(["--resume", str(folder)])
    assert f"no checkpoint file at {folder / 'last.pt'}" in message and "copy it over last.pt" in message
    shutil.copy(folder / "best.pt", folder / "last.pt")  # as the message says
    assert train.main(["--resume", str(folder), "--epochs", "2"])["last_epoch"] == 2


def make_immutable(path):
    """chattr +i as root (who writes through permission bits), else chmod; False where neither stops a write."""
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            return False
    else:
        os.chmod(path, 0o444)
    return not os.access(path, os.W_OK)


def test_a_file_the_run_cannot_replace_is_refused_before_training(run):
    if not make_immutable(run / "last.pt"):
        pytest.skip("cannot make a file immutable here")
    try:
        message = refused_unchanged(["--resume", str(run), "--epochs", "2"], run)
        assert "last.pt cannot be replaced: read-only or immutable" in message and "nothing was written" in message
    finally:
        subprocess.run(["chattr", "-i", str(run / "last.pt")], capture_output=True)
        os.chmod(run / "last.pt", 0o644)


def test_a_failed_rename_leaves_no_tmp(tmp_path, monkeypatch):
    def replace_fails(source, target):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(runs.os, "replace", replace_fails)
    with pytest.raises(PermissionError):
        runs.save_atomically("text", tmp_path / "config.json")
    assert list(tmp_path.iterdir()) == []


# ---- 5. one paragraph where a traceback was ---------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"garbage, not a log\n\x00\x01", b"\xff\xfe\x00binary"])
def test_a_damaged_log_is_refused_not_overwritten(content, run):
    (run / "log.csv").write_bytes(content)
    message = refused_unchanged(["--resume", str(run), "--epochs", "2"], run)
    assert "log.csv is unreadable" in message and "its epochs would be lost" in message


def test_a_missing_log_is_said_and_the_run_resumes(run, capsys):
    (run / "log.csv").unlink()
    assert train.main(["--resume", str(run), "--epochs", "2"])["last_epoch"] == 2
    assert "log.csv is missing: the resumed log starts at epoch 2" in capsys.readouterr().out
    assert [row["epoch"] for row in runs.logged_rows(run)] == [2]


def test_a_binary_log_beside_a_truncated_checkpoint(run):
    (run / "log.csv").write_bytes(b"\xff\xfe\x00binary")
    (run / "last.pt").write_bytes((run / "last.pt").read_bytes()[:100])
    message = refused_unchanged(["--student", "resnet8", "--resume", "--out", str(run)], run)
    assert "is not a readable checkpoint" in message and "log.csv is unreadable" in message


@pytest.mark.parametrize("content", ['{"last_epoch": 2', '{"student": "resnet8"}', '{"last_epoch": "two"}'])
def test_a_damaged_teacher_summary_is_named(content, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train.main([*TINY, "--epochs", "1"])  # the teacher run this job would reuse: runs/fake/resnet8
    (tmp_path / "runs/fake/resnet8/summary.json").write_text(content)
    message = exit_message(["--teacher", "resnet8", *TINY, "--epochs", "1"])
    assert "the teacher run this job would reuse is damaged" in message and "summary.json" in message
    assert not (tmp_path / "runs/fake/resnet8-resnet8-srd-seed0").exists()


def test_a_data_dir_that_is_a_file_or_cannot_be_made(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    message = exit_message(["--student", "resnet8", "--data-dir", str(tmp_path / "a-file"), "--device", "cpu",
                            "--epochs", "1", "--out", str(tmp_path / "run")])
    assert f"--data-dir {tmp_path / 'a-file'} is a file, not a folder" in message
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda *_, **__: pytest.fail("must not download"))
    message = exit_message(["--student", "resnet8", "--data-dir", str(tmp_path / "a-file" / "below"), "--device",
                            "cpu", "--epochs", "1", "--out", str(tmp_path / "run")])
    assert f"cannot create --data-dir {tmp_path / 'a-file' / 'below'}" in message
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a-file"]  # no folder, no run


# ---- 6. messages that mislead -----------------------------------------------------------------------------------

@pytest.mark.parametrize("payload, says", [
    ({b"data": pixels(130), b"fine_labels": [[1]] * 130}, "b'fine_labels' should be a flat list of integers, got an "
                                                           "array of shape (130, 1)"),
    ({b"data": pixels(0), b"fine_labels": []}, "it holds no images")])
def test_cifar_files_are_described_as_they_are(payload, says, tmp_path):
    write_batch(tmp_path, payload)
    with pytest.raises(data.DataError, match="is not a CIFAR-100 file") as error:
        data.load_cifar100(tmp_path, train=True)
    assert says in str(error.value)


def test_a_protocol_2_pickle_with_bytes_loads(tmp_path):
    """Protocol 2 stores bytes through _codecs.encode (Python 2's pickle.dump, and Python 3's at protocol 2)."""
    (tmp_path / "cifar-100-python").mkdir()
    with open(tmp_path / "cifar-100-python" / "train", "wb") as f:
        pickle.dump({b"data": pixels(3), b"fine_labels": [7, 8, 9], b"batch_label": b"training batch"}, f, protocol=2)
    assert b"_codecs" in (tmp_path / "cifar-100-python" / "train").read_bytes()
    assert data.load_cifar100(tmp_path, train=True)[1].tolist() == [7, 8, 9]


def test_a_plain_pickle_as_checkpoint_is_one_message_and_no_warning(tmp_path):
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump({"model": [1, 2]}, f)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="is not a readable checkpoint"):
            models.read_checkpoint(tmp_path / "plain.pkl")
    assert not caught, [str(w.message) for w in caught]


def test_a_flag_error_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--student", "resnet8", "--lr", "nan"], cwd=PROJECT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "usage:" not in result.stderr
    assert result.stderr == "error: argument --lr: 'nan' is not a finite number (python train.py --help lists every " \
                            "flag)\n"


# ---- SIGTERM: the same clean stop as Ctrl-C --------------------------------------------------------------------

def test_sigterm_stops_a_run_as_ctrl_c_does(tmp_path):
    out = tmp_path / "run"
    process = start_and_wait_for_epoch_1([*TINY, "--epochs", "40", "--out", str(out)])
    try:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 143 and "Traceback" not in stderr, stderr
    epoch = torch.load(out / "last.pt", weights_only=True)["epoch"]
    assert f"stopped by SIGTERM: epoch {epoch} is the last complete one" in stderr
    assert f"python train.py --resume {out}" in stderr
    assert not list(out.glob("*.tmp")) and (out / ".lock").read_text() == ""
    assert [row["epoch"] for row in runs.logged_rows(out)] == list(range(1, epoch + 1))


# ---- found in review ---------------------------------------------------------------------------------------------

def test_resume_of_a_folder_without_a_run_says_so(tmp_path):
    message = exit_message(["--resume", str(tmp_path / "nowhere")])
    assert f"--resume: no run in {tmp_path / 'nowhere'} (no last.pt, no config.json)" in message


def test_a_lone_best_pt_is_results_a_new_run_keeps(run):
    (run / "last.pt").unlink()
    message = refused_unchanged([*TINY, "--epochs", "1", "--out", str(run)], run)
    assert f"run folder {run} holds results" in message


def test_a_full_disk_at_the_start_is_one_paragraph(tmp_path, monkeypatch):
    def disk_full(obj, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runs, "save_atomically", disk_full)
    message = exit_message([*TINY, "--epochs", "1", "--out", str(tmp_path / "run")])
    assert "could not save the new run's log and configuration in" in message and "No space left on device" in message


def test_an_explicit_folder_without_a_checkpoint_is_not_restarted(tmp_path, monkeypatch):
    """--resume FOLDER continues that folder's run or refuses: it never falls back to the job's teacher part."""
    monkeypatch.chdir(tmp_path)
    train.main([*TINY, "--epochs", "1"])
    (tmp_path / "runs/fake/resnet8/summary.json").unlink()  # an unfinished teacher run
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(train.resolve_config(train.parse_args(
        ["--teacher", "resnet8", *TINY, "--epochs", "1"]))))  # a distillation killed in its first epoch
    message = exit_message(["--resume", str(folder)])
    assert f"no checkpoint file at {folder / 'last.pt'}" in message


def test_an_unfinished_teacher_shorter_than_the_job_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train.main([*TINY, "--epochs", "1"])
    (tmp_path / "runs/fake/resnet8/summary.json").unlink()  # recorded for 1 epoch, and unfinished
    message = exit_message(["--teacher", "resnet8", *TINY, "--epochs", "3"])
    assert "holds an unfinished teacher run of 1 epochs, fewer than this job's 3" in message


def test_a_resumed_run_whose_teacher_file_is_gone_says_so(run, tmp_path):
    shutil.copy(run / "last.pt", tmp_path / "teacher.pt")
    student = tmp_path / "student"
    train.main(["--teacher", "resnet8", "--teacher-ckpt", str(tmp_path / "teacher.pt"), *TINY, "--epochs", "1",
                "--out", str(student)])
    (tmp_path / "teacher.pt").unlink()
    message = exit_message(["--resume", str(student), "--epochs", "2"])
    assert "which is gone: resuming from another teacher would change the experiment" in message


# ---- issue 28: a folder that trusts nothing planted in it, real full disks, power loss, signal races -------------

def test_links_planted_in_the_folder_are_never_written_through(run, tmp_path):
    precious = tmp_path / "precious"
    precious.write_text("keep")
    for name in ("log.csv.tmp", "last.pt.tmp", "best.pt.tmp", "config.json.tmp", "summary.json.tmp"):
        (run / name).symlink_to(precious)  # the temporary names an older train.py used
    assert train.main(["--resume", str(run), "--epochs", "2"])["last_epoch"] == 2
    assert precious.read_text() == "keep" and not (run / "last.pt").is_symlink()
    assert not [path for path in run.glob("*.tmp") if not path.is_symlink()]  # no .tmp of its own left


@pytest.mark.parametrize("kind", ["link", "hard link", "folder", "fifo"])
def test_a_lock_that_is_not_a_plain_file_is_refused_and_not_followed(kind, run, tmp_path):
    precious, lock = tmp_path / "precious", run / ".lock"
    precious.write_text("keep")
    lock.unlink()
    {"link": lambda: lock.symlink_to(precious), "hard link": lambda: os.link(precious, lock), "folder": lock.mkdir,
     "fifo": lambda: os.mkfifo(lock)}[kind]()
    message = exit_message(["--resume", str(run), "--epochs", "2"])
    assert f"cannot take {lock} as the run's lock" in message and "Remove it" in message
    assert precious.read_text() == "keep" and torch.load(run / "last.pt", weights_only=True)["epoch"] == 1


def test_a_teacher_is_judged_by_its_checkpoint_s_record(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(data.FAKE_SIZES, "fake", (2000, 50))  # enough images for a class-balanced subset
    train.main([*TINY, "--epochs", "1", "--train-subset", "100"])  # a teacher of 100 images
    shutil.copytree("runs/fake/subset100/resnet8", "runs/fake/resnet8")  # moved where the full-data job looks
    Path("runs/fake/resnet8/config.json").unlink()
    message = exit_message(["--teacher", "resnet8", *TINY, "--epochs", "1"])
    assert "runs/fake/resnet8 holds a teacher trained with --train-subset 100, not this run's None" in message
    assert not Path("runs/fake/resnet8-resnet8-srd-seed0").exists()


def test_resuming_on_other_data_is_refused_by_name(run, monkeypatch):
    recorded = json.loads((run / "config.json").read_text())["data_md5"]
    real = data.fake_cifar100
    monkeypatch.setattr(data, "fake_cifar100", lambda *a, **k: (real(*a, **k)[0], real(*a, **k)[1].roll(1)))
    message = refused_unchanged(["--resume", str(run), "--epochs", "2", "--data-dir", "other"], run)
    assert "the data differ from those" in message and f"recorded {recorded}" in message and "--data-dir other" in \
        message


def test_a_real_file_size_limit_stops_with_one_paragraph(tmp_path):
    """ulimit -f: a write past it fails with EFBIG (Python ignores SIGXFSZ), and torch.save raises a RuntimeError."""
    import resource
    argv = [sys.executable, "train.py", *TINY, "--train-subset", "100", "--out", str(tmp_path / "run")]
    subprocess.run([*argv, "--epochs", "1"], cwd=PROJECT, capture_output=True, check=True, timeout=120)
    limited = subprocess.run([*argv, "--epochs", "2", "--resume"], cwd=PROJECT, capture_output=True, text=True,
                             timeout=120, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (2 ** 17,) * 2))
    assert limited.returncode == 1 and "Traceback" not in limited.stderr, limited.stderr
    assert f"could not save epoch 2 in {tmp_path / 'run'}" in limited.stderr and "last.pt (epoch 1, " in limited.stderr
    assert "continue with: python train.py --resume" in limited.stderr and not list((tmp_path / "run").glob("*.tmp"))


def test_files_are_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(runs.os, "fsync", lambda fd: events.append(
        "folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file") or real_fsync(fd))
    monkeypatch.setattr(runs.os, "replace", lambda *paths: events.append("rename") or real_replace(*paths))
    runs.save_atomically("text", tmp_path / "config.json")
    assert events == ["file", "rename", "folder"] and (tmp_path / "config.json").read_text() == "text"


def job(tmp_path, *flags):
    """A distillation job (its own teacher first) in a process whose lines arrive as printed."""
    return subprocess.Popen([sys.executable, str(PROJECT / "train.py"), "--teacher", "resnet8", *TINY, "--epochs", "1",
                             "--train-subset", "100", *flags], cwd=tmp_path, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_sigterm_between_the_job_s_parts_tells_the_truth_and_the_way_on(tmp_path, monkeypatch):
    process = job(tmp_path)
    try:
        for line in process.stdout:
            if line.startswith("done:"):  # the teacher part is finished; the distillation starts
                process.send_signal(signal.SIGTERM)
                break
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    student = Path("runs/fake/subset100/resnet8-resnet8-srd-seed0")
    assert process.returncode == 143 and "Traceback" not in stderr, stderr
    assert f"stopped by SIGTERM: no epoch of {student} completed, so nothing can resume" in stderr
    assert "start again with\n  python train.py --teacher resnet8" in stderr
    monkeypatch.chdir(tmp_path)  # the job's command, with --resume too: nothing to resume, so it starts
    monkeypatch.setitem(data.FAKE_SIZES, "fake", (2000, 500))  # the process's data
    argv = ["--teacher", "resnet8", *TINY, "--epochs", "1", "--train-subset", "100"]
    assert exit_message(["--resume", str(student)]).startswith(f"error: --resume: no run in {student}")
    assert train.main([*argv, "--resume"])["last_epoch"] == 1


def test_ctrl_c_pressed_again_and_again_is_one_clean_stop(tmp_path):
    out = tmp_path / "run"
    process = start_and_wait_for_epoch_1([*TINY, "--epochs", "40", "--out", str(out)])
    try:
        for pause in (0.002, 0.01, 0.02, 0.05, 0.1):
            process.send_signal(signal.SIGINT)
            time.sleep(pause)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    epoch = torch.load(out / "last.pt", weights_only=True)["epoch"]
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert f"interrupted: epoch {epoch} is the last complete one" in stderr and f"--resume {out}" in stderr


@pytest.mark.parametrize("field, value", [("lr", "abc"), ("milestones", None), ("epochs", "abc"), ("norm", "xx"),
                                          ("distance", "kl"), ("precision", "fp64")])
def test_a_hand_edited_config_beside_an_older_checkpoint_is_named(field, value, run):
    checkpoint = torch.load(run / "last.pt", weights_only=True)
    del checkpoint["config"]  # an older last.pt: config.json is the record
    torch.save(checkpoint, run / "last.pt")
    (run / "config.json").write_text(json.dumps(dict(json.loads((run / "config.json").read_text()), **{field: value})))
    message = refused_unchanged(["--resume", str(run)], run)
    assert f"record holds {field} {value!r}, not what train.py writes" in message


def test_the_way_on_after_a_stop_drops_resume_with_its_folder(tmp_path, capsys):
    """A job stopped in its teacher part, started as `--resume FOLDER`: the command that continues it is the job's
    own, with --resume once and without the folder as a stray argument (argparse would refuse it)."""
    teacher_folder = tmp_path / "teacher"
    teacher_folder.mkdir()
    torch.save({"epoch": 3}, teacher_folder / "last.pt")
    argv = ["--teacher", "resnet8", "--student", "resnet8", "--resume", str(tmp_path / "student"), "--epochs", "9"]
    with pytest.raises(SystemExit) as exit_info, runs.stops_explained(argv) as job:
        job.update(out=tmp_path / "student", teacher_folder=teacher_folder)
        raise KeyboardInterrupt("SIGINT")
    assert exit_info.value.code == 130
    assert ("epoch 3 is the last complete one; continue the job with\n  python train.py --teacher resnet8 --student "
            "resnet8 --epochs 9 --resume\n") in capsys.readouterr().err


def test_a_recorded_student_that_is_not_a_name_is_one_line(run, capsys):
    checkpoint = torch.load(run / "last.pt", weights_only=True)
    del checkpoint["config"]
    torch.save(checkpoint, run / "last.pt")
    (run / "config.json").write_text(json.dumps(dict(json.loads((run / "config.json").read_text()), student=5)))
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--resume", str(run)])
    assert exit_info.value.code == 2 and "argument --student: invalid choice: '5'" in capsys.readouterr().err


def test_garbage_config_without_last_pt_is_not_blamed_on_an_older_train_py(run):
    (run / "last.pt").unlink()
    (run / "config.json").write_text("garbage")
    message = exit_message(["--resume", str(run)])
    assert f"there is no {run / 'last.pt'}: nothing to resume" in message and "older train.py" not in message


def test_an_empty_log_is_said_and_the_run_resumes(run, capsys):
    (run / "log.csv").write_bytes(b"")
    assert train.main(["--resume", str(run), "--epochs", "2"])["last_epoch"] == 2
    assert "log.csv is empty: the resumed log starts at epoch 2" in capsys.readouterr().out
