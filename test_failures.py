"""Where users stumble first: each failure is one paragraph on stderr, a non-zero exit, and nothing overwritten.

Also a run folder's reliability: one process at a time, a clean Ctrl-C, a read-only folder refused before writing.
"""
import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch

import data
import devices
import models
import train
from test_data import RunsAShellCommand  # a pickle that runs a shell command when loaded

PROJECT = Path(__file__).resolve().parent
TINY = ["--student", "resnet8", "--dataset", "fake", "--device", "cpu"]


def exit_message(argv):
    """train.main(argv)'s exit: the message Python prints to stderr for sys.exit(str), with no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert isinstance(exit_info.value.code, str), exit_info.value.code  # a string exits 1 and prints no traceback
    message = exit_info.value.code
    assert message.startswith("error: ") and "\n\n" not in message and "Traceback" not in message
    return message


def snapshot(folder):
    return {path.name: hashlib.md5(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir()) if path.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A one-epoch resnet8 run on fake data, to copy and damage."""
    folder = tmp_path_factory.mktemp("finished") / "run"
    train.main([*TINY, "--epochs", "1", "--out", str(folder)])
    return folder


@pytest.fixture
def run_copy(finished_run, tmp_path):
    shutil.copytree(finished_run, tmp_path / "run")
    return tmp_path / "run"


# --- CIFAR-100 cannot be downloaded -----------------------------------------------------------------------------

def failing_urlopen(kind):
    def urlopen(url, timeout):
        assert url == data.ARCHIVE_URL
        if kind == "no network":
            raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))
        if kind == "http error":
            raise urllib.error.HTTPError(url, 404, "Not Found", {}, io.BytesIO(b""))
        if kind == "dropped":
            return DroppedConnection(b"the first bytes of the archive")
        return io.BytesIO(b"an HTML error page, not the archive")  # md5 mismatch
    return urlopen


class DroppedConnection(io.BytesIO):
    """A response that delivers some bytes, then loses the connection."""

    def read(self, *args):
        if self.tell():
            raise ConnectionResetError(104, "Connection reset by peer")
        return super().read(*args)


@pytest.mark.parametrize("kind, detail", [("no network", "Temporary failure in name resolution"),
                                          ("http error", "HTTP Error 404: Not Found"),
                                          ("dropped", "Connection reset by peer"),
                                          ("md5 mismatch", "corrupt (md5")])
def test_download_failure_says_what_failed_and_the_ways_out(kind, detail, tmp_path, monkeypatch):
    monkeypatch.setattr(data.urllib.request, "urlopen", failing_urlopen(kind))
    message = exit_message(["--student", "resnet8", "--data-dir", str(tmp_path / "d"), "--device", "cpu",
                            "--epochs", "1", "--out", str(tmp_path / "run")])
    assert detail in message and data.ARCHIVE_URL in message
    assert "cifar-100-python/" in message and "--data-dir" in message and str(tmp_path / "d") in message
    assert not any((tmp_path / "d").glob("*.part"))  # no half-downloaded file left behind
    assert not (tmp_path / "run").exists()  # a failed start makes no run folder


def test_a_wrong_archive_in_the_data_folder_is_reported_and_left_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda *_, **__: pytest.fail("must not download"))
    archive = tmp_path / "cifar-100-python.tar.gz"
    archive.write_bytes(b"someone's other file")
    message = exit_message(["--student", "resnet8", "--data-dir", str(tmp_path), "--device", "cpu",
                            "--epochs", "1", "--out", str(tmp_path / "run")])
    assert "is not the CIFAR-100 archive" in message and "left untouched" in message and data.ARCHIVE_MD5 in message
    assert archive.read_bytes() == b"someone's other file"


