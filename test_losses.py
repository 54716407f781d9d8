"""losses.py against independent references: a naive float64 re-implementation, the analytic gradients its
docstrings state, autograd's gradcheck, and the properties the paper relies on."""
import math
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import losses
from losses import DISTANCES, NORMS, PROJECTORS, FeatureDistillation, kd_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BN_EPS, LOG_FLOOR, CORR_FLOOR = 1e-4, 1e-12, 1e-5  # the constants losses.py documents, restated independently


def features(batch, dim, seed, dtype=torch.float64):
    return torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def naive_projection(projector, z):
    """P(z) from the module's own weights, written out: z W^T + b, or relu(z W1^T + b1) W2^T + b2."""
    if isinstance(projector, nn.Identity):
        return z
    if isinstance(projector, nn.Linear):
        return z @ projector.weight.T + projector.bias
    first, _, second = projector
    return torch.clamp(z @ first.weight.T + first.bias, min=0) @ second.weight.T + second.bias


def naive_norm(norm, x):
    if norm == "bn":
        mean = x.sum(0) / x.shape[0]
        variance = ((x - mean) ** 2).sum(0) / x.shape[0]  # biased, as BatchNorm normalises with
        return (x - mean) / torch.sqrt(variance + BN_EPS)
    if norm == "gn":  # each sample's groups of consecutive features, standardised one by one
        groups = x.shape[1] // 16 or 1  # the dims tested: 6 (one group), 32 and 64 (groups of 16)
        rows = []
        for row in x:
            parts = []
            for part in row.chunk(groups):
                mean = part.sum() / len(part)
                parts.append((part - mean) / torch.sqrt(((part - mean) ** 2).sum() / len(part) + BN_EPS))
            rows.append(torch.cat(parts))
        return torch.stack(rows)
    if norm == "l2":
        return x / torch.sqrt((x ** 2).sum(1, keepdim=True)).clamp(min=1e-12)
    return x


def naive_distance(distance, student, teacher, alpha):
    r = student - teacher
    if distance == "logsum":
        return math.log(sum(abs(v) ** alpha for v in r.flatten().tolist()) + LOG_FLOOR)
    if distance == "pow":
        return sum(abs(v) ** alpha for v in r.flatten().tolist())
    if distance == "mse":
        return sum(v * v for v in r.flatten().tolist()) / r.numel()
    if distance == "l1":
        return sum(abs(v) for v in r.flatten().tolist()) / r.numel()
    batch, dim = r.shape
    correlations = [sum(student[b, j].item() * teacher[b, j].item() for b in range(batch)) / batch for j in range(dim)]
    return math.log(sum(abs(c - 1) ** 4 for c in correlations) + CORR_FLOOR)


