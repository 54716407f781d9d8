"""CIFAR-100 in, normalised batches out: the whole dataset lives on the training device as uint8.

The reference codebases push every 32x32 image through PIL transforms in DataLoader worker processes; on a modern
GPU that pipeline, not the network, sets the pace. Here the 150 MB of uint8 pixels are copied to the device once and
each epoch is augmented in a few batched tensor operations, with exactly the reference semantics:
torchvision's RandomCrop(32, padding=4) (zero padding) and RandomHorizontalFlip(p=0.5), then Normalize."""
import codecs
import contextlib
import hashlib
import http.client
import math
import os
import pathlib
import pickle
import shutil
import tarfile
import urllib.error
import urllib.request

import numpy as np
import torch

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)  # per-channel statistics of the 50,000 training images
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
ARCHIVE_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
PAD = 4  # RandomCrop(32, padding=4): a 40x40 zero-padded image, 9 x 9 crop positions
AUGMENT_CHUNK = 4096  # images augmented per gather
DATASETS = ("cifar100", "fake", "fake-full")
FAKE_SIZES = {"fake": (2000, 500),  # train, test images: seconds per epoch on a CPU
              "fake-full": (50_000, 10_000)}  # CIFAR-100's sizes: epoch times as real data would give


class _ArraysOnly(pickle.Unpickler):
    """Unpickles the CIFAR pickles' dicts, lists, bytes and numpy arrays, and nothing else.

    A pickle can name any importable callable (os.system, say) and have it called while loading; refusing every
    global but the three numpy needs to rebuild an array means a tampered file fails here instead of running code."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}  # how protocol 2 stores bytes (a pickle re-saved by Python 2's pickle.dump)

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR-100 pickle holds only numpy "
                                         f"arrays and builtins, so this file is not one (or has been tampered with)")
        if name == "_reconstruct":  # numpy 2 moved it from numpy.core to numpy._core: ask numpy where it lives now
            return np.zeros(0).__reduce__()[0]
        return codecs.encode if module == "_codecs" else getattr(np, name)


class DataError(ValueError):
    """CIFAR-100 could not be fetched or read; the message says what failed and the ways out."""


def ways_out(root):
    return (f"Ways out: download {ARCHIVE_URL} on a machine that can and put it in {root}/ (it is md5-checked and "
            f"unpacked there), or put its unpacked cifar-100-python/ folder there, or point --data-dir at a folder "
            f"that holds cifar-100-python/.")


def digest_of(path, algorithm="md5"):
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_archive(root):
    """root/cifar-100-python.tar.gz, downloaded (to a .part file, renamed once its md5 is right) unless present: a file
    already there is checked, never replaced (it may be the only copy its owner has)."""
    archive = root / ARCHIVE_URL.rsplit("/", 1)[-1]
    if archive.exists():
        if (got := digest_of(archive)) != ARCHIVE_MD5:
            raise DataError(f"{archive} is not the CIFAR-100 archive (md5 {got}, expected {ARCHIVE_MD5}); it was "
                            f"left untouched. Remove it to download again. " + ways_out(root))
        return archive
    made = [folder for folder in (root, *root.parents) if not folder.exists()]
    partial = archive.with_name(archive.name + ".part")
    try:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise DataError(f"cannot create --data-dir {root} ({error.strerror or error}). " + ways_out(root)) from None
        try:
            with urllib.request.urlopen(ARCHIVE_URL, timeout=60) as response, open(partial, "wb") as f:
                shutil.copyfileobj(response, f)
        except (OSError, http.client.HTTPException) as error:
            # no network, DNS, HTTP errors (URLError, HTTPError), timeouts, a connection cut short, a full disk
            detail = error if isinstance(error, urllib.error.HTTPError) else getattr(error, "reason", error)
            raise DataError(f"could not download CIFAR-100 from {ARCHIVE_URL} ({detail}). " + ways_out(root)) from None
        if (got := digest_of(partial)) != ARCHIVE_MD5:
            raise DataError(f"the file downloaded from {ARCHIVE_URL} is corrupt (md5 {got}, expected {ARCHIVE_MD5}); "
                            f"it was deleted. Try again later. " + ways_out(root))
        os.replace(partial, archive)
        return archive
    except BaseException:  # a Ctrl-C too: no half-downloaded file, and no folder made for it, stays behind
        with contextlib.suppress(OSError):  # missing, or below a file
            partial.unlink()
        for folder in made:  # a mistyped --data-dir leaves nothing behind
            with contextlib.suppress(OSError):  # not empty: someone else's now
                folder.rmdir()
        raise


def load_cifar100(root, train, download=False):
    """(images uint8 N x 3 x 32 x 32, fine labels int64 N) of root/cifar-100-python/{train,test}, original order."""
    root = pathlib.Path(root)
    if root.exists() and not root.is_dir():
        raise DataError(f"--data-dir {root} is a file, not a folder: point it at the folder holding cifar-100-python/")
    if (root / "train").is_file() and not (root / "cifar-100-python").exists():  # the unpacked folder itself
        root = root.parent
    path = root / "cifar-100-python" / ("train" if train else "test")
    if not path.exists() and download:
        with tarfile.open(fetch_archive(root)) as archive:
            archive.extractall(root, filter="data")  # "data" filter: no absolute paths, links or devices
    if not path.exists():
        raise FileNotFoundError(f"no CIFAR-100 at {path}: pass download=True (train.py: drop --no-download), point "
                                f"--data-dir at the folder holding cifar-100-python/, or unpack {ARCHIVE_URL} there")
    try:
        with open(path, "rb") as f:
            batch = _ArraysOnly(f, encoding="bytes").load()
    except Exception as error:  # truncated (EOFError, UnpicklingError), not a pickle, or a refused global
        raise DataError(f"{path} is not a readable CIFAR-100 pickle ({type(error).__name__}: {error}); unpack the "
                        f"archive again. " + ways_out(root)) from None
    pixels, labels = _checked_arrays(batch, path)  # N x 3072 uint8 pixels, N labels in 0..99, or a DataError
    expected = 50_000 if train else 10_000
    if len(labels) != expected:
        print(f"note: {path} holds {len(labels):,} images, not CIFAR-100's {expected:,}")
    return torch.from_numpy(pixels).reshape(-1, 3, 32, 32), torch.from_numpy(labels)


def add_flags(parser, count):
    """--dataset, --train-subset, --data-dir, --no-download (count: the argparse type of a positive integer)."""
    parser.add_argument("--dataset", choices=DATASETS, default="cifar100", help="fake: a small learnable synthetic "
                        "set, for offline smoke runs; fake-full: the same at CIFAR-100's size, for timing runs")
    parser.add_argument("--train-subset", type=count, metavar="N", help="train on a fixed class-balanced subset of "
                        "N training images (a multiple of 100; the same for every seed); the test set stays whole")
    parser.add_argument("--data-dir", default="data", help="folder holding (or receiving) cifar-100-python/")
    parser.add_argument("--no-download", action="store_true", help="fail instead of downloading CIFAR-100")


def load_datasets(dataset, root, download=True, train_subset=None):
    """((train images, labels), (test images, labels)) of `dataset` (DATASETS) as uint8 / int64 CPU tensors, with a
    line saying what came: load_cifar100's or fake_cifar100's; with train_subset, class_balanced_subset's."""
    if dataset in FAKE_SIZES:  # train set seed 0, test set seed 1
        (images, labels), test_set = (fake_cifar100(size, seed) for seed, size in enumerate(FAKE_SIZES[dataset]))
        source = f"synthetic (--dataset {dataset})"
    else:
        (images, labels), test_set = (load_cifar100(root, train, download) for train in (True, False))
        source = f"CIFAR-100 from {pathlib.Path(root)}"
    subset = f" (--train-subset: a fixed, class-balanced subset of the {len(labels):,})" if train_subset else ""
    if train_subset:
        keep = class_balanced_subset(labels, train_subset)
        images, labels = images[keep], labels[keep]
    print(f"data: {source}, {len(labels):,} training images{subset} and {len(test_set[1]):,} test images")
    return (images, labels), test_set


