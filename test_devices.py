"""devices.py: what each device gets, on mocked GPUs; the GPU recipe's step (fp16 with loss scaling, bf16, fused SGD,
torch.compile's inductor) run on the CPU against float32."""
import csv
import json
import math

import pytest
import torch

import data
import devices
import models
import train

TINY = ["--student", "resnet8", "--dataset", "fake", "--device", "cpu"]
FP16_UNIT_ROUNDOFF = 2.0 ** -11  # fp16 keeps 11 significant bits: each rounding is off by at most 2^-11 relatively


# a torch build with kernels for old GPUs too (as CUDA 12.6 wheels have), so that their defaults can be tested
OLD_AND_NEW = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]


def mock_gpu(monkeypatch, name, capability, arch_list=OLD_AND_NEW, count=1):
    """A machine of `count` such GPUs under a torch built for arch_list; returns the devices made current."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: arch_list)
    # torch's own check of set_device's argument: it takes an index, or a device that has one
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: current.append(torch.cuda._utils._get_device_index(
        device)))
    return current


def resolved(flags):
    args = train.parse_args(["--student", "resnet8", "--device", "cuda", *flags])
    return train.resolve_config(args), args.device_lines


@pytest.mark.parametrize("name, capability, precision, compiled", [
    ("NVIDIA H200", (9, 0), "bf16", True), ("NVIDIA A100-SXM4-80GB", (8, 0), "bf16", True),
    ("Tesla T4", (7, 5), "fp16", True), ("Tesla V100-SXM2-16GB", (7, 0), "fp16", True),
    ("Tesla P100-PCIE-16GB", (6, 0), "fp16", False)])
def test_defaults_follow_the_gpu(name, capability, precision, compiled, monkeypatch):
    mock_gpu(monkeypatch, name, capability)
    config, lines = resolved([])
    assert (config["precision"], config["compile"], config["channels_last"], config["fused_sgd"]) == \
           (precision, compiled, True, True)
    assert config["device_name"] == name and config["capability"] == "%d.%d" % capability  # recorded in config.json
    said = {"bf16": "bf16 autocast", "fp16": "fp16 autocast with loss scaling"}[precision]
    assert lines == [f"device: {name} (compute capability {config['capability']}): {said}; "
                     + ("compiled" if compiled else "eager")]  # and nothing to warn about in a default
    assert config["tf32"] is False  # IEEE float32 wherever float32 runs, recorded


def test_the_cpu_gets_fp32_and_eager():
    args = train.parse_args(TINY)
    config = train.resolve_config(args)
    assert (config["precision"], config["compile"], config["channels_last"], config["fused_sgd"]) == \
           ("fp32", False, False, False)
    assert args.device_lines == ["device: cpu: fp32; eager"] and config["capability"] is None


def test_an_explicit_flag_always_wins(monkeypatch):
    mock_gpu(monkeypatch, "Tesla P100-PCIE-16GB", (6, 0))
    config, lines = resolved(["--compile", "--precision", "fp32", "--no-channels-last", "--no-fused-sgd"])
    assert (config["precision"], config["compile"], config["channels_last"], config["fused_sgd"]) == \
           ("fp32", True, False, False)
    assert lines[0].endswith(": fp32; compiled")
    mock_gpu(monkeypatch, "NVIDIA H200", (9, 0))
    assert resolved(["--no-compile", "--precision", "fp16"])[0]["compile"] is False
    assert resolved(["--precision", "fp16"])[0]["precision"] == "fp16"


def test_what_a_device_lacks_is_warned_with_the_alternative(monkeypatch):
    mock_gpu(monkeypatch, "Tesla T4", (7, 5))
    _, lines = resolved(["--precision", "bf16"])
    assert lines[1] == ("warning: --precision bf16 on Tesla T4, which has no native bf16 (compute capability below "
                        "8.0): torch emulates it, slowly; --precision fp16 (the default here) runs on its tensor cores")
    args = train.parse_args([*TINY, "--precision", "fp16"])
    train.resolve_config(args)
    assert "warning: --precision fp16 on the CPU" in args.device_lines[1] and "--precision fp32" in args.device_lines[1]


@pytest.mark.parametrize("capability, arch_list, runs", [
    ((7, 0), ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"], False),  # V100 under CUDA 13 builds
    ((6, 0), ["sm_75", "sm_80"], False), ((8, 9), ["sm_75", "sm_80", "sm_86", "sm_90"], True),  # sm_86 runs on 8.9
    ((9, 0), ["sm_80", "compute_80"], True),  # PTX is compiled for later GPUs
    ((12, 1), ["sm_90", "sm_120"], True), ((10, 0), ["sm_90a", "sm_100a"], True), ((10, 0), ["sm_90"], False)])
def test_kernels_are_found_by_compute_capability(capability, arch_list, runs):
    assert devices.has_kernels_for(capability, arch_list) is runs


def test_a_gpu_this_torch_has_no_kernels_for_is_refused_in_one_paragraph(monkeypatch, capsys):
    mock_gpu(monkeypatch, "Tesla V100-SXM2-16GB", (7, 0), arch_list=["sm_75", "sm_80", "sm_90", "sm_100", "sm_120"])
    with pytest.raises(SystemExit) as exit_info:
        train.resolve_config(train.parse_args(["--student", "resnet8", "--dataset", "fake"]))  # the default device
    message = str(exit_info.value.code)
    assert message.startswith("error: Tesla V100-SXM2-16GB (compute capability 7.0) cannot run this torch ")
    assert "sm_75, sm_80, sm_90, sm_100, sm_120" in message and "an older CUDA variant" in message
    assert "\n" not in message and capsys.readouterr().out == ""  # refused before anything else


def test_cuda_n_becomes_the_current_device(monkeypatch):
    """RNG states, synchronize and memory queries act on the current CUDA device: --device cuda:1 must be it."""
    current = mock_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", (9, 0), count=2)
    config = train.resolve_config(train.parse_args(["--student", "resnet8", "--device", "cuda:1"]))
    assert config["device"] == "cuda:1" and current == [1]
    assert train.resolve_config(train.parse_args(["--student", "resnet8"]))["device"] == "cuda" and current == [1, 0]
    with pytest.raises(SystemExit, match="this machine has 2 CUDA device"):
        train.resolve_config(train.parse_args(["--student", "resnet8", "--device", "cuda:2"]))


def test_tf32_is_switched_as_recorded():
    """cuDNN's convolutions default to TF32 on capability 8.0+: fp32 must mean IEEE float32 there."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        devices.apply({"tf32": False})
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        for precision in devices.PRECISIONS:
            assert train.resolve_config(train.parse_args([*TINY, "--precision", precision]))["tf32"] is False
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark = saved


