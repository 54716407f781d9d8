"""data.py against independent references: torchvision's own transforms, the published dataset facts, pickle safety."""
import io
import os
import pickle
import shlex

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

import data

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MEAN = torch.tensor([0.5071, 0.4867, 0.4408]).view(1, 3, 1, 1)
STD = torch.tensor([0.2675, 0.2565, 0.2761]).view(1, 3, 1, 1)


VIEWS = [(flip, top, left) for flip in (0, 1) for top in range(9) for left in range(9)]  # view k = 81 flip + 9 top + left


def random_images(n, seed=0):
    return torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def to_uint8(x):
    """Undo Normalize: the loader's pixels back as the uint8 values they came from."""
    return ((x * STD + MEAN) * 255).round().to(torch.uint8)


def all_views(images):
    """162 x N x 3 x 32 x 32: every RandomCrop(32, padding=4) + flip outcome, by torchvision's functional ops."""
    padded = TF.pad(images, [4], fill=0)
    crops = [TF.crop(padded, top, left, 32, 32) for flip, top, left in VIEWS]
    return torch.stack([TF.hflip(c) if flip else c for c, (flip, _, _) in zip(crops, VIEWS)])


def fingerprints(pixels):
    """An exact integer hash of each uint8 image (float64 sums below 2^53): matching views costs one matmul."""
    weights = torch.randint(0, 2 ** 30, (3 * 32 * 32,), generator=torch.Generator().manual_seed(1)).double()
    return pixels.flatten(-3).double() @ weights


def epoch_views(loader, views, view_prints):
    """For one epoch of a loader whose labels are arange(N): (source index, view index k) of every sample."""
    sources, kinds = [], []
    for x, y in loader:
        pixels = to_uint8(x)
        k = (view_prints[:, y] == fingerprints(pixels)).int().argmax(0)
        assert torch.equal(views[k, y], pixels), "a training sample is not one of the 162 views of its source"
        sources.append(y), kinds.append(k)
    return torch.cat(sources), torch.cat(kinds)


def chi_square(counts):
    expected = counts.sum() / len(counts)
    return float(((counts - expected) ** 2 / expected).sum())


def chi_square_bound(cells):
    """Mean + 6 sd of chi-square with cells - 1 degrees of freedom: a fair sampler essentially never exceeds it."""
    return (cells - 1) + 6 * (2 * (cells - 1)) ** 0.5


def test_crop_and_flip_matches_torchvision_pil_pipeline():
    images = random_images(3)
    offsets = torch.tensor([[top, left] for _ in images for _, top, left in VIEWS])
    flips = torch.tensor([flip for _ in images for flip, _, _ in VIEWS], dtype=torch.bool)
    ours = data.crop_and_flip(images.repeat_interleave(len(VIEWS), 0), offsets, flips)
    for i, image in enumerate(images):
        pil = TF.to_pil_image(image)  # the reference pipeline's path: PIL pad (black), crop, flip
        for v, (flip, top, left) in enumerate(VIEWS):
            expected = TF.crop(TF.pad(pil, 4, fill=0), top, left, 32, 32)
            expected = TF.pil_to_tensor(TF.hflip(expected) if flip else expected)
            assert torch.equal(ours[i * len(VIEWS) + v], expected), (flip, top, left)


def test_every_training_sample_is_a_valid_view_and_each_image_appears_once_per_epoch():
    images = random_images(100)
    loader = data.Loader(images, torch.arange(100), 32, True, "cpu", seed=3)
    views = all_views(images)
    view_prints = torch.stack([fingerprints(v) for v in views])
    orders = []
    for _ in range(3):
        sources, _ = epoch_views(loader, views, view_prints)
        assert torch.equal(sources.sort().values, torch.arange(100))
        orders.append(sources)
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])  # fresh each epoch


