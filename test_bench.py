"""The speed path changes no mathematics: the optimised training step against the plain one, and bench.py runs.
Also here: cli.inert (the settings that change nothing) against train.py's loss itself."""
import os

import pytest
import torch
import torch._dynamo.testing

import bench
import cli
import data
import train
from test_report import cpu_config


def two_steps(optimised, method="srd"):
    """Two training steps of resnet8 -> resnet8 on CPU in fp32; returns the losses, first gradients and weights."""
    flags = ["--channels-last", "--compile", "--fused-sgd"] if optimised else ["--no-channels-last", "--no-compile"]
    config = train.resolve_config(train.parse_args(["--teacher", "resnet8", "--student", "resnet8", "--method",
                                                    method, "--device", "cpu", "--precision", "fp32", *flags]))
    torch.manual_seed(1)
    teacher = train.build_on_device("resnet8", config).eval().requires_grad_(False)
    student, distill, optimizer = train.build_student(config, teacher)
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    if not optimised:  # the textbook update: torch's per-parameter loop instead of the fused kernel
        optimizer = torch.optim.SGD(parameters, lr=config["lr"], momentum=0.9, weight_decay=config["weight_decay"],
                                    foreach=False)
    loss_fn = train.make_loss_fn(student, teacher, distill, config)
    images, labels = data.fake_cifar100(32, seed=0)
    x, y = next(iter(data.Loader(images, labels, 32, True, "cpu")))
    totals, first_gradients = [], None
    for _ in range(2):
        if config["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        total, terms, _ = loss_fn(x, y)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        first_gradients = first_gradients or [p.grad.clone() for p in parameters]
        optimizer.step()
        totals.append(terms.detach().clone())
    return totals, first_gradients, [p.detach().clone() for p in parameters]


def test_optimised_step_matches_plain_step():
    plain, optimised = two_steps(False), two_steps(True)
    for plain_terms, optimised_terms in zip(plain[0], optimised[0]):  # ce, feat, kd, total of each step
        torch.testing.assert_close(optimised_terms, plain_terms, rtol=1e-4, atol=1e-5)
    for plain_tensors, optimised_tensors in zip(plain[1:], optimised[1:]):  # gradients, then weights
        # atol 5e-5: on one thread (OMP_NUM_THREADS=1) inductor sums in another order, 2.5e-5 apart (measured)
        for a, b in zip(plain_tensors, optimised_tensors):
            torch.testing.assert_close(b, a, rtol=1e-3, atol=5e-5)


def test_bench_runs_both_pipelines_on_cpu(capsys):
    results, failed = bench.main(["--teacher", "resnet8", "--student", "resnet8", "--steps", "2", "--warmup", "1",
                                  "--num-images", "128", "--workers", "0", "--device", "cpu"])
    assert set(results) == {(m, p) for m in train.cli.METHODS for p in ("reference", "project")} and not failed
    assert all(r["step_ms"] > 0 and r["images_per_s"] == pytest.approx(64e3 / r["step_ms"]) and r["warmup_s"] > 0
               for r in results.values())
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("resnet8 -> resnet8, batch 64, 128 images, 0 workers (reference), 1 warm-up + 2 timed "
                               f"steps, cpu, torch {torch.__version__}")
    assert lines[1].split() == ["method", "pipeline", "ms/step", "images/s", "warm-up", "s"]
    for line, (method, pipeline) in zip(lines[2:], [(m, p) for p in ("reference", "project") for m in train.cli.METHODS]):
        row = results[method, pipeline]
        assert line.split() == [method, pipeline, *(f"{row[key]:.2f}" for key in ("step_ms", "images_per_s",
                                                                                 "warmup_s"))]


def test_bench_help_shows_the_defaults_and_the_cpu_smoke_command(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the help at the terminal's width
    assert "timed steps per measurement (default 200 on CUDA, 20 on the CPU)" in out
    assert "(default 30 on CUDA, 3 on the CPU)" in out and "(default 50,000 on CUDA, 2,000 on the CPU)" in out
    assert f"(RepDistiller's 8) (default: {min(8, os.cpu_count())})" in out and "(default: 64)" in out
    assert "(default: None)" not in out  # a device-sized default is stated, not shown as argparse's None
    assert "--steps 3 --num-images 256 --workers 0 # CPU smoke run" in out


def test_bench_sizes_its_defaults_by_device_and_given_flags_win():
    cpu, cuda = bench.parse_args(["--device", "cpu"]), bench.parse_args(["--device", "cuda"])  # needs no GPU
    assert (cpu.steps, cpu.warmup, cpu.workers, cpu.num_images) == (20, 3, min(8, os.cpu_count()), 2000)
    assert (cuda.steps, cuda.warmup, cuda.num_images) == (200, 30, 50_000)
    assert cpu.pipelines == cuda.pipelines == ["reference", "project"]
    given = bench.parse_args(["--device", "cpu", "--steps", "7", "--workers", "0", "--num-images", "50000"])
    assert (given.steps, given.warmup, given.workers, given.num_images) == (7, 3, 0, 50_000)
    assert bench.parse_args(["--device", "cuda", "--warmup", "0"]).warmup == 0


def test_bench_reports_a_failing_variant_and_goes_on(monkeypatch, capsys):
    real = bench.time_pipeline

    def broken_kd(args, method, pipeline, images, labels):
        if method == "kd":
            raise RuntimeError("simulated failure")
        return real(args, method, pipeline, images, labels)

    monkeypatch.setattr(bench, "time_pipeline", broken_kd)
    results, failed = bench.main(["--teacher", "resnet8", "--student", "resnet8", "--steps", "1", "--warmup", "1",
                                  "--num-images", "64", "--workers", "0", "--device", "cpu", "--pipelines", "project"])
    assert failed == [("kd", "project")] and set(results) == {("srd", "project"), ("none", "project")}
    out = capsys.readouterr()
    assert "simulated failure" in out.err and out.out.splitlines()[3] == "kd     project   FAILED (traceback on stderr)"
    assert [line.split()[0] for line in out.out.splitlines()[2:]] == ["srd", "kd", "none"]  # in order, none lost


def test_compiled_step_has_two_graphs_and_no_recompiles(monkeypatch):
    """Two epochs with a partial last batch and an evaluation between them: exactly two graphs are ever compiled
    (the full batch and the last partial one); a graph break or a recompile on the train/eval switch would add more."""
    counter = torch._dynamo.testing.CompileCounter()  # a backend that counts the graphs dynamo hands it
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, dynamic: real_compile(fn, backend=counter, dynamic=dynamic))
    torch._dynamo.reset()
    config = train.resolve_config(train.parse_args(["--teacher", "resnet8", "--student", "resnet8", "--device", "cpu",
                                                    "--compile"]))
    teacher = train.build_on_device("resnet8", config).eval().requires_grad_(False)
    student, distill, optimizer = train.build_student(config, teacher)
    loss_fn = train.make_loss_fn(student, teacher, distill, config)
    images, labels = data.fake_cifar100(96, seed=0)  # one batch of 64 and a last one of 32
    loader = data.Loader(images, labels, 64, True, "cpu")
    for _ in range(2):
        train.train_one_epoch(loss_fn, optimizer, torch.amp.GradScaler("cpu", enabled=False), loader, config)
        train.evaluate(student, data.Loader(images, labels, 50, False, "cpu"), config)
    assert counter.frame_count == 2
    torch._dynamo.reset()


def test_bf16_autocast_step_on_cpu_stays_close_to_float32():
    """The bf16 path of GPUs of compute capability 8.0+, run by the CPU's autocast: the loss terms stay float32 and
    near fp32's."""
    terms = {}
    for bf16 in (False, True):
        config = train.resolve_config(train.parse_args([
            "--teacher", "resnet8", "--student", "resnet8", "--method", "srd", "--device", "cpu", "--no-compile",
            "--channels-last", "--fused-sgd", "--precision", "bf16" if bf16 else "fp32"]))
        torch.manual_seed(1)
        teacher = train.build_on_device("resnet8", config).eval().requires_grad_(False)
        student, distill, optimizer = train.build_student(config, teacher)
        loss_fn = train.make_loss_fn(student, teacher, distill, config)
        x, y = next(iter(data.Loader(*data.fake_cifar100(32, seed=0), 32, True, "cpu")))
        terms[bf16], _, _ = train.train_step(loss_fn, optimizer, torch.amp.GradScaler("cpu", enabled=False), x, y)
    assert terms[True].dtype == torch.float32
    assert not torch.equal(terms[True], terms[False])  # bf16 did run: its rounding shows in the last digits
    torch.testing.assert_close(terms[True], terms[False], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("argv, message", [
    (["--student", "resnet9"], "invalid choice: 'resnet9'"),
    (["--steps", "0"], "argument --steps: must be at least 1 and at most 100000, got 0"),
    (["--steps", "100001"], "argument --steps: must be at least 1 and at most 100000"),
    (["--warmup", "-1"], "argument --warmup: must be at least 0"),
    (["--warmup", "99999999999999999999"], "argument --warmup: must be at least 0 and at most 10000"),
    (["--workers", "99999999999999999999"], "--workers: must be at least 0 and at most 32 (each is a process)"),
    (["--workers", "-1"], "argument --workers: must be at least 0"),
    (["--batch-size", "1"], "argument --batch-size: must be at least 2"),
    (["--batch-size", "99999999999999999999"], "argument --batch-size: must be at least 2 and at most 4096"),
    (["--num-images", "0"], "argument --num-images: must be at least 2"),
    (["--num-images", "99999999999999999999"], "argument --num-images: must be at least 2 and at most 100000"),
    (["--num-images", "65"], "leaves a last batch of one image"),  # 64 + a last batch of one
])
def test_bench_bad_arguments_fail_fast(argv, message, capsys):
    """Each count is bounded where it is parsed: --workers 99999999999999999999 forked workers until killed."""
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--device", "cpu", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_bench_refuses_a_cuda_device_this_machine_lacks_in_one_paragraph(monkeypatch, capsys):
    """It was a traceback (torch.cuda.get_device_name); train.py's refusal, devices.check, now says why."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cuda", "--steps", "1"])
    assert exit_info.value.code.startswith("error: --device cuda, but torch") and "\n" not in exit_info.value.code
    assert capsys.readouterr().out == ""  # refused before anything runs


def batch_terms(config):
    """The loss terms (ce, feat, kd, total) of train.make_loss_fn on one batch of resnet8 -> resnet8 (or alone)."""
    torch.manual_seed(0)
    teacher = train.build_on_device("resnet8", config).eval().requires_grad_(False) if config["teacher"] else None
    student, distill, _ = train.build_student(config, teacher)
    x, y = next(iter(data.Loader(*data.fake_cifar100(16, seed=0), 16, False, "cpu")))
    return train.make_loss_fn(student, teacher, distill, config)(x, y)[1]


@pytest.mark.parametrize("argv", [
    [], ["--teacher", "resnet8"], ["--teacher", "resnet8", "--projector", "linear"],
    ["--teacher", "resnet8", "--projector", "none", "--distance", "mse"],
    ["--teacher", "resnet8", "--distance", "corr"], ["--teacher", "resnet8", "--feat-weight", "0"],
    ["--teacher", "resnet8", "--kd-weight", "0.5"], ["--teacher", "resnet8", "--method", "kd"],
    ["--teacher", "resnet8", "--method", "kd", "--kd-weight", "0"]])
def test_inert_names_the_settings_that_change_no_loss(argv, one_torch_thread, monkeypatch):
    """cli.inert against train.py itself: each setting it names, given otherwise on the command line, leaves a batch's
    loss terms bit-identical; each other one changes them."""
    config, inert = cpu_config(*argv, "--no-compile"), cli.inert
    monkeypatch.setattr(cli, "inert", lambda config: set())  # train.py refuses such a flag: here it is measured
    terms, unchanged = batch_terms(config), set()
    for key, values in {"feat_weight": ("1", "2"), "kd_weight": ("0.5", "0.9"), "temperature": ("2", "4"),
                        "projector": ("linear", "mlp"), "hidden_dim": ("512", "1024"), "norm": ("gn", "bn"),
                        "distance": ("pow", "logsum"), "alpha": ("2", "4")}.items():
        value = next(value for value in values if value != str(config[key]).removesuffix(".0"))
        if torch.equal(batch_terms(cpu_config(*argv, "--no-compile", f"--{key.replace('_', '-')}", value)), terms):
            unchanged.add(key)
    assert unchanged == inert(config)