def steps(precision, scaler, count=3, flags=()):
    """`count` steps of resnet8 -> resnet8 (srd) on the CPU, eager unless `flags` say otherwise; the loss terms,
    skipped flags and weights."""
    config = train.resolve_config(train.parse_args(["--teacher", "resnet8", "--student", "resnet8", "--device", "cpu",
                                                    "--precision", precision, *flags]))
    torch.manual_seed(1)
    teacher = train.build_on_device("resnet8", config).eval().requires_grad_(False)
    student, distill, optimizer = train.build_student(config, teacher)
    torch.compiler.reset()
    loss_fn = train.make_loss_fn(student, teacher, distill, config)
    x, y = next(iter(data.Loader(*data.fake_cifar100(32, seed=0), 32, True, "cpu")))
    terms, skipped = [torch.zeros(4)], []
    for _ in range(count):
        step_terms, _, step_skipped = train.train_step(loss_fn, optimizer, scaler, x, y)
        terms.append(step_terms.clone())
        skipped.append(int(step_skipped))
    weights = [p.detach().clone() for group in optimizer.param_groups for p in group["params"]]
    return torch.stack(terms[1:] or terms), skipped, weights


@pytest.fixture
def recycled_memory(monkeypatch):
    """torch.empty_like filled with NaN, as CUDA's caching allocator may hand out memory of earlier tensors."""
    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda *args, **kwargs: empty_like(*args, **kwargs).fill_(math.nan))