def test_offsets_and_flips_are_uniform():
    images = random_images(256, seed=1)
    loader = data.Loader(images, torch.arange(256), 64, True, "cpu")
    views = all_views(images)
    view_prints = torch.stack([fingerprints(v) for v in views])
    kinds = torch.cat([epoch_views(loader, views, view_prints)[1] for _ in range(16)])  # 4,096 draws
    joint = torch.bincount(kinds, minlength=162).double()
    offsets, flips = joint.view(2, 81).sum(0), joint.view(2, 81).sum(1)
    assert (offsets > 0).all(), "some crop positions never drawn"
    for counts in (joint, offsets, flips):
        assert chi_square(counts) < chi_square_bound(len(counts)), counts
    # the bound has teeth: a sampler that never uses the last row/column, or flips 45% of the time, fails it
    g = torch.Generator().manual_seed(0)
    narrow = torch.bincount(torch.randint(0, 8, (4096,), generator=g) * 9 + torch.randint(0, 8, (4096,), generator=g),
                            minlength=81).double()
    biased = torch.tensor([0.55 * 4096, 0.45 * 4096])
    assert chi_square(narrow) > chi_square_bound(81) and chi_square(biased) > chi_square_bound(2)


def test_normalisation_constants_and_unaugmented_eval_batches():
    assert data.CIFAR100_MEAN == (0.5071, 0.4867, 0.4408) and data.CIFAR100_STD == (0.2675, 0.2565, 0.2761)
    images, labels = random_images(10), torch.arange(10) * 7
    batches = list(data.Loader(images, labels, 4, False, "cpu"))
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (10, 3, 32, 32)
    torch.testing.assert_close(x, (images / 255 - MEAN) / STD, rtol=0, atol=1e-6)
    assert torch.equal(y, labels)
    # zero padding is black before normalisation: the border of a corner crop is -mean/std
    corner = data.crop_and_flip(images[:1], torch.tensor([[0, 0]]), torch.tensor([False]))
    assert (corner[:, :, :4] == 0).all() and (corner[:, :, :, :4] == 0).all()


@pytest.mark.parametrize("n, batch_size, sizes", [(100, 32, [32, 32, 32, 4]), (96, 32, [32, 32, 32]), (5, 64, [5])])
@pytest.mark.parametrize("train", [True, False])
def test_batch_count_and_sizes(n, batch_size, sizes, train):
    loader = data.Loader(random_images(n), torch.arange(n), batch_size, train, "cpu")
    assert len(loader) == len(sizes) and loader.num_samples == n
    assert [len(x) for x, y in loader] == [len(y) for x, y in loader] == sizes


def test_full_training_set_keeps_the_last_partial_batch():
    images = torch.zeros(1, 3, 32, 32, dtype=torch.uint8).expand(50_000, 3, 32, 32)  # 50,000 views of one image
    loader = data.Loader(images, torch.zeros(50_000, dtype=torch.int64), 64, True, "cpu")
    assert len(loader) == 782 and 781 * 64 + 16 == loader.num_samples  # 781 full batches and one of 16


def epochs(loader, count):
    return [[(x.clone(), y.clone()) for x, y in loader] for _ in range(count)]


def assert_same_epochs(a, b):
    assert len(a) == len(b)
    for epoch_a, epoch_b in zip(a, b):
        assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(epoch_a, epoch_b))


def test_same_seed_same_batches_different_seed_different_batches():
    images, labels = random_images(50), torch.arange(50)
    first = epochs(data.Loader(images, labels, 16, True, "cpu", seed=7), 2)
    assert_same_epochs(first, epochs(data.Loader(images, labels, 16, True, "cpu", seed=7), 2))
    other = epochs(data.Loader(images, labels, 16, True, "cpu", seed=8), 1)
    assert not torch.equal(first[0][0][0], other[0][0][0])


@pytest.mark.parametrize("chunk", [20, 40])  # one batch per gather; two, and a last partial chunk
def test_augmenting_in_chunks_gives_the_same_batches(chunk, monkeypatch):
    images, labels = random_images(100), torch.arange(100)
    whole = epochs(data.Loader(images, labels, 16, True, "cpu", seed=4), 2)  # 100 images: one gather per epoch
    monkeypatch.setattr(data, "AUGMENT_CHUNK", chunk)
    assert_same_epochs(whole, epochs(data.Loader(images, labels, 16, True, "cpu", seed=4), 2))


def test_generator_state_round_trip_reproduces_the_next_epochs():
    images, labels = random_images(50), torch.arange(50)
    loader = data.Loader(images, labels, 16, True, "cpu", seed=5)
    epochs(loader, 1)
    buffer = io.BytesIO()
    torch.save(loader.state_dict(), buffer)  # as train.py's checkpoint does
    expected = epochs(loader, 2)
    resumed = data.Loader(images, labels, 16, True, "cpu", seed=99)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer))
    assert_same_epochs(expected, epochs(resumed, 2))


