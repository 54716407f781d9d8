"""Distillation losses: the projector + normalisation + LogSum feature loss, and Hinton's KD. Imports only torch.

Miles & Mikolajczyk, "Understanding the Role of the Projector in Knowledge Distillation" (AAAI 2024,
arXiv 2303.11098), section "Understanding the Role of the Projector"; equation and table numbers below are those of
the thesis version (R. Miles, PhD thesis, Imperial College London, 2024, ch. 6, Sec. 6.3 and Sec. 6.6).

With z_s (B x d_s) the student's pooled features, z_t (B x d_t) the frozen teacher's, P the projector and N the
normalisation, the residual is  r = N(P(z_s)) - N(z_t)  (B x d_t) and the paper's loss (eq. 6.12) is the LogSum

    D = log S,   S = sum_{b,j} |r_bj|^alpha        (one log per batch; alpha = 4 in the paper's code)
    dD/dr_i = alpha * sign(r_i) * |r_i|^(alpha-1) / S

so each element's pull is weighted by |r_i|^(alpha-1) / S: the worst-matched elements of the batch dominate and, as
alpha grows, D tends to a hard maximum (the paper's answer to a large capacity gap). Scaling r -> c r only adds
alpha * log c to D. Why the projector matters (eqs. 6.1-6.7): for D = 1/2 ||Z_s W - Z_t||^2 with a linear W (no bias),

    dD/dW = C_s W - C_st,   C_s = Z_s^T Z_s,   C_st = Z_s^T Z_t

so gradient descent moves W towards C_s^-1 C_st (the cross-correlation C_st when C_s = I). With C_s = I a step of size
a is W <- (1 - a - eta) W + a C_st: a moving average of past batches' C_st, relational information at no memory cost,
even with no weight decay; weight decay eta shortens its memory, ~1/(a+eta) steps, and shrinks it (theory.ipynb sec. 4).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

PROJECTORS = ("mlp", "linear", "none")
NORMS = ("bn", "gn", "l2", "none")
DISTANCES = ("logsum", "mse", "l1", "pow", "corr")

# LogSum floor: D = log(S + LOG_FLOOR). At alpha = 4 with a batch of 64 x 256 features, S reaches 1e-12 only when
# every residual is below ~1e-4 standard deviations, far beneath anything training resolves yet far above float32
# rounding noise (~1e-7 per element, ~1e-28 per |r|^4), so an exact match gives the finite D = log(1e-12) = -27.6
# with a zero gradient instead of log(0) = -inf and NaN gradients.
LOG_FLOOR = 1e-12
CORR_FLOOR = 1e-5  # the paper's own constant in the correlation variant
BN_EPS = 1e-4  # the paper's choice (Sec. 6.4, implementation details); GroupNorm's too, for a like comparison
GN_CHANNELS = 16  # per group: Wu & He (ECCV 2018, Table 3) found 16 within 0.2 points of their best setting


def _check_choice(kind, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; valid: {', '.join(choices)}")


def build_projector(student_dim, teacher_dim, projector="mlp", hidden_dim=1024):
    """P: student_dim -> teacher_dim. "linear": one Linear with bias (the paper's ImageNet code). "mlp": Linear-ReLU-
    Linear with hidden_dim units; the paper says only "an MLP projector with a hidden size of 1024" for CIFAR-100,
    leaving depth and activation open, so this is our reading. "none": identity, only when the dims agree."""
    _check_choice("projector", projector, PROJECTORS)
    if projector == "linear":
        return nn.Linear(student_dim, teacher_dim)
    if projector == "mlp":
        return nn.Sequential(nn.Linear(student_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, teacher_dim))
    if student_dim != teacher_dim:
        raise ValueError(f"projector='none' needs equal dims, got student_dim={student_dim}, teacher_dim={teacher_dim}")
    return nn.Identity()


class L2Normalise(nn.Module):
    """Each row scaled to unit L2 norm: x / max(||x||_2, 1e-12)."""

    def forward(self, features):
        return F.normalize(features, dim=1)


def build_norm(norm, dim):
    """N. "bn": BatchNorm1d with no affine parameters, eps = 1e-4, and always batch statistics, in eval mode too
    (track_running_stats=False): (x - mean_b x) / sqrt(var_b x + 1e-4), biased variance. "gn" (Table 6.1's
    GroupNorm): the same per sample over each group of consecutive features, no affine parameters; gcd(dim, dim // 16)
    groups, which divides any dim: groups of GN_CHANNELS for the zoo's widths, all multiples of 16 (4 for resnet20's
    64), one group (a per-sample standardisation) below 32. "l2": unit rows. "none"."""
    _check_choice("norm", norm, NORMS)
    if norm == "bn":
        return nn.BatchNorm1d(dim, eps=BN_EPS, affine=False, track_running_stats=False)
    if norm == "gn":
        return nn.GroupNorm(math.gcd(dim, max(1, dim // GN_CHANNELS)), dim, eps=BN_EPS, affine=False)
    return L2Normalise() if norm == "l2" else nn.Identity()


class FeatureDistillation(nn.Module):
    """D(z_s, z_t) between student features (B x student_dim) and teacher features (B x teacher_dim); unweighted.

    r = N_s(P(z_s)) - N_t(z_t), with separate norm instances N_s, N_t; the teacher side is detached. distance:
      "logsum": D = log(sum_{b,j} |r_bj|^alpha + 1e-12)      (the paper's, eq. 6.12; the floor: see LOG_FLOOR)
      "pow":    D = sum_{b,j} |r_bj|^alpha                   (the same without the log)
      "mse":    D = mean_{b,j} r_bj^2                        (mean over all B x d_t elements, as F.mse_loss)
      "l1":     D = mean_{b,j} |r_bj|                        (mean over all B x d_t elements, as F.l1_loss)
      "corr":   c_j = mean_b N_s(P(z_s))_bj * N_t(z_t)_bj,  D = log(sum_j |c_j - 1|^4 + 1e-5)
                (Table 6.9's correlation variant; its exponent is fixed at 4 and alpha is not used)
    Computed in float32 whatever the autocast (float64 if the inputs and parameters are float64), with no Python
    branching on tensor values, so torch.compile traces it whole.

    The projector must be trained (the paper's first release forgot it), so give its parameters to the optimizer:

        student, teacher = nn.Linear(32, 64), nn.Linear(32, 128)   # stand-ins returning features
        distill_loss = FeatureDistillation(64, 128)
        optimizer = torch.optim.SGD(list(student.parameters()) + list(distill_loss.parameters()), lr=0.05)
        x = torch.randn(16, 32)
        with torch.no_grad():
            teacher_features = teacher(x)
        loss = distill_loss(student(x), teacher_features)   # add to the task loss with its weight
        loss.backward()
        optimizer.step()
    """

    def __init__(self, student_dim, teacher_dim, projector="mlp", hidden_dim=1024, norm="bn", distance="logsum",
                 alpha=4.0):
        super().__init__()
        _check_choice("distance", distance, DISTANCES)
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        self.student_dim, self.teacher_dim, self.norm, self.distance, self.alpha = (
            student_dim, teacher_dim, norm, distance, float(alpha))
        self.projector = build_projector(student_dim, teacher_dim, projector, hidden_dim)
        self.student_norm = build_norm(norm, teacher_dim)
        self.teacher_norm = build_norm(norm, teacher_dim)

    def spectrum(self):
        """spectrum() of each linear layer of the projector, as {"proj1_sv_over_1pct": ..., ...}: train.py's log."""
        layers = [m.weight for m in self.projector.modules() if isinstance(m, nn.Linear)]
        return {f"proj{i}_{name}": value for i, weight in enumerate(layers, 1)
                for name, value in zip(("sv_over_1pct", "effective_rank"), spectrum(weight))}

    def extra_repr(self):
        return f"norm={self.norm!r}, distance={self.distance!r}, alpha={self.alpha}"

    def _check(self, student_features, teacher_features):
        for name, features, dim in (("student", student_features, self.student_dim),
                                    ("teacher", teacher_features, self.teacher_dim)):
            if features.ndim != 2:
                raise ValueError(f"{name}_features must be 2-D (batch x dim), got shape {tuple(features.shape)}")
            if features.shape[1] != dim:
                raise ValueError(f"{name}_features has dim {features.shape[1]}, this loss was built for {dim}")
        if student_features.shape[0] != teacher_features.shape[0]:
            raise ValueError(f"batch sizes differ: student {len(student_features)}, teacher {len(teacher_features)}")
        if self.norm == "bn" and student_features.shape[0] < 2:
            raise ValueError("norm='bn' uses batch statistics and needs a batch of at least 2")

    def normalised_features(self, student_features, teacher_features):
        """(N_s(P(z_s)), N_t(z_t)), both B x teacher_dim, in float32 (or wider) outside any autocast."""
        self._check(student_features, teacher_features)
        dtype = torch.promote_types(student_features.dtype, torch.float32)
        # bf16 would round r^4 sums and the BN statistics badly: this part always runs in float32
        with torch.autocast(student_features.device.type, enabled=False):
            student = self.student_norm(self.projector(student_features.to(dtype)))
            teacher = self.teacher_norm(teacher_features.detach().to(dtype))
        return student, teacher

    def forward(self, student_features, teacher_features):
        student, teacher = self.normalised_features(student_features, teacher_features)
        # float32 from here, under autocast too: it lowers matmuls and convolutions, none of which follow
        if self.distance == "corr":
            correlation = (student * teacher).mean(dim=0)
            return torch.log((correlation - 1).abs().pow(4).sum() + CORR_FLOOR)
        residual = student - teacher
        if self.distance == "mse":
            return residual.pow(2).mean()
        if self.distance == "l1":
            return residual.abs().mean()
        magnitude = residual.abs()
        # for alpha < 1, |r|^alpha has an infinite slope at r = 0: take it as 0 there, not 0 * inf = NaN
        powers = torch.where(magnitude > 0, magnitude.clamp_min(1e-30).pow(self.alpha), 0.0)
        power_sum = powers.sum()
        return power_sum if self.distance == "pow" else torch.log(power_sum + LOG_FLOOR)


def kd_loss(student_logits, teacher_logits, temperature=4.0):
    """Hinton's KD: T^2 * mean_b sum_k p_t,bk (log p_t,bk - log p_s,bk), p = softmax(logits / T), i.e.
    KL(teacher || student) summed over classes and averaged over the batch (the CRD/RepDistiller definition;
    T = 1 gives the paper's ImageNet KL term). Float32 under autocast; the teacher side is detached."""
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
        raise ValueError(f"logits must be 2-D and of one shape, got {tuple(student_logits.shape)} "
                         f"and {tuple(teacher_logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    with torch.autocast(student_logits.device.type, enabled=False):
        student_log_probs = F.log_softmax(student_logits.to(dtype) / temperature, dim=1)
        teacher_log_probs = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=1)
        kl = F.kl_div(student_log_probs, teacher_log_probs, reduction="batchmean", log_target=True)
    return kl * temperature ** 2


def spectrum(weight, floor=0.01):
    """How many directions a projector layer keeps (Sec. 6.3, Fig. 6.2: without BatchNorm many of its singular values
    shrink towards zero): (the number of singular values above floor x the largest, the effective rank
    exp(H(s / sum s)), Roy & Vetterli 2007, which needs no threshold). One small SVD, on the CPU."""
    singular_values = torch.linalg.svdvals(weight.detach().float().cpu())
    p = singular_values / singular_values.sum()
    return (int((singular_values > floor * singular_values[0]).sum()),
            float(torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum())))