def test_downloaded_archive_is_checked_and_unpacked(tmp_path, monkeypatch):
    """The happy path, offline: a served archive with the right md5 lands in --data-dir and loads."""
    pixels = torch.randint(0, 256, (2, 3072), dtype=torch.uint8).numpy()
    source = tmp_path / "source"
    write_batch(source, {b"data": pixels, b"fine_labels": [3, 97]})
    tarball = tmp_path / "archive.tar.gz"
    subprocess.run(["tar", "-czf", str(tarball), "-C", str(source), "cifar-100-python"], check=True)
    monkeypatch.setattr(data, "ARCHIVE_MD5", hashlib.md5(tarball.read_bytes()).hexdigest())
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda *_, **__: io.BytesIO(tarball.read_bytes()))
    images, labels = data.load_cifar100(tmp_path / "d", train=True, download=True)
    assert labels.tolist() == [3, 97] and (tmp_path / "d" / "cifar-100-python.tar.gz").exists()


# --- CIFAR-100 files checked before they are trusted --------------------------------------------------------------

def write_batch(root, payload, name="train"):
    (root / "cifar-100-python").mkdir(parents=True, exist_ok=True)
    with open(root / "cifar-100-python" / name, "wb") as f:
        pickle.dump(payload, f)


def pixels(n, dtype="uint8", high=256):
    return torch.randint(0, high, (n, 3072)).numpy().astype(dtype)


@pytest.mark.parametrize("payload, problem", [
    ({b"data": pixels(20), b"fine_labels": [1] * 15}, "20 images but 15 labels"),
    ({b"data": pixels(4), b"fine_labels": [0, 5, 100, 2]}, "labels should lie in 0..99, got 0 to 100"),
    ({b"data": pixels(4), b"fine_labels": [0, -1, 3, 2]}, "labels should lie in 0..99, got -1 to 3"),
    ({b"data": pixels(4, "float32", 2) / 255, b"fine_labels": [0] * 4}, "pixels should be uint8 (0..255), got float"),
    ({b"data": pixels(4, "int64", 300), b"fine_labels": [0] * 4}, "pixels should be uint8 (0..255), got int64"),
    ({b"data": pixels(4)[:, :1024], b"fine_labels": [0] * 4}, "should be an N x 3072 array, got (4, 1024)"),
    ({b"pixels": pixels(4), b"fine_labels": [0] * 4}, "expected a dict with b'data' and b'fine_labels'"),
    ([1, 2, 3], "expected a dict"),
])
def test_malformed_cifar_files_are_refused_by_name(payload, problem, tmp_path):
    write_batch(tmp_path, payload)
    with pytest.raises(data.DataError) as error:
        data.load_cifar100(tmp_path, train=True)
    assert problem in str(error.value) and str(tmp_path / "cifar-100-python" / "train") in str(error.value)


@pytest.mark.parametrize("cut", [0, 10, 20_000])
def test_truncated_cifar_pickle_is_refused_by_name(cut, tmp_path):
    write_batch(tmp_path, {b"data": pixels(20), b"fine_labels": [1] * 20})
    path = tmp_path / "cifar-100-python" / "train"
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(data.DataError, match="is not a readable CIFAR-100 pickle"):
        data.load_cifar100(tmp_path, train=True)


def test_bad_cifar_file_stops_train_py_and_odd_sizes_are_noted(tmp_path, capsys):
    write_batch(tmp_path, {b"data": pixels(20), b"fine_labels": [1] * 15})
    message = exit_message(["--student", "resnet8", "--data-dir", str(tmp_path), "--no-download", "--device", "cpu",
                            "--epochs", "1", "--out", str(tmp_path / "run")])
    assert "20 images but 15 labels" in message and not (tmp_path / "run").exists()
    write_batch(tmp_path, {b"data": pixels(20), b"fine_labels": [1] * 20}, name="test")
    data.load_cifar100(tmp_path, train=False)
    assert "holds 20 images, not CIFAR-100's 10,000" in capsys.readouterr().out


# --- --resume with a damaged checkpoint or different flags ----------------------------------------------------------

