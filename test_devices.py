"""devices.py: what each device gets, on mocked GPUs; fp16 with loss scaling, run on the CPU against float32."""
import csv
import json

import pytest
import torch

import data
import devices
import train

TINY = ["--student", "resnet8", "--dataset", "fake", "--device", "cpu"]
FP16_UNIT_ROUNDOFF = 2.0 ** -11  # fp16 keeps 11 significant bits: each rounding is off by at most 2^-11 relatively


def mock_gpu(monkeypatch, name, capability):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


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
    said = {"bf16": "bf16 autocast, bf16 is native here",
            "fp16": "fp16 autocast with loss scaling, bf16 is not native here"}[precision]
    assert lines[0].startswith(f"device: {name} (compute capability {config['capability']}): {said}; ")
    assert lines[0].endswith("; compiled" if compiled else
                             "; eager (torch.compile's Triton backend needs compute capability 7.0; --compile forces it)")
    assert len(lines) == 1  # nothing to warn about in a default


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
    assert lines[1] == ("warning: --precision bf16 on Tesla T4 (compute capability 7.5), which has no native bf16: "
                        "torch emulates it, slowly; --precision fp16 (the default here) runs on its tensor cores")
    args = train.parse_args([*TINY, "--precision", "fp16"])
    train.resolve_config(args)
    assert "warning: --precision fp16 on the CPU" in args.device_lines[1] and "--precision fp32" in args.device_lines[1]


@pytest.mark.parametrize("old, precision", [("--bf16", "bf16"), ("--no-bf16", "fp32")])
def test_the_old_bf16_switch_is_a_deprecated_alias(old, precision):
    args = train.parse_args([*TINY, old])
    assert train.resolve_config(args)["precision"] == precision and "precision" in args.given
    assert f"warning: {old} is deprecated: it means --precision {precision} (use that)" in args.device_lines
    with pytest.raises(SystemExit) as exit_info:
        train.resolve_config(train.parse_args([*TINY, old, "--precision", "fp16"]))
    assert f"--precision fp16 contradicts {old}" in str(exit_info.value.code)


def steps(precision, scaler, count=3):
    """`count` steps of resnet8 -> resnet8 (srd) on the CPU, eager; the loss terms, skipped flags and weights."""
    config = train.resolve_config(train.parse_args(["--teacher", "resnet8", "--student", "resnet8", "--device", "cpu",
                                                    "--precision", precision]))
    torch.manual_seed(1)
    teacher = train.build_on_device("resnet8", config).eval().requires_grad_(False)
    student, distill, optimizer = train.build_student(config, teacher)
    loss_fn = train.make_loss_fn(student, teacher, distill, config)
    x, y = next(iter(data.Loader(*data.fake_cifar100(32, seed=0), 32, True, "cpu")))
    terms, skipped = [torch.zeros(4)], []
    for _ in range(count):
        step_terms, _, step_skipped = train.train_step(loss_fn, optimizer, scaler, x, y, config)
        terms.append(step_terms.clone())
        skipped.append(int(step_skipped))
    weights = [p.detach().clone() for group in optimizer.param_groups for p in group["params"]]
    return torch.stack(terms[1:] or terms), skipped, weights


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
    untimed = [c for c in read_log(tmp_path / "straight")[0] if c not in ("epoch_time_s", "images_per_s")]
    assert [[r[c] for c in untimed] for r in read_log(tmp_path / "straight")] == \
           [[r[c] for c in untimed] for r in read_log(tmp_path / "resumed")]


def test_a_run_recorded_with_the_old_bf16_switch_resumes(tmp_path):
    datasets = (data.fake_cifar100(64, seed=0), data.fake_cifar100(50, seed=1))
    train.run(train.resolve_config(train.parse_args([*TINY, "--epochs", "1"])), tmp_path / "run", datasets=datasets)
    checkpoint = torch.load(tmp_path / "run/last.pt", weights_only=True)
    old = {key: value for key, value in checkpoint["config"].items()
           if key not in ("precision", "device_name", "capability", "train_subset")}
    old["bf16"] = False  # as train.py wrote it before --precision
    del checkpoint["config"], checkpoint["scaler"]  # and its checkpoints had neither
    torch.save(checkpoint, tmp_path / "run/last.pt")
    (tmp_path / "run/config.json").write_text(json.dumps(old))
    (tmp_path / "run/summary.json").unlink()
    args = train.parse_args(["--resume", str(tmp_path / "run"), "--epochs", "2"])
    config = train.resolve_config(args)
    config = train.runs.resumed_config(config, tmp_path / "run", args.given, train.runs.read_checkpoint(
        tmp_path / "run", None))
    assert config["precision"] == "fp32" and "bf16" not in config
    assert train.run(config, tmp_path / "run", resume=True, datasets=datasets)["last_epoch"] == 2
    assert json.loads((tmp_path / "run/config.json").read_text())["precision"] == "fp32"


def test_duration_reads_in_minutes_hours_and_days():
    assert devices.duration(90) == "2 min" and devices.duration(3 * 3600) == "3.0 h"
    assert devices.duration(47 * 3600) == "47.0 h" and devices.duration(49 * 3600) == "2.0 days"
