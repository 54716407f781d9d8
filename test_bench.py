"""The speed path changes no mathematics: the optimised training step against the plain one, and bench.py runs."""
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch._dynamo.testing

import bench
import data
import devices
import train


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
        for a, b in zip(plain_tensors, optimised_tensors):
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5)


def test_bench_runs_both_pipelines_on_cpu(capsys):
    results, failed = bench.main(["--teacher", "resnet8", "--student", "resnet8", "--steps", "2", "--warmup", "1",
                                  "--num-images", "128", "--workers", "0", "--device", "cpu"])
    assert set(results) == {(m, p) for m in train.METHODS for p in ("reference", "project")} and not failed
    assert all(r["images_per_s"] > 0 and r["recipe_minutes"] > 0 for r in results.values())
    out = capsys.readouterr().out
    assert out.startswith("timing pipelines (reference, project) x methods (srd, kd, none) = 6 measurement(s), each "
                          "1 warm-up + 2 timed steps: resnet8 -> resnet8, batch 64, workers 0 (reference), 128 images")
    assert "estimate: 5 more measurement(s), about " in out and "CPU-sized defaults" not in out
    assert "srd: project is " in out and "x as fast as reference (reference's " in out
    assert "project: an srd step takes " in out and "x the time of a kd step" in out
    assert "note: a timed window of 2 steps" in out and "too short for these figures to mean anything" in out


def test_bench_times_the_teacher_cache_and_its_fill_apart(capsys):
    results, failed = bench.main(["--teacher", "resnet8", "--student", "resnet8", "--steps", "2", "--warmup", "1",
                                  "--num-images", "34", "--batch-size", "32", "--workers", "0", "--device", "cpu",
                                  "--pipelines", "project", "cached", "--methods", "srd", "none"])
    assert not failed and set(results) == {("srd", "project"), ("none", "project"), ("srd", "cached")}
    assert results["srd", "cached"]["fill_minutes"] > 0 and results["srd", "project"]["fill_minutes"] == 0
    out = capsys.readouterr().out
    assert "teacher cache filled: 5,508 views" in out and "the cache's fill" in out
    assert "srd: cached is " in out and "x as fast as project (project's " in out