def damage(folder, kind):
    last = folder / "last.pt"
    if kind == "truncated":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    elif kind == "empty":
        last.write_bytes(b"")
    elif kind == "malicious":
        torch.save({"model": RunsAShellCommand(f"touch {folder / 'code-ran'}")}, last)
    elif kind == "another architecture":
        torch.save(dict(torch.load(last, weights_only=True), model=models.build_model("resnet14").state_dict()), last)
    elif kind == "weights only":
        torch.save(models.build_model("resnet8").state_dict(), last)
    elif kind == "a bare tensor":
        torch.save(torch.zeros(3), last)
    elif kind == "epoch as text":
        torch.save(dict(torch.load(last, weights_only=True), epoch="1"), last)
    elif kind == "no accuracy":
        torch.save({k: v for k, v in torch.load(last, weights_only=True).items() if k != "accuracy"}, last)


@pytest.mark.parametrize("kind, says", [("truncated", "is not a readable checkpoint"),
                                        ("empty", "is not a readable checkpoint"),
                                        ("malicious", "holds code or objects a checkpoint should not"),
                                        ("another architecture", "does not fit CifarResNet"),
                                        ("weights only", "is not a checkpoint of a train.py run"),
                                        ("a bare tensor", "is not a checkpoint of a train.py run (model, epoch"),
                                        ("epoch as text", "(epoch: missing or mistyped)"),
                                        ("no accuracy", "(accuracy: missing or mistyped)")])
def test_resume_from_a_damaged_last_pt_names_it_and_what_is_intact(kind, says, run_copy):
    damage(run_copy, kind)
    before = snapshot(run_copy)
    message = exit_message([*TINY, "--resume", "--out", str(run_copy)])
    assert "cannot resume" in message and says in message and str(run_copy / "last.pt") in message
    assert "best.pt (epoch 1," in message and "copy it over last.pt" in message and "log.csv is intact (1 epochs)" in message
    assert "weights_only" not in message  # never torch's advice to load the file unsafely
    assert snapshot(run_copy) == before and not (run_copy / "code-ran").exists()


@pytest.mark.parametrize("flags, recorded", [
    (["--student", "resnet20"], "--student resnet8"),
    (["--lr", "0.1"], "--lr 0.05"),
    (["--seed", "3", "--batch-size", "32"], "--batch-size 64, --seed 0"),
    (["--teacher", "resnet8"], "--teacher None"),
])
def test_resume_refuses_flags_that_differ_from_the_run(flags, recorded, run_copy):
    argv = [*TINY, "--resume", "--out", str(run_copy), *flags]  # the last --student counts
    before = snapshot(run_copy)
    message = exit_message(argv)
    assert f"was run with {recorded};" in message and "only --epochs may change its length" in message
    assert snapshot(run_copy) == before


def test_resume_may_extend_the_run_and_change_speed_switches_but_not_undo_epochs(run_copy, capsys):
    summary = train.main([*TINY, "--resume", "--out", str(run_copy), "--epochs", "2", "--no-compile",
                          "--data-dir", "elsewhere", "--lr", "0.05"])  # --lr as recorded is no change
    assert summary["last_epoch"] == 2
    message = exit_message([*TINY, "--resume", "--out", str(run_copy), "--epochs", "1"])
    assert "has completed 2 epochs; --epochs 1 would end them" in message
    capsys.readouterr()
    assert train.main([*TINY, "--resume", "--out", str(run_copy)])["last_epoch"] == 2
    assert capsys.readouterr().out == f"done: {run_copy} finished its 2 epochs before; nothing to train (results: " \
                                      f"{run_copy / 'summary.json'})\n"  # one line, and nothing loaded