def test_fused_sgd_after_a_skipped_first_step_takes_the_textbook_step(recycled_memory):
    """fp16's GradScaler skips a step whose scaled gradients overflow, as torch's initial 2^16 does at the first step
    on most GPUs. Fused SGD creates its momentum buffers at its first step with empty_like and lets the kernel fill
    them; a skipped step writes nothing, and the next step would compute 0.9 x garbage + gradient. With the buffers
    made zeros beforehand (train.build_student), the first step taken is the textbook first step: the same update as
    foreach SGD, which is never called for a skipped step."""
    skip_once = dict(init_scale=2.0 ** 40, backoff_factor=2.0 ** -30)  # overflows, then 2^10 does not
    _, fused_skipped, fused = steps("fp16", torch.amp.GradScaler("cpu", **skip_once), 2, ["--fused-sgd"])
    _, foreach_skipped, foreach = steps("fp16", torch.amp.GradScaler("cpu", **skip_once), 2, ["--no-fused-sgd"])
    assert fused_skipped == foreach_skipped == [1, 0]
    assert all(torch.isfinite(weight).all() for weight in fused)
    for a, b in zip(fused, foreach):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


class TinyNet(models.ZooNet):
    """One conv-BN-ReLU and the classifier: the zoo's interface at a size inductor compiles in seconds."""

    def __init__(self, width=8, num_classes=100):
        super().__init__()
        self.conv, self.feature_dim, self.fc = models.conv_bn(3, width, 3, relu=True), width, torch.nn.Linear(width,
                                                                                                           num_classes)

    def pooled_features(self, x):
        return models.global_avg_pool(self.conv(x))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_the_gpu_recipe_step_compiled_by_inductor_tracks_eager_float32(precision, monkeypatch, recycled_memory):
    """What a GPU runs by default (compute capability 7.5: fp16 with torch's GradScaler; 8.0+: bf16), with fused SGD
    and torch.compile's real inductor backend (C++ on the CPU, Triton on CUDA), distilling a teacher with srd:
    against eager fp32 with foreach SGD, same weights and batch, on a tiny network (TinyNet for resnet8).

    Tolerance, as derived for resnet8 above: a loss term within 4 x 8u (u = 2^-11 for fp16, 2^-8 for bf16). fp16's
    first step overflows at torch's initial scale 2^16 and is skipped (the production case of the test above), so
    its steps 2-3 are compared with fp32's steps 1-2, which start from the same weights."""
    monkeypatch.setitem(models._BUILDERS, "resnet8", TinyNet)
    flags = ["--hidden-dim", "32"]
    reference, _, reference_weights = steps("fp32", torch.amp.GradScaler("cpu", enabled=False), 3, flags)
    scaler = torch.amp.GradScaler("cpu", enabled=precision == "fp16")  # the production scaler, unchanged
    fast, skipped, weights = steps(precision, scaler, 3, [*flags, "--compile", "--fused-sgd"])
    if precision == "fp16":
        assert skipped == [1, 0, 0]
        fast, reference = fast[1:], reference[:2]
        reference_weights = steps("fp32", torch.amp.GradScaler("cpu", enabled=False), 2, flags)[2]
    assert not torch.equal(fast, reference)  # the lower precision did run
    bound = 4 * 8 * (FP16_UNIT_ROUNDOFF if precision == "fp16" else 2.0 ** -8)
    print(f"{precision} compiled vs eager fp32: max |difference| {(fast - reference).abs().max().item():.2e}")
    torch.testing.assert_close(fast, reference, rtol=bound, atol=bound)
    for a, b in zip(weights, reference_weights):
        torch.testing.assert_close(a, b, rtol=bound, atol=bound)