def test_bench_help_shows_the_defaults_and_the_cpu_smoke_command(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the help at the terminal's width
    assert "timed steps per measurement (default: 200 on CUDA, 20 on the CPU)" in out
    assert "(default: 30 on CUDA, 3 on the CPU)" in out and "(default: 50,000 on CUDA, 2,000 on the CPU)" in out
    assert f"(default: 8 on CUDA, {min(8, os.cpu_count())} on the CPU)" in out and "(default: 64)" in out
    assert "(default: None)" not in out  # a device-sized default is stated, not shown as argparse's None
    assert "--steps 3 --num-images 256 --workers 0 # CPU smoke run" in out


def test_bench_sizes_its_defaults_by_device_and_given_flags_win():
    cpu, cuda = bench.parse_args(["--device", "cpu"]), bench.parse_args(["--device", "cuda"])  # needs no GPU
    assert (cpu.steps, cpu.warmup, cpu.workers, cpu.num_images) == (20, 3, min(8, os.cpu_count()), 2000)
    assert (cuda.steps, cuda.warmup, cuda.workers, cuda.num_images) == (200, 30, 8, 50_000) and not cuda.cpu_defaults
    given = bench.parse_args(["--device", "cpu", "--steps", "7", "--workers", "0", "--num-images", "50000"])
    assert (given.steps, given.warmup, given.workers, given.num_images) == (7, 3, 0, 50_000)
    assert given.cpu_defaults == {"warmup": 3}  # only the flags left out, for main's note
    assert bench.parse_args(["--device", "cuda", "--warmup", "0"]).warmup == 0


def test_bench_says_what_it_times_and_estimates_the_rest(monkeypatch, capsys):
    """Measurements faked at 1 s per step and 30 s of warm-up: the header, the CPU note and the estimate's
    arithmetic ((30 + 20 x 1) s x 3 left = 2.5 min), printed once, after the first measurement that succeeds."""
    def fake(args, method, pipeline, images, labels):
        if (method, pipeline) == ("srd", "reference"):
            raise RuntimeError("simulated failure")
        return 1.0, 30.0, 0.0

    monkeypatch.setattr(bench, "time_pipeline", fake)
    bench.main(["--teacher", "resnet8", "--student", "resnet8", "--num-images", "128", "--device", "cpu",
                "--pipelines", "reference", "cached"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("timing pipelines (reference, cached) x methods (srd, kd, none) = 5 measurement(s) "
                               "(cached skips none: no teacher), each 3 warm-up + 20 timed steps: resnet8 -> resnet8, "
                               f"batch 64, workers {min(8, os.cpu_count())} (reference), 128 images, device cpu, torch")
    assert lines[1] == (f"on the CPU, CPU-sized defaults: --steps 20 --warmup 3 --workers {min(8, os.cpu_count())} "
                        "(CUDA's: --steps 200 --warmup 30 --workers 8); give a flag to change its value")
    estimates = [index for index, line in enumerate(lines) if line.startswith("estimate:")]
    assert len(estimates) == 1 and lines[estimates[0] - 1].startswith("kd   reference ")
    assert lines[estimates[0]] == ("estimate: 3 more measurement(s), about 2.5 min if each takes as long as this one's "
                                   "50.0 s of warm-up, timed steps and fill; rough, since pipelines and methods differ")
    given = ["--steps", "5", "--warmup", "1", "--workers", "0", "--num-images", "64", "--methods", "kd"]
    bench.main(["--teacher", "resnet8", "--student", "resnet8", "--device", "cpu", *given])
    out = capsys.readouterr().out
    assert "CPU-sized defaults" not in out and "each 1 warm-up + 5 timed steps" in out and "estimate: 1 more" in out


def test_bench_stops_cleanly_on_ctrl_c():
    """Ctrl-C as a terminal sends it, to the whole process group (the DataLoader workers too), once the first
    measurement is printed: one line on stderr, no traceback from any process, exit status 130."""
    bench_run = subprocess.Popen(
        [sys.executable, "bench.py", "--teacher", "resnet8", "--student", "resnet8", "--steps", "20", "--warmup", "1",
         "--batch-size", "16", "--num-images", "128", "--workers", "2", "--device", "cpu"],
        cwd=os.path.dirname(os.path.abspath(__file__)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),  # on a busy 2-core machine, a second thread makes steps ~40x slower
        start_new_session=True)  # its own process group, so that the signal below reaches it alone
    try:
        first = next((line for line in bench_run.stdout if line.startswith("srd  reference ")), None)
        assert first, bench_run.communicate(timeout=60)[1]  # it ended without measuring: its stderr says why
        os.killpg(bench_run.pid, signal.SIGINT)
        _, stderr = bench_run.communicate(timeout=60)
    finally:
        if bench_run.poll() is None:  # a failed wait above: leave no process behind
            os.killpg(bench_run.pid, signal.SIGKILL)
    assert bench_run.returncode == 130 and "Traceback" not in stderr, stderr
    assert "interrupted: 1 of 6 measurements finished (srd reference): their figures above stand" in stderr


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
    assert "simulated failure" in out.err and "kd   project    FAILED" in out.out


def test_cuda_graphs_need_cuda_and_compile(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.resolve_config(train.parse_args(["--student", "resnet8", "--device", "cpu", "--cuda-graphs"]))
    assert "--cuda-graphs needs a CUDA device and --compile" in str(exit_info.value.code)
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--pipelines", "graphs"])
    assert "needs --device cuda" in capsys.readouterr().err


def test_compiled_step_has_two_graphs_and_no_recompiles(monkeypatch):
    """Two epochs with a partial last batch and an evaluation between them: exactly two graphs are ever compiled
    (the full batch and the last partial one); a graph break or a recompile on the train/eval switch would add more."""
    counter = torch._dynamo.testing.CompileCounter()  # a backend that counts the graphs dynamo hands it
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, dynamic, mode: real_compile(fn, backend=counter, dynamic=dynamic))
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
        terms[bf16], _, _ = train.train_step(loss_fn, optimizer, torch.amp.GradScaler("cpu", enabled=False), x, y,
                                             config)
    assert terms[True].dtype == torch.float32
    assert not torch.equal(terms[True], terms[False])  # bf16 did run: its rounding shows in the last digits
    torch.testing.assert_close(terms[True], terms[False], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("argv, message", [
    (["--student", "resnet9"], "invalid choice: 'resnet9'"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--num-images", "0"], "every batch needs two images or more"),
    (["--num-images", "65"], "every batch needs two images or more"),  # 64 + a last batch of one
])
def test_bench_bad_arguments_fail_fast(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--device", "cpu", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_cuda_graph_fallback_is_counted_and_reported(tmp_path, monkeypatch, capsys):
    from torch._inductor.cudagraph_utils import log_cudagraph_skip_and_bump_counter as skip
    reason = "simulated: a graph torch declines to record"
    before = devices.cudagraph_skips()
    skip(reason)  # what inductor calls when it falls back
    assert devices.cudagraph_skips() == before + 1
    # a run whose first epoch falls back says so (on the CPU: --cuda-graphs forced on, the fallback simulated)
    real_epoch = train.train_one_epoch

    def epoch_with_fallback(*args, **kwargs):
        skip(reason)
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", epoch_with_fallback)
    config = train.resolve_config(train.parse_args(["--student", "resnet8", "--device", "cpu", "--epochs", "1"]))
    config["cuda_graphs"] = True
    train.run(config, tmp_path / "run", datasets=(data.fake_cifar100(64, seed=0), data.fake_cifar100(50, seed=1)))
    assert "torch declined to record CUDA graphs" in capsys.readouterr().out