def test_relative_teacher_checkpoint_is_recorded_whole_and_resumes_from_anywhere(finished_run, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.chdir(finished_run.parent)
    argv = ["--teacher", "resnet8", "--teacher-ckpt", "run/last.pt", *TINY, "--epochs", "1"]
    train.main([*argv, "--out", str(tmp_path / "student")])
    assert json.loads((tmp_path / "student" / "config.json").read_text())["teacher_ckpt"] == str(finished_run / "last.pt")
    monkeypatch.chdir(tmp_path)  # elsewhere: the same file by its whole path is no change
    argv[3] = str(finished_run / "last.pt")
    assert train.main([*argv, "--epochs", "2", "--out", "student", "--resume"])["last_epoch"] == 2


@pytest.mark.parametrize("device, says", [("gpu", "is not a device name torch knows"),
                                          ("mps", "this project trains on cpu or cuda"),
                                          ("cuda", "sees no CUDA device here"),
                                          ("cuda:1", "sees no CUDA device here")])
def test_a_device_this_machine_lacks_is_refused_before_anything_is_made(device, says, tmp_path):
    if torch.cuda.is_available() and device.startswith("cuda"):
        pytest.skip("this machine has CUDA")
    message = exit_message([*TINY, "--device", device, "--out", str(tmp_path / "run")])
    assert says in message and not (tmp_path / "run").exists()


# --- torch.compile failing ----------------------------------------------------------------------------------------

def test_compile_failure_stops_with_its_first_lines_and_the_way_out(tmp_path, monkeypatch):
    import torch._functorch.config
    import torch._inductor.config
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("/nonexistent/c++",))  # as on a machine with no compiler
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)  # compile for real, not from a cache
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", False)
    config = train.resolve_config(train.parse_args([*TINY, "--epochs", "1", "--compile"]))
    with pytest.raises(SystemExit) as exit_info:
        train.run(config, tmp_path / "run", datasets=(data.fake_cifar100(64, seed=0), data.fake_cifar100(50, seed=1)))
    message = str(exit_info.value.code)
    assert message.startswith("error: torch.compile failed on the training step")
    assert "No working C++ compiler" in message and "--no-compile" in message
    assert not (tmp_path / "run" / "last.pt").exists()
    torch._dynamo.reset()


# --- non-finite flags and losses ------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags", [["--lr", "nan"], ["--lr", "inf"], ["--feat-weight", "nan"],
                                   ["--temperature", "inf"], ["--alpha=-inf"], ["--weight-decay", "nan"]])
def test_non_finite_flags_are_refused(flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args([*TINY, *flags])
    assert exit_info.value.code == 2 and "is not a finite number" in capsys.readouterr().err


@pytest.mark.parametrize("flags, says", [(["--lr", "0"], "argument --lr: must be more than 0 and at most 10, got 0"),
                                         (["--kd-weight", "-1"],
                                          "argument --kd-weight: must be at least 0 and at most 1000, got -1"),
                                         (["--milestones", "0", "10"], "argument --milestones: must be at least 1"),
                                         (["--batch-size", "1"], "argument --batch-size: must be at least 2 (BatchNorm"),
                                         (["--seed", "99999999999999999999999"], "argument --seed: must be at least 0 "
                                                                                 "and at most 9223372036854775807"),
                                         (["--seed", "-1"], "argument --seed: must be at least 0"),
                                         (["--lr", "1e300"], "argument --lr: must be more than 0 and at most 10, got"),
                                         (["--weight-decay", "1e300"], "--weight-decay: must be at least 0 and at most 1"),
                                         (["--hidden-dim", "100000000"], "--hidden-dim: must be at least 1 and at most "
                                                                         "16384"),
                                         (["--milestones", "5", "3", "1"], "--milestones must increase"),
                                         (["--epochs", "4", "--milestones", "2", "5"], "--milestones 5 is beyond --epochs 4")])
def test_out_of_range_flags_are_refused(flags, says, capsys):
    with pytest.raises(SystemExit):
        train.parse_args([*TINY, *flags])
    assert says in capsys.readouterr().err


# --- the run folder: read-only, one process at a time, Ctrl-C -------------------------------------------------------

def test_read_only_run_folder_is_refused_before_anything_is_written(run_copy):
    os.chmod(run_copy, 0o555)
    immutable = False
    try:
        if os.geteuid() == 0:  # root writes through permission bits: make the folder immutable instead
            immutable = subprocess.run(["chattr", "+i", str(run_copy)], capture_output=True).returncode == 0
        probe = run_copy / "probe"
        try:
            probe.touch()
            probe.unlink()
            pytest.skip("cannot make a folder read-only here (root without chattr)")
        except OSError:
            pass
        before = snapshot(run_copy)
        message = exit_message([*TINY, "--resume", "--epochs", "2", "--out", str(run_copy)])
        assert f"cannot write in {run_copy}" in message and "nothing was written" in message
        assert snapshot(run_copy) == before
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(run_copy)], check=True)
        os.chmod(run_copy, 0o755)