def test_real_cifar100_copy(cifar100_root):
    train_images, train_labels = data.load_cifar100(cifar100_root, train=True)
    test_images, test_labels = data.load_cifar100(cifar100_root, train=False)
    assert train_images.shape == (50_000, 3, 32, 32) and test_images.shape == (10_000, 3, 32, 32)
    assert train_images.dtype == test_images.dtype == torch.uint8
    assert train_labels.dtype == test_labels.dtype == torch.int64
    assert (torch.bincount(train_labels) == 500).all() and (torch.bincount(test_labels) == 100).all()
    assert len(torch.bincount(train_labels)) == len(torch.bincount(test_labels)) == 100
    assert train_labels[:5].tolist() == [19, 29, 0, 11, 1] and test_labels[0] == 49
    means = train_images.float().mean(dim=(0, 2, 3)) / 255
    torch.testing.assert_close(means, torch.tensor([0.507, 0.487, 0.441]), rtol=0, atol=2e-3)


def write_batch(root, payload, name="train"):
    (root / "cifar-100-python").mkdir(exist_ok=True)
    with open(root / "cifar-100-python" / name, "wb") as f:
        pickle.dump(payload, f)


class RunsAShellCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_canonical_pickle_loads_and_one_that_runs_code_is_refused(tmp_path):
    pixels = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    write_batch(tmp_path, {b"data": pixels, b"fine_labels": [3, 97], b"filenames": [b"a.png", b"b.png"]})
    images, labels = data.load_cifar100(tmp_path, train=True)
    assert torch.equal(images, torch.from_numpy(pixels).view(2, 3, 32, 32)) and labels.tolist() == [3, 97]

    marker = tmp_path / "code-ran"
    payload = {b"data": RunsAShellCommand(f"touch {shlex.quote(str(marker))}"), b"fine_labels": []}
    pickle.loads(pickle.dumps(payload, protocol=2))  # the payload is live: plain pickle runs it
    assert marker.exists()
    marker.unlink()
    write_batch(tmp_path, payload, name="test")
    with pytest.raises(data.DataError, match="refusing to load"):
        data.load_cifar100(tmp_path, train=False)
    assert not marker.exists()


def test_labels_of_uneven_lengths_are_refused_by_name(tmp_path):
    write_batch(tmp_path, {b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [[1, 2], [3]]})
    with pytest.raises(data.DataError, match="fine_labels' should be a flat list of integers, got lists of uneven"):
        data.load_cifar100(tmp_path, train=True)


def test_missing_copy_without_download_says_where_and_how(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        data.load_cifar100(tmp_path / "nowhere", train=True)
    message = str(error.value)
    assert str(tmp_path / "nowhere" / "cifar-100-python" / "train") in message
    assert "download=True" in message and "--data-dir" in message and data.ARCHIVE_URL in message


def test_fake_data_format_and_fixed_class_colours():
    train_images, train_labels = data.fake_cifar100(2000, seed=0)
    test_images, test_labels = data.fake_cifar100(500, seed=1)
    assert train_images.shape == (2000, 3, 32, 32) and train_images.dtype == torch.uint8
    assert train_labels.shape == (2000,) and train_labels.dtype == torch.int64
    assert 0 <= train_labels.min() and train_labels.max() < 100 and len(train_labels.unique()) > 90
    assert not torch.equal(train_labels[:500], test_labels)  # the seed picks labels and noise...

    def class_colours(images, labels):
        return torch.stack([images[labels == c].float().mean(dim=(0, 2, 3)) for c in range(100)])

    colours = class_colours(train_images, train_labels)
    present = torch.bincount(test_labels, minlength=100) > 0
    # ...but not the class -> colour mapping: the test set's classes have the train set's colours
    torch.testing.assert_close(class_colours(test_images, test_labels)[present], colours[present], rtol=0, atol=8.0)
    assert torch.cdist(colours, colours).add(torch.eye(100) * 1e3).min() > 30  # and the classes are far apart
    small = data.fake_cifar100(10, seed=0, num_classes=10)[1]
    assert small.max() < 10
