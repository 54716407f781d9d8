"""The branches that run only on CUDA, in one short command on a GPU; skipped where CUDA is absent.

    pytest -q -rP test_cuda.py      # -rP also prints what each test measured (deviations, memory)

The loader's CUDA generator and memory, the speed path as each GPU gets it by default (bf16 autocast, and fp16 with
torch's own GradScaler, each with channels_last, torch.compile and fused SGD) against eager IEEE float32, the
compiled graph count, and train.py's resume with its CUDA RNG state. Small models (resnet8) keep the cold
compilations short.
"""
import io

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

import torch._dynamo.testing  # noqa: E402

import data  # noqa: E402
import models  # noqa: E402
import train  # noqa: E402
from test_data import all_views, assert_same_epochs, epoch_views, epochs, fingerprints, random_images  # noqa: E402

DEVICE = "cuda"
BF16_UNIT_ROUNDOFF = 2.0 ** -8  # bf16 keeps 8 significant bits: each rounding is off by at most 2^-8 relatively
FP16_UNIT_ROUNDOFF = 2.0 ** -11  # fp16 keeps 11


def cpu_batches(loader):
    return [(x.cpu(), y.cpu()) for x, y in loader]


def test_loader_on_cuda_gives_the_cpu_loaders_batches_of_valid_views():
    images, labels = random_images(100), torch.arange(100)
    loader = data.Loader(images, labels, 32, True, DEVICE, seed=3)
    batches = list(loader)
    assert all(x.device.type == y.device.type == "cuda" for x, y in batches)
    on_cpu = list(data.Loader(images, labels, 32, True, "cpu", seed=3))
    assert [(x.shape, x.dtype, y.shape, y.dtype) for x, y in batches] == \
           [(x.shape, x.dtype, y.shape, y.dtype) for x, y in on_cpu]
    views = all_views(images)
    view_prints = torch.stack([fingerprints(v) for v in views])
    for _ in range(2):  # each sample one of its image's 162 views (a zero-padded crop, flipped or not), each image once
        sources, _ = epoch_views(cpu_batches(loader), views, view_prints)
        assert torch.equal(sources.sort().values, torch.arange(100))


def test_loader_on_cuda_is_seeded_and_replays_from_its_state():
    images, labels = random_images(50), torch.arange(50)
    first = epochs(data.Loader(images, labels, 16, True, DEVICE, seed=7), 2)
    assert_same_epochs(first, epochs(data.Loader(images, labels, 16, True, DEVICE, seed=7), 2))
    loader = data.Loader(images, labels, 16, True, DEVICE, seed=5)
    epochs(loader, 1)
    buffer = io.BytesIO()
    torch.save(loader.state_dict(), buffer)  # as train.py's checkpoint does
    expected = epochs(loader, 2)
    resumed = data.Loader(images, labels, 16, True, DEVICE, seed=99)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert_same_epochs(expected, epochs(resumed, 2))


def test_an_augmented_epoch_of_50000_images_needs_under_1_gib_more_than_the_dataset():
    images = torch.randint(0, 256, (50_000, 3, 32, 32), dtype=torch.uint8)
    loader = data.Loader(images, torch.zeros(50_000, dtype=torch.int64), 64, True, DEVICE)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    dataset = torch.cuda.memory_allocated()  # the uint8 images and their labels, already on the device
    assert dataset >= images.numel()
    batches = sum(1 for _ in loader)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - dataset
    print(f"one augmented epoch ({batches} batches): peak {extra / 2 ** 20:.0f} MiB above the "
          f"{dataset / 2 ** 20:.0f} MiB dataset")
    assert batches == 782 and extra < 2 ** 30


def build(flags, method="srd"):
    """resnet8 -> resnet8 (or resnet8 alone for method none) on CUDA under train.py's flags, from fixed weights."""
    teacher_flags = ["--teacher", "resnet8"] if method != "none" else []
    config = train.resolve_config(train.parse_args(["--student", "resnet8", *teacher_flags, "--method", method,
                                                    "--device", DEVICE, *flags]))
    torch.manual_seed(0)
    teacher = train.build_on_device("resnet8", config).eval().requires_grad_(False) if method != "none" else None
    student, distill, optimizer = train.build_student(config, teacher)  # seeded: the same weights every time
    torch.compiler.reset()
    return config, student, optimizer, train.make_loss_fn(student, teacher, distill, config)