def start_and_wait_for_epoch_1(args):
    """A train.py process, once it has written its first epoch's checkpoint."""
    process = subprocess.Popen([sys.executable, "train.py", *args], cwd=PROJECT, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    for line in process.stdout:
        if line.startswith("epoch   1/"):
            break
    return process


def test_one_process_per_folder_and_a_clean_ctrl_c(tmp_path, capsys):
    out = tmp_path / "run"
    first = start_and_wait_for_epoch_1([*TINY, "--epochs", "40", "--out", str(out)])
    try:
        second = subprocess.run([sys.executable, "train.py", *TINY, "--epochs", "40", "--out", str(out), "--resume"],
                                cwd=PROJECT, capture_output=True, text=True, timeout=120)
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert f"{out} is in use by process {first.pid} on " in second.stderr
        first.send_signal(signal.SIGINT)
        _, stderr = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 130 and "Traceback" not in stderr, stderr
    epoch = torch.load(out / "last.pt", weights_only=True)["epoch"]
    assert f"interrupted: epoch {epoch} is the last complete one" in stderr and "--resume" in stderr
    assert not list(out.glob("*.tmp")) and (out / ".lock").read_text() == ""  # released, nothing half-written
    logged = [int(line.split(",")[0]) for line in (out / "log.csv").read_text().splitlines()[1:]]
    assert logged == list(range(1, epoch + 1))  # the row and the checkpoint of an epoch: both or neither

    (out / ".lock").write_text("process 1 on a host, since long ago")  # as a run killed by SIGKILL leaves it
    summary = train.main([*TINY, "--epochs", str(epoch + 1), "--out", str(out), "--resume"])
    assert summary["last_epoch"] == epoch + 1 and "ended without releasing it (killed?); taking it over" in capsys.readouterr().out


def test_config_is_printed_readably(tmp_path, capsys):
    train.run(train.resolve_config(train.parse_args([*TINY, "--epochs", "1", "--lr", "0.1"])), tmp_path / "run",
              datasets=(data.fake_cifar100(64, seed=0), data.fake_cifar100(50, seed=1)))
    out = capsys.readouterr().out
    assert f"run in {tmp_path / 'run'}: student=resnet8 teacher=None" in out
    described = " ".join(out[:out.index("\nepoch ")].split())  # the configuration's lines, joined
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert all(f"{key}={value}" in described for key, value in recorded.items() if key != "data_md5"), described
    assert "epochs=1 milestones=[1]" in described and "lr=0.1" in described
    assert max(map(len, out[:out.index("\nepoch ")].splitlines())) <= 120


# --- a newcomer's first hour ----------------------------------------------------------------------------------------

def test_on_a_cpu_a_long_job_is_refused_first_with_its_estimate_and_what_to_run_instead(tmp_path, monkeypatch,
                                                                                      capsys):
    monkeypatch.setattr(train, "step_seconds", lambda config: 2.0)  # this CPU's pace, as the timed steps found it
    job = ["--teacher", "resnet32x4", "--student", "resnet8x4", "--data-dir", str(tmp_path / "none"), "--no-download",
           "--device", "cpu", "--out", str(tmp_path / "run")]
    message = exit_message(job)
    # 240 epochs x 782 steps x 2 s = 4.3 days, twice (the teacher first), said before the data is even looked for
    assert "error: no CUDA device: on this CPU the job needs about 8.7 days (the teacher resnet32x4 (4.3 days), " \
           "then resnet8x4 srd (4.3 days), 240 epochs each" in message
    assert f"A CPU suits a short real-data experiment instead (the README's 'No GPU?'): {devices.CPU_EXPERIMENT}; " \
           f"to train this job here anyway, add --allow-slow" in message
    assert "data:" not in capsys.readouterr().out and not (tmp_path / "run").exists()  # nothing heavy came first
    assert "no CIFAR-100 at" in exit_message([*job, "--allow-slow"])  # it goes on, to the data
    assert "warning: no CUDA device: on this CPU the job needs about 8.7 days" in capsys.readouterr().out
    monkeypatch.setattr(train, "step_seconds", lambda config: 0.07)  # 240 x 782 x 0.07 s = 3.6 h: under 4 h
    exit_message(job[2:])  # the student alone: said, not refused
    assert "note: no CUDA device: on this CPU the job needs about 3.6 h (resnet8x4 alone (3.6 h)" in \
        capsys.readouterr().out
    tiny = train.resolve_config(train.parse_args([*TINY, "--epochs", "2"]))  # 2 x 2,000 images
    devices.advise_cpu(tiny, None, lambda config: pytest.fail("timed"))
    assert capsys.readouterr().out == ""  # a tiny run is neither timed nor warned about


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for flag, default in (("weight of the feature distance D (srd)", "2.0"), ("KD temperature", "4.0"),
                          ("exponent of the logsum / pow distance", "4.0"), ("training batch size", "64"),
                          ("SGD weight decay, on every parameter", "0.0005"), ("hidden width of the mlp projector",
                                                                               "1024")):
        assert f"{flag} (default: {default})" in help_text, flag
    assert "(default: None)" not in help_text
    assert "python train.py --teacher resnet32x4 --student resnet8x4" in help_text  # the docstring's examples


def test_a_teacher_checkpoint_that_is_missing_or_a_folder(tmp_path):
    message = exit_message(["--teacher", "resnet8", "--teacher-ckpt", str(tmp_path / "nowhere.pth"), *TINY])
    assert message.count(str(tmp_path / "nowhere.pth")) == 1
    assert "the published CRD teachers are linked in the README ('Using the published teachers')" in message
    message = exit_message(["--teacher", "resnet8", "--teacher-ckpt", str(tmp_path), *TINY])
    assert f"{tmp_path} is a folder, not a checkpoint file" in message
    readme = (PROJECT / "README.md").read_text()
    assert "### Using the published teachers" in readme
    assert "https://github.com/megvii-research/mdistiller/releases/tag/checkpoints" in readme


def test_the_unpacked_folder_itself_is_accepted_as_data_dir(tmp_path):
    write_batch(tmp_path, {b"data": pixels(3), b"fine_labels": [4, 5, 6]})
    images, labels = data.load_cifar100(tmp_path / "cifar-100-python", train=True)
    assert labels.tolist() == [4, 5, 6]


@pytest.mark.parametrize("kind", ["no network", "md5 mismatch"])
def test_a_failed_download_leaves_no_folder(kind, tmp_path, monkeypatch):
    monkeypatch.setattr(data.urllib.request, "urlopen", failing_urlopen(kind))
    exit_message(["--student", "resnet8", "--data-dir", str(tmp_path / "a" / "b"), "--device", "cpu",
                  "--out", str(tmp_path / "run")])
    assert list(tmp_path.iterdir()) == []


def test_resume_needs_a_folder_or_the_job_s_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--resume"])
    assert exit_info.value.code == 2
    assert "--student is required (to resume, --resume FOLDER or the job's own command with --resume)" in \
        capsys.readouterr().err