def class_balanced_subset(labels, size, num_classes=100):
    """Indices of the first size / num_classes images of each class, in the data's own order: the same images for
    every seed and method, so that runs on a subset compare. DataError where the data cannot supply them."""
    per_class = size // num_classes
    counts = torch.bincount(labels, minlength=num_classes)
    if size > len(labels) or counts.min() < per_class:
        raise DataError(f"--train-subset {size} asks {per_class} images of each of the {num_classes} classes, and "
                        f"the {len(labels):,} training images hold {counts.min().item()} of the rarest class: choose "
                        f"at most {counts.min().item() * num_classes}")
    firsts = [(labels == label).nonzero().flatten()[:per_class] for label in range(num_classes)]
    return torch.cat(firsts).sort().values


def _checked_arrays(batch, path):
    """(pixels N x 3072 uint8, labels N int64) from an unpickled CIFAR-100 dict, or a DataError naming the problem."""
    def bad(problem):
        return DataError(f"{path} is not a CIFAR-100 file: {problem}")

    if not isinstance(batch, dict) or b"data" not in batch or b"fine_labels" not in batch:
        raise bad("expected a dict with b'data' and b'fine_labels'")
    try:
        pixels, labels = batch[b"data"], np.asarray(batch[b"fine_labels"])
    except ValueError:  # a ragged list of lists, which numpy cannot make one array of
        raise bad("b'fine_labels' should be a flat list of integers, got lists of uneven lengths") from None
    if not isinstance(pixels, np.ndarray) or pixels.ndim != 2 or pixels.shape[1] != 3 * 32 * 32:
        raise bad(f"b'data' should be an N x 3072 array, got {getattr(pixels, 'shape', type(pixels).__name__)}")
    if pixels.dtype != np.uint8:  # casting floats in [0, 1] or ints above 255 would give black or wrapped images
        raise bad(f"pixels should be uint8 (0..255), got {pixels.dtype}")
    if len(pixels) == 0:
        raise bad("it holds no images")
    if labels.ndim != 1:
        raise bad(f"b'fine_labels' should be a flat list of integers, got an array of shape {labels.shape}")
    if len(labels) != len(pixels):
        raise bad(f"{len(pixels):,} images but {labels.size:,} labels")
    if labels.dtype.kind not in "iu":
        raise bad(f"labels should be integers in 0..99, got {labels.dtype}")
    if len(labels) and (labels.min() < 0 or labels.max() > 99):
        raise bad(f"labels should lie in 0..99, got {labels.min()} to {labels.max()}")
    return np.ascontiguousarray(pixels), labels.astype(np.int64)


