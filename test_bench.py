"""The speed path changes no mathematics: the optimised training step against the plain one, and bench.py runs."""
import torch

import bench
import data
import train


def two_steps(optimised, method="srd"):
    """Two training steps of resnet8 -> resnet8 on CPU in fp32; returns the losses, first gradients and weights."""
    flags = ["--channels-last", "--compile", "--fused-sgd"] if optimised else ["--no-channels-last", "--no-compile"]
    config = train.resolve_config(train.parse_args(["--teacher", "resnet8", "--student", "resnet8", "--method",
                                                    method, "--device", "cpu", "--no-bf16", *flags]))
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
    results = bench.main(["--teacher", "resnet8", "--student", "resnet8", "--steps", "2", "--warmup", "1",
                          "--num-images", "128", "--workers", "0", "--device", "cpu"])
    assert set(results) == {(m, p) for m in train.METHODS for p in ("reference", "project")}
    assert all(r["images_per_s"] > 0 and r["recipe_minutes"] > 0 for r in results.values())
    out = capsys.readouterr().out
    assert "srd: project / reference =" in out and "project: srd step time / kd step time =" in out
