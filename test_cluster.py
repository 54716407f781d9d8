"""A run list beyond one process (issue 36): experiments/smoke.txt (a teacher and two students, synthetic data) run in
the README's two forms as written (its blocks are read from the README, the smoke list set as their LIST):
by xargs, stopped with Ctrl-C and run again; and as a real Slurm's job array, one student requeued mid-run, beside a
list whose failing teacher must cancel its students. A stopped run must end equal, bit for bit, to an uninterrupted
run of its line, each epoch trained once. Runs go to a folder under tmp_path, never to the project's runs/."""
import collections
import csv
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

PROJECT = Path(__file__).resolve().parent
SMOKE = (PROJECT / "experiments" / "smoke.txt").read_text().splitlines()
LIST = r"\bLIST=experiments/[\w.-]+\.txt\b"  # the list a README block runs
TIMING = {"epoch_time_s", "images_per_s", "warmup_s"}  # the log's columns that differ between equal runs


def readme_block(word):
    """The READMEs' bash block holding `word` and "$LIST" (the same in each that shows it), set to run the smoke list."""
    texts = [path.read_text() for path in (PROJECT / "README.md", PROJECT / "experiments" / "README.md")
             if path.exists()]
    found = [block for text in texts for block in re.findall(r"```bash\n(.*?)```", text, re.S)
             if word in block and '"$LIST"' in block]
    assert found and all(len(re.findall(LIST, block)) == 1 for block in found), f'no bash block with {word} and "$LIST" sets LIST once: {found}'
    blocks = {re.sub(LIST, "LIST=experiments/smoke.txt", block) for block in found}
    assert len(blocks) == 1, f'the READMEs should show one bash block with {word} and "$LIST": {blocks}'
    return blocks.pop()


