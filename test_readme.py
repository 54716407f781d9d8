"""The README's code runs as written: the losses.py snippet, and every train.py and bench.py command line parses."""
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import bench
import train

PROJECT = Path(__file__).resolve().parent
README = (PROJECT / "README.md").read_text()


def test_losses_snippet_runs_next_to_a_copy_of_losses(tmp_path):
    section = README[README.index("### `losses.py`"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    shutil.copy(PROJECT / "losses.py", tmp_path)
    (tmp_path / "snippet.py").write_text(snippet)
    result = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"loss -?\d+\.\d{3}\n", result.stdout)


def test_every_train_command_parses():
    commands = [line.split("#")[0] for line in README.splitlines() if line.startswith("python train.py")]
    assert len(commands) >= 8
    for command in commands:
        train.parse_args(shlex.split(command)[2:])  # argparse exits (fails the test) on a wrong flag


def test_every_bench_command_parses():
    commands = [line.split("#")[0] for line in README.splitlines() if line.startswith("python bench.py")]
    assert len(commands) >= 2
    for command in commands:
        bench.parse_args([*shlex.split(command)[2:], "--device", "cpu", "--pipelines", "reference"])