def crop_and_flip(images, offsets, flips):
    """RandomCrop(32, padding=4) then horizontal flip, for all images at once, as one gather.

    images: uint8 N x 3 x 32 x 32; offsets: N x 2 (top, left) in {0..8}; flips: N bools. Output pixel (i, j) of
    image n is padded pixel (top + i, left + j), or (top + i, left + 31 - j) when flipped: the flip is folded into
    the column index, so cropping and flipping cost a single indexing operation on the padded images. The result has
    the memory format of `images` (channels_last in, channels_last out: no conversion per batch)."""
    size = images.shape[-1]
    padded = torch.nn.functional.pad(images, (PAD, PAD, PAD, PAD))  # zeros: black pixels, as torchvision pads
    steps = torch.arange(size, device=images.device)
    rows = offsets[:, 0, None] + steps  # N x 32
    cols = offsets[:, 1, None] + torch.where(flips[:, None].bool(), size - 1 - steps, steps)  # N x 32
    n = torch.arange(len(images), device=images.device)[:, None, None, None]
    channels = torch.arange(images.shape[1], device=images.device)
    if images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous():
        # gathered as N x 32 x 32 x 3, whose N x 3 x 32 x 32 view is channels_last
        return padded[n, channels, rows[:, :, None, None], cols[:, None, :, None]].permute(0, 3, 1, 2)
    return padded[n, channels[:, None, None], rows[:, None, :, None], cols[:, None, None, :]]  # N x 3 x 32 x 32


class Loader:
    """One pass over `images` per `for` loop, as (x float32 normalised, y int64) batches on `device`.

    train=True: each epoch draws, from the loader's own generator (its state_dict: all a resume needs to replay the
    following epochs exactly), a fresh permutation, crop offsets uniform over {0..8}^2 and flip bits with p=0.5; the
    last partial batch is kept, as the reference DataLoaders do. train=False: the images in order, unaugmented.
    channels_last=True: the images are kept in that memory format on the device, and so are the batches."""

    def __init__(self, images, labels, batch_size, train, device, seed=0, channels_last=False):
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.images = images.to(device, memory_format=memory_format)  # the only host-to-device copy, and conversion
        self.labels, self.num_samples = labels.to(device), len(labels)
        self.batch_size, self.train, self.device = batch_size, train, torch.device(device)
        self.mean, self.std = torch.tensor((CIFAR100_MEAN, CIFAR100_STD), device=device)[:, :, None, None]
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __len__(self):
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self):
        if self.train:
            n, g = self.num_samples, self.generator
            order = torch.randperm(n, generator=g, device=self.device)
            offsets = torch.randint(0, 2 * PAD + 1, (n, 2), generator=g, device=self.device)
            flips = torch.randint(0, 2, (n,), generator=g, device=self.device).bool()
        # a chunk at a time: one gather per chunk keeps the epoch's extra memory near 0.05 GB (all 50,000 images
        # padded: 0.24 GB); the draws are the epoch's, so the batches are the same whatever the chunk size
        chunk = self.batch_size * max(1, AUGMENT_CHUNK // self.batch_size)
        for chunk_start in range(0, self.num_samples, chunk):
            part = slice(chunk_start, chunk_start + chunk)
            if self.train:
                ids = order[part]
                images, labels = crop_and_flip(self.images[ids], offsets[part], flips[part]), self.labels[ids]
            else:
                images, labels = self.images[part], self.labels[part]
            for start in range(0, len(labels), self.batch_size):
                batch = slice(start, start + self.batch_size)  # standardised per batch: in float32 a chunk is 4x
                yield (images[batch].float() / 255 - self.mean) / self.std, labels[batch]

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"].cpu())  # a CPU ByteTensor, whatever map_location did


def fake_cifar100(n, seed=0, num_classes=100):
    """n synthetic images in CIFAR-100's format whose class is their colour, for offline tests that training learns.

    The class -> colour table is fixed (a grid in RGB, not drawn from `seed`), so a train set (seed 0) and a test
    set (seed 1) share it; the seed picks only the labels and the pixel noise. A uniform colour survives any crop
    and flip (apart from the black border), so a small network separates the classes within a few epochs."""
    grid = torch.linspace(40, 215, math.ceil(num_classes ** (1 / 3)))  # levels per channel
    colours = torch.cartesian_prod(grid, grid, grid)[:num_classes]  # num_classes x 3, at least 43 apart
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    noise = 25 * torch.randn(n, 3, 32, 32, generator=g)
    images = (colours[labels][:, :, None, None] + noise).round().clamp(0, 255).to(torch.uint8)
    return images, labels
