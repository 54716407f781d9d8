"""CIFAR-100 in, normalised batches out: the whole dataset lives on the training device as uint8.

The reference codebases push every 32x32 image through PIL transforms in DataLoader worker processes; on a modern
GPU that pipeline, not the network, sets the pace. Here the 150 MB of uint8 pixels are copied to the device once and
each epoch is augmented in a few batched tensor operations, with exactly the reference semantics:
torchvision's RandomCrop(32, padding=4) (zero padding) and RandomHorizontalFlip(p=0.5), then Normalize.
"""
import math
import pathlib
import pickle
import tarfile

import numpy as np
import torch

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)  # per-channel statistics of the 50,000 training images
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
ARCHIVE_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
PAD = 4  # RandomCrop(32, padding=4): a 40x40 zero-padded image, 9 x 9 crop positions


class _ArraysOnly(pickle.Unpickler):
    """Unpickles the CIFAR pickles' dicts, lists, bytes and numpy arrays, and nothing else.

    A pickle can name any importable callable (os.system, say) and have it called while loading; refusing every
    global but the three numpy needs to rebuild an array means a tampered file fails here instead of running code."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR-100 pickle holds only numpy "
                                         f"arrays and builtins, so this file is not one (or has been tampered with)")
        if name == "_reconstruct":  # numpy 2 moved it from numpy.core to numpy._core: ask numpy where it lives now
            return np.zeros(0).__reduce__()[0]
        return getattr(np, name)


def load_cifar100(root, train, download=False):
    """(images uint8 N x 3 x 32 x 32, fine labels int64 N) of root/cifar-100-python/{train,test}, original order."""
    folder = pathlib.Path(root) / "cifar-100-python"
    path = folder / ("train" if train else "test")
    if not path.exists() and download:
        from torchvision.datasets.utils import download_url  # only needed once, for the download
        download_url(ARCHIVE_URL, str(root), md5=ARCHIVE_MD5)  # checks the archive's md5, raises on mismatch
        with tarfile.open(pathlib.Path(root) / "cifar-100-python.tar.gz") as archive:
            archive.extractall(root, filter="data")  # "data" filter: no absolute paths, links or devices
    if not path.exists():
        raise FileNotFoundError(f"no CIFAR-100 at {path}: pass download=True (train.py: drop --no-download), point "
                                f"--data-dir at the folder holding cifar-100-python/, or unpack {ARCHIVE_URL} there")
    with open(path, "rb") as f:
        batch = _ArraysOnly(f, encoding="bytes").load()
    images = torch.from_numpy(np.ascontiguousarray(batch[b"data"], dtype=np.uint8)).reshape(-1, 3, 32, 32)
    return images, torch.tensor(batch[b"fine_labels"], dtype=torch.int64)


def crop_and_flip(images, offsets, flips):
    """RandomCrop(32, padding=4) then horizontal flip, for all images at once, as one gather.

    images: uint8 N x 3 x 32 x 32; offsets: N x 2 (top, left) in {0..8}; flips: N bools. Output pixel (i, j) of
    image n is padded pixel (top + i, left + j), or (top + i, left + 31 - j) when flipped: the flip is folded into
    the column index, so cropping and flipping cost a single indexing operation on the padded images."""
    size = images.shape[-1]
    padded = torch.nn.functional.pad(images, (PAD, PAD, PAD, PAD))  # zeros: black pixels, as torchvision pads
    steps = torch.arange(size, device=images.device)
    rows = offsets[:, 0, None] + steps  # N x 32
    cols = offsets[:, 1, None] + torch.where(flips[:, None].bool(), size - 1 - steps, steps)  # N x 32
    n = torch.arange(len(images), device=images.device)[:, None, None, None]
    channels = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[n, channels, rows[:, None, :, None], cols[:, None, None, :]]  # broadcasts to N x 3 x 32 x 32


class Loader:
    """One pass over `images` per `for` loop, as (x float32 normalised, y int64) batches on `device`.

    train=True: each epoch draws, from the loader's own generator, a fresh permutation, crop offsets uniform over
    {0..8}^2 and flip bits with p=0.5, then augments the whole epoch in one crop_and_flip; the last partial batch is
    kept, as the reference DataLoaders do. The generator state (state_dict) is all a resume needs to replay the
    following epochs exactly. train=False: the images in order, unaugmented."""

    def __init__(self, images, labels, batch_size, train, device, seed=0):
        self.images, self.labels = images.to(device), labels.to(device)  # the only host-to-device copy
        self.batch_size, self.train, self.device = batch_size, train, torch.device(device)
        self.mean = torch.tensor(CIFAR100_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(CIFAR100_STD, device=device).view(1, 3, 1, 1)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    @property
    def num_samples(self):
        return len(self.labels)

    def __len__(self):
        return math.ceil(self.num_samples / self.batch_size)

    def draw_epoch(self):
        """(permutation, offsets N x 2, flips N) for the next epoch; advances the generator."""
        n, g = self.num_samples, self.generator
        order = torch.randperm(n, generator=g, device=self.device)
        offsets = torch.randint(0, 2 * PAD + 1, (n, 2), generator=g, device=self.device)
        flips = torch.randint(0, 2, (n,), generator=g, device=self.device).bool()
        return order, offsets, flips

    def __iter__(self):
        if self.train:
            order, offsets, flips = self.draw_epoch()
            images, labels = crop_and_flip(self.images[order], offsets, flips), self.labels[order]
        else:
            images, labels = self.images, self.labels
        for start in range(0, self.num_samples, self.batch_size):
            x = images[start:start + self.batch_size]
            # float and normalise per batch: the whole epoch in float32 would be 4x the uint8 memory
            yield (x.float() / 255 - self.mean) / self.std, labels[start:start + self.batch_size]

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"].cpu())  # a CPU ByteTensor, whatever map_location did


def fake_cifar100(n, seed=0, num_classes=100):
    """n synthetic images in CIFAR-100's format whose class is their colour, for offline tests that training learns.

    The class -> colour table is fixed (a grid in RGB, not drawn from `seed`), so a train set (seed 0) and a test
    set (seed 1) share it; the seed picks only the labels and the pixel noise. A uniform colour survives any crop
    and flip (apart from the black border), so a small network separates the classes within a few epochs."""
    levels = math.ceil(num_classes ** (1 / 3))
    grid = torch.linspace(40, 215, levels)
    colours = torch.cartesian_prod(grid, grid, grid)[:num_classes]  # num_classes x 3, at least 43 apart
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    noise = 25 * torch.randn(n, 3, 32, 32, generator=g)
    images = (colours[labels][:, :, None, None] + noise).round().clamp(0, 255).to(torch.uint8)
    return images, labels