def test_an_fp16_step_with_loss_scaling_tracks_float32():
    """fp16 autocast with a real GradScaler("cpu"), against the fp32 step, 3 steps. Tolerance: fp16 rounds each
    operand to 11 significant bits (u = 2^-11 = 0.05%); resnet8's 8 weight layers accumulate at most ~8u relatively,
    and a loss term (log-sum-exp of logits; LogSum of |r|^4, where a relative error e in r moves log S by 4e) at most
    ~4 x 8u = 1.6%. The weights move by lr x (gradient error): within the same bound. The scaler starts at 2^10:
    torch's 2^16 overflows fp16 at the first backward here, which is the next test's case."""
    reference, _, reference_weights = steps("fp32", torch.amp.GradScaler("cpu", enabled=False))
    fp16, skipped, weights = steps("fp16", torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))
    assert skipped == [0, 0, 0] and not torch.equal(fp16, reference)  # fp16 ran, and every step was taken
    bound = 4 * 8 * FP16_UNIT_ROUNDOFF
    torch.testing.assert_close(fp16, reference, rtol=bound, atol=bound)
    for a, b in zip(weights, reference_weights):
        torch.testing.assert_close(a, b, rtol=bound, atol=bound)


def test_an_overflowing_scale_skips_the_step_and_leaves_the_weights():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)  # far beyond fp16's 65,504: every gradient overflows
    _, skipped, weights = steps("fp16", scaler, count=1)
    _, _, untouched = steps("fp16", torch.amp.GradScaler("cpu", init_scale=2.0 ** 10), count=0)
    assert skipped == [1] and scaler.get_scale() == 2.0 ** 39  # counted, and the scale halved
    assert all(torch.equal(a, b) for a, b in zip(weights, untouched))


def read_log(folder):
    with open(folder / "log.csv") as f:
        return list(csv.DictReader(f))


def initial_scale(monkeypatch, scale):
    """train.py's GradScaler starting at `scale` instead of torch's 2^16."""
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *args, **kwargs: real(*args, **{"init_scale": scale, **kwargs}))


def test_skipped_steps_are_logged_and_do_not_stop_an_fp16_run(tmp_path, monkeypatch):
    """A scale of 2^40 overflows fp16 at every backward pass until it has halved below ~2^16: those steps are
    skipped and counted, the run goes on (the losses are finite), and a run in fp32 logs zero."""
    initial_scale(monkeypatch, 2.0 ** 40)
    datasets = (data.fake_cifar100(96, seed=0), data.fake_cifar100(50, seed=1))
    for precision in ("fp16", "fp32"):
        config = train.resolve_config(train.parse_args([*TINY, "--epochs", "2", "--precision", precision]))
        summary = train.run(config, tmp_path / precision, datasets=datasets)
        assert summary["last_epoch"] == 2
    fp16, fp32 = read_log(tmp_path / "fp16"), read_log(tmp_path / "fp32")
    assert [r["skipped_steps"] for r in fp16] == ["2", "2"] and [r["skipped_steps"] for r in fp32] == ["0", "0"]
    assert all(float(r["loss_total"]) > 0 for r in fp16)


def test_an_fp16_run_resumes_exactly(tmp_path, monkeypatch):
    """Stopped after epoch 2 and resumed, an fp16 run ends as an uninterrupted one: the scaler's scale and growth
    tracker come back from the checkpoint, or its next steps would differ (a scale of 2^20 overflows the first
    steps, so it moves)."""
    initial_scale(monkeypatch, 2.0 ** 20)
    datasets = (data.fake_cifar100(96, seed=0), data.fake_cifar100(50, seed=1))
    flags = [*TINY, "--precision", "fp16", "--milestones", "2"]
    train.run(train.resolve_config(train.parse_args([*flags, "--epochs", "3"])), tmp_path / "straight", datasets=datasets)
    train.run(train.resolve_config(train.parse_args([*flags, "--epochs", "2"])), tmp_path / "resumed", datasets=datasets)
    config = train.resolve_config(train.parse_args([*flags, "--epochs", "3"]))
    train.run(config, tmp_path / "resumed", resume=True, datasets=datasets)
    straight, resumed = (torch.load(tmp_path / name / "last.pt", weights_only=True) for name in ("straight", "resumed"))
    assert straight["scaler"] == resumed["scaler"] and straight["scaler"]["scale"] < 2.0 ** 20  # it had moved
    for key, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][key]), key
    untimed = [c for c in read_log(tmp_path / "straight")[0] if c not in ("epoch_time_s", "images_per_s", "warmup_s")]
    assert [[r[c] for c in untimed] for r in read_log(tmp_path / "straight")] == \
           [[r[c] for c in untimed] for r in read_log(tmp_path / "resumed")]


