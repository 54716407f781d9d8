"""Shared test fixtures: the real CIFAR-100 copy when this machine has one, and single-threaded torch."""
import os
import pathlib
import tarfile

import pytest
import torch

PROJECT = pathlib.Path(__file__).resolve().parent
SHARED_ARCHIVE = PROJECT.parent / "shared" / "data" / "cifar-100-python.tar.xz"


@pytest.fixture(scope="session")
def cifar100_root(tmp_path_factory):
    """A folder holding cifar-100-python/: $CIFAR100_DATA_DIR, else ./data, else ../shared/data's archive unpacked
    once per test session. Tests that use it skip when none exists."""
    if os.environ.get("CIFAR100_DATA_DIR"):
        root = pathlib.Path(os.environ["CIFAR100_DATA_DIR"])
        if not (root / "cifar-100-python" / "train").exists():
            pytest.fail(f"CIFAR100_DATA_DIR={root} holds no cifar-100-python/train")
        return root
    if (PROJECT / "data" / "cifar-100-python" / "train").exists():
        return PROJECT / "data"
    if not SHARED_ARCHIVE.exists():
        pytest.skip(f"no CIFAR-100 copy: neither ./data/cifar-100-python nor {SHARED_ARCHIVE}")
    target = tmp_path_factory.mktemp("cifar100")
    with tarfile.open(SHARED_ARCHIVE) as archive:
        archive.extractall(target, filter="data")  # "data" filter: no absolute paths, links or devices
    return target


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of small tensors, where a second thread adds hand-off cost (far more on a busy 2-core machine).

    Training tests (batch-64 convolutions) keep both threads: there they pay."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