def project_folder(folder, lines=SMOKE):
    """folder set up as the project's root for the list `lines`; returns the environment to run it in: the test's
    Python first on PATH as `python` (a wrapper: a link to a venv's python would run without the venv)."""
    (folder / "experiments").mkdir(parents=True)
    (folder / "experiments" / "smoke.txt").write_text("\n".join(lines) + "\n")
    for module in PROJECT.glob("*.py"):
        (folder / module.name).symlink_to(module)
    (folder / "bin").mkdir()
    (folder / "bin" / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (folder / "bin" / "python").chmod(0o755)
    return {**os.environ, "PATH": f"{folder / 'bin'}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}


def out_folder(line):
    return Path(re.search(r"--out (\S+)", line).group(1))


def epochs_logged(folder):
    return max(0, len((folder / "log.csv").read_text().splitlines()) - 1) if (folder / "log.csv").exists() else 0


def wait_until(condition, what, seconds, job=None):
    deadline = time.monotonic() + seconds
    while not condition():
        assert job is None or job.poll() is None, f"the job ended (exit {job.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {seconds} s"
        time.sleep(0.5)


def released(folder):
    """Whether no process holds the run folder's lock (a run stopped by a signal takes a moment to exit)."""
    if not (folder / ".lock").exists():
        return True
    with open(folder / ".lock") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
    return True


def log_rows(folder):
    with open(folder / "log.csv") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The list's teacher and first student, each run once from start to end: what a stopped run must equal."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    env = project_folder(folder)
    for line in SMOKE[:2]:
        result = subprocess.run(["sh", "-c", line], cwd=folder, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
    return folder


def assert_same_runs(folder, reference):
    """The list's teacher and first student in folder ended with the weights and the log of the reference's."""
    for out in map(out_folder, SMOKE[:2]):
        assert (folder / out / "summary.json").exists()
        ours, theirs = (torch.load(f / out / "last.pt", weights_only=True) for f in (folder, reference))
        for part in ("model", "projector"):
            assert ours[part].keys() == theirs[part].keys()
            assert all(torch.equal(ours[part][k], theirs[part][k]) for k in ours[part]), (out, part)
        assert log_rows(folder / out) == log_rows(reference / out)  # each epoch once, the same losses and accuracies


def epoch_lines(output):
    """How often each (epoch, of epochs) line was printed: a line per epoch trained."""
    return collections.Counter(re.findall(r"^epoch +(\d+)/(\d+) ", output, re.M))


def test_xargs_form_stopped_by_ctrl_c_and_run_again_trains_each_epoch_once(tmp_path, uninterrupted):
    env, block = project_folder(tmp_path), readme_block("xargs")
    student = tmp_path / out_folder(SMOKE[1])
    with open(tmp_path / "first.out", "w") as first:  # Ctrl-C signals the terminal's foreground process group
        job = subprocess.Popen(["bash", "-c", block], cwd=tmp_path, env=env, stdout=first, stderr=subprocess.STDOUT,
                               start_new_session=True)
        wait_until(lambda: epochs_logged(student) >= 1, "student epoch", 300, job)
        os.killpg(job.pid, signal.SIGINT)
        job.wait(timeout=60)
        wait_until(lambda: all(released(tmp_path / out_folder(line)) for line in SMOKE), "end of the stopped runs", 60)
    assert not (student / "summary.json").exists(), "the Ctrl-C came after the student finished"
    second = subprocess.run(["bash", "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert re.search(rf"^done:.*{out_folder(SMOKE[0])}", second.stdout, re.M), second.stdout  # the teacher: done
    output = (tmp_path / "first.out").read_text() + second.stdout
    assert epoch_lines(output) == {("1", "2"): 1, ("2", "2"): 1, ("1", "3"): 2, ("2", "3"): 2, ("3", "3"): 2}, output
    assert_same_runs(tmp_path, uninterrupted)


def test_slurm_form_task_fails_past_the_list_end_and_outside_the_project(tmp_path):
    """What a task runs (the block's $run, as sbatch --wrap's /bin/sh script), where `sed ... | sh` would exit 0."""
    run = re.search(r"^run=(.*)$", readme_block("sbatch"), re.M).group(1)
    for cwd, task in ((PROJECT, str(len(SMOKE) + 1)), (tmp_path, "2")):
        env = {**os.environ, "LIST": "experiments/smoke.txt", "SLURM_ARRAY_TASK_ID": task}
        task_run = subprocess.run(["bash", "-c", f'run={run}; sh -c "$run"'], cwd=cwd, env=env, capture_output=True)
        assert task_run.returncode != 0, (cwd, task)


def slurm(*argv):
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{' '.join(argv)}: {result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def slurm_here():
    """Skips unless a Slurm controller answers and its one node is this machine (tmp_path is this machine's alone)."""
    if not shutil.which("sbatch"):
        pytest.skip("no sbatch on PATH")
    try:  # without a slurm.conf, scontrol retries for a minute
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=15)
        nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        pytest.skip("no Slurm controller answered within 15 s")
    if ping.returncode or nodes.returncode:
        pytest.skip(f"no Slurm controller answers: {(ping.stdout + ping.stderr).strip()}")
    if set(nodes.stdout.split()) != {socket.gethostname().split(".")[0]}:
        pytest.skip(f"Slurm's nodes ({' '.join(nodes.stdout.split())}) are not this machine alone")


def queued():
    """The job ids Slurm still holds pending or running (array tasks by their array's id)."""
    return set(slurm("squeue", "-h", "-o", "%F").split())


def submit(block, cwd, env):
    result = subprocess.run(["bash", "-c", block], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return re.search(r"Submitted batch job (\d+)", result.stdout).group(1)


def job_fields(job):
    """{task: (JobState, Restarts)} as scontrol tells (no accounting here); tasks that never ran may share a record."""
    records = slurm("scontrol", "show", "job", job).split("\n\n")
    return {re.search(r"ArrayTaskId=(\S+)", r).group(1): re.search(r"JobState=(\S+).*?Restarts=(\d+)", r, re.S).groups()
            for r in records if r.strip()}


def test_slurm_form_requeued_student_resumes_and_a_failed_teacher_cancels_its_students(slurm_here, uninterrupted,
                                                                                      tmp_path):
    block, lists, failing = readme_block("sbatch"), tmp_path / "list", tmp_path / "failing"
    env, failing_env = project_folder(lists), project_folder(failing, [SMOKE[0] + " --no-such-flag", *SMOKE[1:]])
    array, failing_array = submit(block, lists, env), submit(block, failing, failing_env)
    try:
        wait_until(lambda: epochs_logged(lists / out_folder(SMOKE[1])) >= 1, "student epoch", 300)
        slurm("scontrol", "requeue", f"{array}_2")  # as a preemption would: SIGTERM, then the same line queued again
        wait_until(lambda: array not in queued(), "end of the array", 600)
        assert failing_array not in queued(), slurm("scontrol", "show", "job", failing_array)  # cancelled, not pending
    finally:  # a failed test leaves no array pending (a teacher ends by itself in seconds)
        subprocess.run(["scancel", array, failing_array], capture_output=True, timeout=60)

    teacher_log, = (lists / "runs").glob("slurm-*_1.out")
    assert job_fields(teacher_log.stem.removeprefix("slurm-")) == {"1": ("COMPLETED", "0")}
    assert job_fields(array) == {"2": ("COMPLETED", "1"), "3": ("COMPLETED", "0")}  # task 2 ran twice (requeued)
    log = (lists / "runs" / f"slurm-{array}_2.out").read_text()
    assert "DUE TO JOB REQUEUE" in log and "SIGTERM" in log and "resuming" in log, log  # stopped, then resumed
    assert epoch_lines(log) == {("1", "3"): 1, ("2", "3"): 1, ("3", "3"): 1}, log
    assert_same_runs(lists, uninterrupted)
    assert (lists / out_folder(SMOKE[2]) / "summary.json").exists()

    failed_teacher, = (failing / "runs").glob("slurm-*_1.out")
    assert job_fields(failed_teacher.stem.removeprefix("slurm-")) == {"1": ("FAILED", "0")}
    assert job_fields(failing_array) == {"2-3": ("CANCELLED", "0")}
    assert not (failing / "runs" / "smoke").exists()