def test_a_run_recorded_before_precision_was_recorded_resumes_in_fp32(tmp_path):
    datasets = (data.fake_cifar100(64, seed=0), data.fake_cifar100(50, seed=1))
    train.run(train.resolve_config(train.parse_args([*TINY, "--epochs", "1"])), tmp_path / "run", datasets=datasets)
    checkpoint = torch.load(tmp_path / "run/last.pt", weights_only=True)
    old = {key: value for key, value in checkpoint["config"].items()
           if key not in ("precision", "device_name", "capability", "train_subset")}
    del checkpoint["config"], checkpoint["scaler"]  # as train.py wrote them before these keys: every such run in fp32
    torch.save(checkpoint, tmp_path / "run/last.pt")
    (tmp_path / "run/config.json").write_text(json.dumps(old))
    (tmp_path / "run/summary.json").unlink()
    args = train.parse_args(["--resume", str(tmp_path / "run"), "--epochs", "2"])
    config = train.resolve_config(args)
    config = train.runs.resumed_config(config, tmp_path / "run", args.given, train.runs.read_checkpoint(
        tmp_path / "run", None))
    assert config["precision"] == "fp32"
    assert train.run(config, tmp_path / "run", resume=True, datasets=datasets)["last_epoch"] == 2
    assert json.loads((tmp_path / "run/config.json").read_text())["precision"] == "fp32"


def test_duration_reads_in_minutes_hours_and_days():
    assert devices.duration(90) == "2 min" and devices.duration(3 * 3600) == "3.0 h"
    assert devices.duration(47 * 3600) == "47.0 h" and devices.duration(49 * 3600) == "2.0 days"


def test_the_warm_up_of_a_compiled_run_is_logged_apart_from_its_epochs(tmp_path, monkeypatch):
    """A compiled step compiles at the first call of each batch size (the full batch, then the epoch's last partial
    one) and autotunes cuDNN: train.WARMUP_STEPS steps of each size are timed apart, so that epoch_time_s and
    images_per_s are the steady state. torch.compile is left out here (an identity) to keep the test fast: what is
    checked is which steps count as warm-up, and the log."""
    monkeypatch.setitem(models._BUILDERS, "resnet8", TinyNet)
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    config = train.resolve_config(train.parse_args([*TINY, "--compile", "--epochs", "3"]))
    datasets = (data.fake_cifar100(3 * 64 + 32, seed=0), data.fake_cifar100(50, seed=1))  # 3 full batches, 1 of 32
    train.run(config, tmp_path / "run", datasets=datasets)
    rows = read_log(tmp_path / "run")
    assert len(rows) == 3
    for row, warm_images in zip(rows, [64 + 64 + 32, 32, 0]):  # the partial batch's second call is in epoch 2
        assert (float(row["warmup_s"]) > 0) == (warm_images > 0)
        steady = float(row["images_per_s"]) * float(row["epoch_time_s"])
        assert steady == pytest.approx(224 - warm_images, rel=1e-6)
    eager = train.resolve_config(train.parse_args([*TINY, "--epochs", "1"]))  # on the CPU: nothing to warm up
    train.run(eager, tmp_path / "eager", datasets=datasets)
    assert float(read_log(tmp_path / "eager")[0]["warmup_s"]) == 0
