"""Shared test fixtures: the real CIFAR-100 when this machine has it, and single-threaded torch."""
import os
import pathlib

import pytest
import torch

PROJECT = pathlib.Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def cifar100_root():
    """A folder holding cifar-100-python/, found as a user's would be: $CIFAR100_DATA_DIR (then it must hold one),
    else ./data. Tests that use it skip when there is none."""
    if os.environ.get("CIFAR100_DATA_DIR"):
        root = pathlib.Path(os.environ["CIFAR100_DATA_DIR"])
        if not (root / "cifar-100-python" / "train").exists():
            pytest.fail(f"CIFAR100_DATA_DIR={root} holds no cifar-100-python/train")
        return root
    if not (PROJECT / "data" / "cifar-100-python" / "train").exists():
        pytest.skip("no CIFAR-100: set CIFAR100_DATA_DIR to a folder holding cifar-100-python/, or unpack it in ./data")
    return PROJECT / "data"


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of small tensors, where a second thread adds hand-off cost (far more on a busy 2-core machine).

    Training tests (batch-64 convolutions) keep both threads: there they pay."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