def train_steps(flags, batches, method="srd"):
    """The loss terms (ce, feat, kd, total) of each step, the student afterwards and which steps train.py's own
    GradScaler (enabled for fp16 only, at torch's initial scale) skipped, as fit() builds it."""
    config, student, optimizer, loss_fn = build(flags, method)
    train.devices.apply(config)  # as fit() does: cuDNN autotuning, and TF32 off (IEEE float32 where float32 runs)
    scaler = torch.amp.GradScaler("cuda", enabled=config["precision"] == "fp16")
    terms, skipped = [], []
    memory_format = torch.channels_last if config["channels_last"] else torch.contiguous_format
    for x, y in batches:  # in the memory format data.Loader gives the run
        x = x.contiguous(memory_format=memory_format)
        step_terms, _, step_skipped = train.train_step(loss_fn, optimizer, scaler, x, y)
        terms.append(step_terms.clone())
        skipped.append(step_skipped)
    torch.cuda.synchronize()
    return torch.stack(terms).cpu(), student, torch.stack(skipped).tolist()


def fp32_reference(batches):
    """Eager fp32 with foreach SGD and TF32 off (train.py's fp32): a true float32 reference."""
    return train_steps(["--precision", "fp32", "--no-channels-last", "--no-compile", "--no-fused-sgd"], batches)[0]


def deviation_from_fp32(precision, steps, unit_roundoff):
    """The optimised step at `precision` against fp32_reference over `steps` steps, within 4 x 8u (the docstrings
    below derive it); the measured deviation is printed. A first step skipped by fp16's scaler (torch's initial 2^16
    overflows resnet8's first gradients on the CPU) leaves the weights as they were: the steps after it are then
    compared with the reference's from its first, which start from the same weights (and, with fused SGD, the
    same zero momentum: test_devices.py's fused-SGD test)."""
    loader = data.Loader(*data.fake_cifar100((steps + 1) * 64, seed=0), 64, True, DEVICE)
    batches = [(x.clone(), y.clone()) for x, y in loader]
    fast, _, skipped = train_steps(["--precision", precision], batches)
    first = skipped[0]  # 1 when the first step was skipped
    assert skipped[first:] == [0] * (len(batches) - first), f"the loss scaler skipped steps {skipped}"
    fast, reference = fast[first:first + steps], fp32_reference(batches[first:first + steps])
    deviation = (fast - reference).abs()
    print(f"{precision} step vs eager fp32, {steps} steps: max |difference| per term (ce, feat, kd, total) "
          f"{deviation.max(0).values.tolist()}, relative {(deviation / reference.abs().clamp_min(1)).max().item():.4f}")
    assert not torch.equal(fast, reference)  # the lower precision did run
    bound = 4 * 8 * unit_roundoff
    torch.testing.assert_close(fast, reference, rtol=bound, atol=bound)


def test_bf16_cuda_step_tracks_eager_float32_over_20_steps():
    """bf16 autocast + channels_last + compile + fused SGD against eager fp32 + foreach SGD, same weights and batches
    (the default on GPUs of compute capability 8.0 and up; emulated, and slow, below).

    Tolerance: bf16 rounds each operand to 8 significant bits (relative error u = 2^-8 = 0.39%); products accumulate
    in fp32, so a layer's output is off by about u relatively and resnet8's 8 weight layers by at most ~8u. A loss
    term (log-sum-exp of logits; the LogSum of |r|^4, where a relative error e in r moves log S by 4e) then differs
    by at most ~4 x 8u = 12.5% relatively, or ~0.125 absolutely near 1; the weights drift by lr x (gradient error) per
    step, too little over 20 steps to add to it (a CPU dry run: 2.3%)."""
    deviation_from_fp32("bf16", 20, BF16_UNIT_ROUNDOFF)


