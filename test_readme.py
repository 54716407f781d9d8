"""The READMEs' code runs as written: the losses.py snippet, and every train.py and bench.py command line parses (in
README.md, experiments/README.md and docs/); the README stays short and opens with the idea."""
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import bench
import devices
import train
from test_report import call_report, read_rows, write_run

PROJECT = Path(__file__).resolve().parent
README = (PROJECT / "README.md").read_text()
EXPERIMENTS = (PROJECT / "experiments" / "README.md").read_text()
ALL_DOCS = "\n".join([README, EXPERIMENTS, *(path.read_text() for path in sorted((PROJECT / "docs").glob("*.md")))])


def commands(text, script):
    """The argv of every `python <script>` line in text, with `for seed in ...; do ... done` loops unrolled."""
    found, seeds = [], None
    for line in text.splitlines():
        loop = re.fullmatch(r"for seed in ([\d ]+); do", line.strip())
        if loop:
            seeds = loop.group(1).split()
        elif line.strip() == "done":
            seeds = None
        elif line.strip().startswith(f"python {script}"):  # a command in a list item is indented
            argv = shlex.split(line.split("#")[0])[2:]
            found += [[a.replace("$seed", seed) for a in argv] for seed in seeds] if seeds else [argv]
    return found


def test_losses_snippet_runs_next_to_a_copy_of_losses(tmp_path):
    section = README[README.index("### `losses.py`"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    shutil.copy(PROJECT / "losses.py", tmp_path)
    (tmp_path / "snippet.py").write_text(snippet)
    result = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"loss -?\d+\.\d{3}\n", result.stdout)


def test_the_readme_is_short_and_opens_with_the_idea():
    assert len(README.splitlines()) <= 200
    assert [line for line in README.splitlines() if line.startswith("## ")][:2] == ["## The idea", "## Your first hour"]


def test_every_train_command_parses():
    found = commands(ALL_DOCS, "train.py")
    assert len(found) >= 15  # the first hour's, the paper's table's, the GPU checks' (the lists: test_experiments.py)
    for argv in found:
        train.parse_args(argv)  # argparse exits (fails the test) on a wrong flag


def test_every_bench_command_parses():
    found = commands(ALL_DOCS, "bench.py")
    assert len(found) >= 2
    for argv in found:
        bench.parse_args([*argv, "--device", "cpu", "--pipelines", "reference"] if "--device" not in argv else argv)


def test_the_cpu_experiment_is_the_command_train_py_advises():
    first_hour = README[README.index("## Your first hour"):README.index("## Results")]
    assert shlex.split(devices.CPU_EXPERIMENT)[2:] in commands(first_hour, "train.py")


def test_readme_commands_make_one_row_per_pair_and_method(tmp_path):
    """The README's commands that reproduce the paper's table, as configurations (no training): four rows of three
    seeds."""
    section = EXPERIMENTS[EXPERIMENTS.index("## 0. The paper's own"):]
    for i, argv in enumerate(commands(section, "train.py")):
        write_run(tmp_path / str(i), train.resolve_config(train.parse_args([*argv, "--device", "cpu"])), 70.0 + i)
    code, _, stderr = call_report(tmp_path, "--no-plot")
    assert code == 0, stderr
    rows = read_rows(tmp_path / "report.csv")
    assert sorted((r["teacher"], r["student"], r["method"], r["seeds"]) for r in rows) == [
        ("", "resnet8x4", "none", "0 1 2"), ("resnet32x4", "resnet8x4", "kd", "0 1 2"),
        ("resnet32x4", "resnet8x4", "srd", "0 1 2"), ("wrn_40_2", "wrn_16_2", "srd", "0 1 2")]