@pytest.mark.parametrize("projector", PROJECTORS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("distance", DISTANCES)
def test_matches_naive_float64_reference(projector, norm, distance):
    student_dim = 6 if projector == "none" else 5
    torch.manual_seed(0)
    loss = FeatureDistillation(student_dim, 6, projector=projector, hidden_dim=7, norm=norm, distance=distance,
                               alpha=3.5).double()
    z_s, z_t = features(8, student_dim, 1), 2 * features(8, 6, 2) + 1
    expected = naive_distance(distance, naive_norm(norm, naive_projection(loss.projector, z_s)),
                              naive_norm(norm, z_t), 3.5)
    assert loss(z_s, z_t).item() == pytest.approx(expected, rel=1e-10, abs=1e-10)
    # batch statistics in eval mode too (train.py evaluates with model.eval())
    assert loss.eval()(z_s, z_t).item() == pytest.approx(expected, rel=1e-10, abs=1e-10)


def identity_loss(distance="logsum", alpha=4.0, dim=5):
    """With no projector and no normalisation r = z_s - z_t, so dD/dz_s = dD/dr."""
    return FeatureDistillation(dim, dim, projector="none", norm="none", distance=distance, alpha=alpha)


@pytest.mark.parametrize("alpha", [1.5, 4.0, 5.0])
def test_logsum_gradient_is_analytic(alpha):
    z_t, r = features(7, 5, 3), features(7, 5, 4)
    z_s = (z_t + r).requires_grad_(True)
    identity_loss(alpha=alpha)(z_s, z_t).backward()
    power_sum = (r.abs() ** alpha).sum() + LOG_FLOOR
    analytic = alpha * torch.sign(r) * r.abs() ** (alpha - 1) / power_sum
    torch.testing.assert_close(z_s.grad, analytic, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("distance, scale", [("mse", lambda b, d: 2 / (b * d)), ("pow", lambda b, d: 2)])
def test_squared_l2_projector_gradient_is_cs_w_minus_cst(distance, scale):
    """mse = ||Z_s W - Z_t||^2 / (B d_t) and pow (alpha=2) = ||Z_s W - Z_t||^2 are the paper's eq. 6.1 up to a constant,
    so dD/dW = constant * (C_s W - C_st) with C_s = Z_s^T Z_s, C_st = Z_s^T Z_t; nn.Linear stores W^T."""
    loss = FeatureDistillation(6, 4, projector="linear", norm="none", distance=distance, alpha=2.0).double()
    nn.init.zeros_(loss.projector.bias)
    z_s, z_t = features(10, 6, 5), features(10, 4, 6)
    loss(z_s, z_t).backward()
    w = loss.projector.weight.detach().T
    c_s, c_st = z_s.T @ z_s, z_s.T @ z_t
    torch.testing.assert_close(loss.projector.weight.grad.T, scale(10, 4) * (c_s @ w - c_st), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(c_s @ w - c_st, z_s.T @ (z_s @ w - z_t))  # the two forms of the issue agree


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("distance", DISTANCES)
def test_gradcheck_float64(norm, distance):
    loss = FeatureDistillation(4, 3, projector="linear", norm=norm, distance=distance, alpha=4.0).double()
    names = [name for name, _ in loss.named_parameters()]
    z_t = features(6, 3, 7)

    def d_of(z_s, *params):
        return torch.func.functional_call(loss, dict(zip(names, params)), (z_s, z_t))

    inputs = (features(6, 4, 8).requires_grad_(True),
              *(p.detach().clone().requires_grad_(True) for p in loss.parameters()))
    assert torch.autograd.gradcheck(d_of, inputs)


def test_scaling_r_adds_alpha_log_c():
    z_t, r = features(16, 8, 9), features(16, 8, 10)
    for alpha in (2.0, 4.0, 5.0):
        loss = identity_loss(alpha=alpha, dim=8)
        base = loss(z_t + r, z_t).item()
        for c in (0.1, 3.0, 10.0):
            assert loss(z_t + c * r, z_t).item() - base == pytest.approx(alpha * math.log(c), abs=1e-9)


@pytest.mark.parametrize("dim", [32, 64])
def test_groupnorm_standardises_groups_of_16_features(dim):
    """Table 6.1's GroupNorm at resnet20's width (64: 4 groups of 16) and at 32 (2 groups): against the naive
    reference, and its gradients against autograd's numerical ones."""
    torch.manual_seed(0)
    loss = FeatureDistillation(5, dim, projector="linear", norm="gn").double()
    z_s, z_t = features(8, 5, 1), 3 * features(8, dim, 2) - 1
    assert loss.student_norm.num_groups == dim // 16
    expected = naive_distance("logsum", naive_norm("gn", naive_projection(loss.projector, z_s)),
                              naive_norm("gn", z_t), 4.0)
    assert loss(z_s, z_t).item() == pytest.approx(expected, rel=1e-10)
    assert torch.autograd.gradcheck(lambda z: loss(z, z_t), (z_s.clone().requires_grad_(),))


def test_batchnormed_features_are_zero_mean_unit_variance():
    loss = FeatureDistillation(12, 9, projector="mlp", hidden_dim=16, norm="bn").double()
    student, teacher = loss.normalised_features(3 * features(64, 12, 11) + 5, 0.2 * features(64, 9, 12) - 2)
    for x in (student, teacher):
        torch.testing.assert_close(x.mean(0), torch.zeros(9, dtype=x.dtype), rtol=0, atol=1e-10)
        torch.testing.assert_close(x.var(0, unbiased=False), torch.ones(9, dtype=x.dtype), rtol=0, atol=3e-3)


def test_gradient_concentrates_on_largest_residual_as_alpha_grows():
    z_t, r = features(8, 6, 13), features(8, 6, 14)
    r[3, 2] = 1.5 * r.abs().max()  # one clearly worst-matched element
    shares = []
    for alpha in (1.0, 2.0, 4.0, 8.0, 16.0, 64.0):
        z_s = (z_t + r).requires_grad_(True)
        identity_loss(alpha=alpha, dim=6)(z_s, z_t).backward()
        shares.append((z_s.grad[3, 2].abs() / z_s.grad.abs().sum()).item())
    assert shares[0] == pytest.approx(1 / r.numel())  # alpha = 1: every element pulls equally
    assert all(a < b for a, b in zip(shares, shares[1:])), shares
    assert shares[-1] > 0.999


def test_projector_parameters_reach_optimizer_and_change():
    student = nn.Linear(8, 12)
    distill_loss = FeatureDistillation(12, 20, projector="mlp", hidden_dim=16)
    optimizer = torch.optim.SGD(list(student.parameters()) + list(distill_loss.parameters()), lr=0.1)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    projector_params = list(distill_loss.projector.parameters())
    assert projector_params and all(id(p) in in_optimizer for p in projector_params)
    before = [p.detach().clone() for p in projector_params]
    x = features(16, 8, 15, torch.float32)
    distill_loss(student(x), features(16, 20, 16, torch.float32)).backward()
    optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, projector_params))


def test_teacher_receives_no_gradient():
    z_t = features(8, 6, 17).requires_grad_(True)
    loss = FeatureDistillation(5, 6, projector="linear").double()
    loss(features(8, 5, 18), z_t).backward()
    assert z_t.grad is None
    teacher_logits = features(8, 10, 19).requires_grad_(True)
    kd_loss(features(8, 10, 20).requires_grad_(True), teacher_logits).backward()
    assert teacher_logits.grad is None


def test_copied_alone_into_empty_folder_imports_and_runs(tmp_path):
    shutil.copy(pathlib.Path(losses.__file__), tmp_path / "losses.py")
    script = ("import pathlib, torch, losses\n"
              "assert pathlib.Path(losses.__file__).parent == pathlib.Path.cwd()\n"
              "d = losses.FeatureDistillation(4, 6, hidden_dim=8)\n"
              "z_s = torch.randn(5, 4, requires_grad=True)\n"
              "d(z_s, torch.randn(5, 6)).backward()\n"
              "assert z_s.grad is not None\n"
              "print(float(losses.kd_loss(torch.randn(5, 3), torch.randn(5, 3))))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_loss_matches_naive_reference(temperature):
    s, t = 3 * features(5, 7, 21), 3 * features(5, 7, 22)
    total = 0.0
    for b in range(5):
        p_s = [math.exp(v / temperature) for v in s[b].tolist()]
        p_t = [math.exp(v / temperature) for v in t[b].tolist()]
        p_s, p_t = [v / sum(p_s) for v in p_s], [v / sum(p_t) for v in p_t]
        total += sum(q * math.log(q / p) for p, q in zip(p_s, p_t))
    expected = temperature ** 2 * total / 5
    assert kd_loss(s, t, temperature).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("distance", DISTANCES)
def test_float32_under_autocast(dtype, distance):
    torch.manual_seed(0)
    loss = FeatureDistillation(16, 24, projector="mlp", hidden_dim=32, distance=distance)
    z_s, z_t = features(32, 16, 23, dtype), features(32, 24, 24, dtype)  # what a low-precision backbone hands over
    expected = loss(z_s.float(), z_t.float())
    with torch.autocast("cpu", dtype=dtype):
        got = loss(z_s, z_t)
        kd = kd_loss(z_s, z_s.flip(0))
    assert got.dtype == torch.float32 and kd.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kd, kd_loss(z_s.float(), z_s.flip(0).float()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.5, 4.0])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("distance", DISTANCES)
def test_finite_at_exact_match(alpha, norm, distance):
    loss = FeatureDistillation(6, 6, projector="none", norm=norm, distance=distance, alpha=alpha)
    z = features(8, 6, 25, torch.float32)
    z_s = z.clone().requires_grad_(True)
    d = loss(z_s, z)
    d.backward()
    assert torch.isfinite(d) and torch.isfinite(z_s.grad).all()
    if distance == "logsum":
        assert d.item() == pytest.approx(math.log(LOG_FLOOR))


def test_compiles_without_graph_breaks():
    loss = FeatureDistillation(5, 6, projector="linear")
    z_s, z_t = features(8, 5, 26, torch.float32), features(8, 6, 27, torch.float32)
    compiled = torch.compile(loss, backend="eager", fullgraph=True)  # fullgraph: a .item() or value branch fails
    torch.testing.assert_close(compiled(z_s, z_t), loss(z_s, z_t))


@pytest.mark.parametrize("make, call, message", [
    (lambda: FeatureDistillation(4, 6), lambda d: d(torch.randn(3, 2, 4), torch.randn(3, 6)), "2-D"),
    (lambda: FeatureDistillation(4, 6), lambda d: d(torch.randn(4), torch.randn(3, 6)), "2-D"),
    (lambda: FeatureDistillation(4, 6), lambda d: d(torch.randn(3, 5), torch.randn(3, 6)), "dim 5.*built for 4"),
    (lambda: FeatureDistillation(4, 6), lambda d: d(torch.randn(3, 4), torch.randn(3, 7)), "dim 7.*built for 6"),
    (lambda: FeatureDistillation(4, 6), lambda d: d(torch.randn(3, 4), torch.randn(2, 6)), "batch sizes differ"),
    (lambda: FeatureDistillation(4, 6), lambda d: d(torch.randn(1, 4), torch.randn(1, 6)), "at least 2"),
    (lambda: FeatureDistillation(4, 6, alpha=0), None, "alpha must be > 0"),
    (lambda: FeatureDistillation(4, 6, alpha=-1.0), None, "alpha must be > 0"),
    (lambda: FeatureDistillation(4, 6, projector="conv"), None, "projector 'conv'; valid: mlp, linear, none"),
    (lambda: FeatureDistillation(4, 6, norm="ln"), None, "norm 'ln'; valid: bn, gn, l2, none"),
    (lambda: FeatureDistillation(4, 6, distance="kl"), None, "distance 'kl'; valid: logsum, mse, l1, pow, corr"),
    (lambda: FeatureDistillation(4, 6, projector="none"), None, "projector='none' needs equal dims"),
    (lambda: None, lambda _: kd_loss(torch.randn(3, 5), torch.randn(3, 6)), "one shape"),
    (lambda: None, lambda _: kd_loss(torch.randn(3, 5), torch.randn(3, 5), temperature=0), "temperature"),
])
def test_bad_input_raises_readable_value_error(make, call, message):
    with pytest.raises(ValueError, match=message):
        module = make()
        if call is not None:
            call(module)


def test_batch_of_one_is_fine_without_batch_statistics():
    assert torch.isfinite(FeatureDistillation(4, 6, norm="l2")(torch.randn(1, 4), torch.randn(1, 6)))


def test_spectrum_counts_and_effective_rank_match_numpy_on_known_singular_values():
    """A 64 x 32 weight built with singular values 10, 5, 1, 0.2, 0.05, 0.001 and 26 zeros: 4 above 1% of the largest,
    and the effective rank exp(H(s / sum s)) as numpy's SVD gives it."""
    rng = np.random.default_rng(0)
    left, _ = np.linalg.qr(rng.normal(size=(64, 64)))
    right, _ = np.linalg.qr(rng.normal(size=(32, 32)))
    chosen = np.array([10, 5, 1, 0.2, 0.05, 0.001] + [0] * 26)
    weight = left[:, :32] @ np.diag(chosen) @ right.T
    count, effective_rank = losses.spectrum(torch.tensor(weight, dtype=torch.float32))
    singular_values = np.linalg.svd(weight, compute_uv=False)
    p = singular_values / singular_values.sum()
    assert count == 4 == (singular_values > 0.01 * singular_values[0]).sum()
    assert effective_rank == pytest.approx(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum()), rel=1e-4)


@pytest.mark.parametrize("projector, layers", [("mlp", 2), ("linear", 1), ("none", 0)])
def test_feature_distillation_reports_the_spectrum_of_each_linear_layer(projector, layers):
    spectra = losses.FeatureDistillation(64, 64, projector=projector).spectrum()
    assert sorted(spectra) == sorted(f"proj{i}_{what}" for i in range(1, layers + 1)
                                     for what in ("sv_over_1pct", "effective_rank"))