def test_fp16_step_with_loss_scaling_tracks_eager_float32_over_3_steps():
    """fp16 autocast with a GradScaler (the default on GPUs of capability 7.x) + channels_last + compile + fused SGD
    against eager fp32, as above. Tolerance: fp16 keeps 11 significant bits (u = 2^-11), so by the same argument as
    for bf16, 4 x 8u = 1.6%. Over 3 steps, not 20: at so tight a bound the compounding of rounding through the weights
    shows (a dry run of this test on the CPU, fp16 emulated, deviated by 2.7% after 20 steps and 0.04% over 3). The
    scaler is train.py's: torch's initial 2^16, which may overflow the first step (deviation_from_fp32 says how that
    is compared)."""
    deviation_from_fp32("fp16", 3, FP16_UNIT_ROUNDOFF)


def test_two_epochs_with_an_evaluation_compile_exactly_two_graphs(monkeypatch):
    counter = torch._dynamo.testing.CompileCounter()  # counts the graphs dynamo hands to the backend
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, dynamic: real_compile(fn, backend=counter, dynamic=dynamic))
    config, student, optimizer, loss_fn = build([])  # this GPU's defaults (devices.py)
    scaler = torch.amp.GradScaler("cuda", enabled=config["precision"] == "fp16")
    images, labels = data.fake_cifar100(96, seed=0)  # one batch of 64 and a last one of 32
    for _ in range(2):
        train.train_one_epoch(loss_fn, optimizer, scaler, data.Loader(images, labels, 64, True, DEVICE), config)
        train.evaluate(student, data.Loader(images, labels, 50, False, DEVICE), config)
    assert counter.frame_count == 2
    torch._dynamo.reset()


def test_train_py_resume_on_cuda_replays_the_same_run(tmp_path, monkeypatch):
    """2 epochs + --resume to 3 against 3 straight, on fake data with every CUDA default. Each epoch also draws from
    torch's CUDA generator, so the runs' final CUDA RNG states agree only if the checkpoint restored it."""
    real_epoch = train.train_one_epoch

    def epoch_drawing_cuda_randomness(*args, **kwargs):
        torch.rand(1, device=DEVICE)
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", epoch_drawing_cuda_randomness)
    torch.manual_seed(0)
    torch.save(models.build_model("resnet8").state_dict(), tmp_path / "teacher.pt")
    common = ["--teacher", "resnet8", "--teacher-ckpt", str(tmp_path / "teacher.pt"), "--student", "resnet8",
              "--dataset", "fake", "--device", DEVICE, "--milestones", "2"]  # one schedule for 2 + 1 and 3 epochs
    train.main([*common, "--epochs", "3", "--out", str(tmp_path / "straight")])
    train.main([*common, "--epochs", "3", "--out", str(tmp_path / "again")])  # what the device varies by itself
    train.main([*common, "--epochs", "2", "--out", str(tmp_path / "resumed")])
    train.main([*common, "--epochs", "3", "--out", str(tmp_path / "resumed"), "--resume"])
    straight, again, resumed = (torch.load(tmp_path / run / "last.pt", weights_only=True)
                                for run in ("straight", "again", "resumed"))
    assert straight["epoch"] == resumed["epoch"] == 3
    assert torch.equal(straight["loader"]["generator"], resumed["loader"]["generator"])  # the same data order
    assert torch.equal(straight["rng_cuda"], resumed["rng_cuda"])  # restored: else the resumed run drew once only
    logs = [(tmp_path / name / "log.csv").read_text().splitlines() for name in ("straight", "resumed")]
    assert [row.split(",")[0] for row in logs[0]] == [row.split(",")[0] for row in logs[1]] == ["epoch", "1", "2", "3"]
    # cuDNN's autotuned kernels and atomics-based backward passes are not bitwise deterministic, so the bound is
    # measured: a resumed run may differ from the straight one by what a second straight run differs by (x4, for a
    # sample of one; at least 1e-6 of each tensor's largest entry, where the two straight runs agree bitwise)
    def differences(run):
        return {(part, key): ((tensor - run[part][key]).abs().max() / tensor.abs().max().clamp_min(1e-3)).item()
                for part in ("model", "projector") for key, tensor in straight[part].items()
                if tensor.is_floating_point()}

    noise, resumed_by = max(differences(again).values()), differences(resumed)
    print(f"after 3 epochs, largest difference relative to the tensor's largest entry: resume vs straight "
          f"{max(resumed_by.values()):.2e}, straight vs straight {noise:.2e}")
    assert max(resumed_by.values()) <= max(4 * noise, 1e-6), sorted(resumed_by.items(), key=lambda kv: -kv[1])[:3]
