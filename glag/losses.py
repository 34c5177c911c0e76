"""Losses of both stages and the τ(t) schedules (METHOD.md, "Stage one" and "Stage two" step 8).

All losses take logits ``z`` (B, C) float32 and integer targets ``y`` (B,) int64 and return a
scalar mean over the batch. ``log_prior`` is log π_c, (C,) float32, π_c = n_c / Σ n_j.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SCHEDULES = ("convex", "linear", "concave", "power", "step", "constant")


def tau_schedule(t: float, T: float, kind: str = "power", alpha: float = 1.0, beta: float = 2.0,
                 step_at: float = 0.5) -> float:
    """τ(t) of METHOD.md: ``τ(t) = α·(t/T)^β`` [paper], with named variants.

    Args:
        t: progress in epochs (0-based; fractional values allowed for per-step schedules).
        T: the stage's number of epochs. t/T is clipped to [0, 1].
        kind: ``"power"`` (α(t/T)^β, β as given), ``"convex"`` (β = 2 unless given > 1),
            ``"linear"`` (β = 1), ``"concave"`` (β = 0.5 unless given < 1), ``"step"``
            (0 before ``step_at``·T, α after: deferred re-weighting's shape), ``"constant"`` (α always).
        alpha, beta: α and β of the equation. [ours] defaults α = 1, β = 2.
    Returns:
        τ as a Python float.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown τ schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
    if not T > 0:
        raise ValueError(f"the number of epochs T must be positive, got {T}")
    if not math.isfinite(t):
        raise ValueError(f"the progress t must be a finite number of epochs, got {t}")
    p = min(max(t / T, 0.0), 1.0)
    if kind == "constant":
        return float(alpha)
    if kind == "step":
        return float(alpha) if p >= step_at else 0.0
    if kind == "linear":
        beta = 1.0
    elif kind == "convex" and beta <= 1.0:
        beta = 2.0
    elif kind == "concave" and beta >= 1.0:
        beta = 0.5
    return float(alpha) * p ** beta


def log_prior(class_counts) -> torch.Tensor:
    """log π_c from training counts n_c: (C,) float32. Every class needs n_c ≥ 1."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if (counts <= 0).any():
        bad = torch.nonzero(counts <= 0).flatten().tolist()
        raise ValueError(f"classes {bad[:10]} have no training samples; log π is undefined for them")
    return torch.log(counts / counts.sum()).float()


def logit_adjusted_ce(z: torch.Tensor, y: torch.Tensor, log_pi: torch.Tensor, tau: float) -> torch.Tensor:
    """``L = CE(z + τ·log π, y)`` (METHOD.md, stage one [paper]).

    τ = 0 is plain cross entropy, τ = 1 is Balanced Softmax. At test time the raw z is used, so
    the adjustment only shapes training.
    """
    if tau == 0.0:
        return F.cross_entropy(z, y)
    return F.cross_entropy(z + tau * log_pi.to(z.device, z.dtype), y)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """``T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))`` averaged over the batch (METHOD.md step 8 [ours]).

    Args: student, teacher: (B, C) logits; the teacher carries no gradient.
    """
    if student.numel() == 0:
        return student.sum() * 0.0
    t = temperature
    log_p_student = F.log_softmax(student / t, dim=1)
    log_p_teacher = F.log_softmax(teacher.detach() / t, dim=1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)
    return (t * t) * kl.mean()


def ce_kd_logit_grad(
    z: torch.Tensor,
    y: torch.Tensor,
    kd_rows: torch.Tensor | None = None,
    teacher: torch.Tensor | None = None,
    tau: float = 0.0,
    temperature: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Stage two's loss ``L = CE(z, y) + τ·KD(z[kd_rows], teacher)`` and its gradient in closed form.

    METHOD.md step 8, with the reductions of ``F.cross_entropy`` (mean over the batch) and
    :func:`kd_loss` (mean over the KD rows); the gradient with respect to the logits is
        ``∂L/∂z = (softmax(z) − onehot(y)) / B  +  τ·T·(softmax(z/T) − softmax(z_t/T)) / n_kd``
    (the second term on the KD rows only). For a linear head ``z = x Wᵀ + b`` this gives
    ``∂L/∂W = (∂L/∂z)ᵀ x`` and ``∂L/∂b = Σ_rows ∂L/∂z`` with two small GEMMs and no autograd
    graph: several times faster on stage two's tiny heads. The autograd loss is the test oracle.

    Args:
        z: (B, C) float32 logits.  y: (B,) int64 labels.
        kd_rows: (B,) bool, the rows distilled (None: no KD).  teacher: (n_kd, C) logits of those rows.
        tau: KD weight τ(t).  temperature: T.

    Returns:
        (grad (B, C) float32, ce (scalar), kd (scalar) or None when no row is distilled).
    """
    B = z.shape[0]
    y = y[:, None]
    logp = F.log_softmax(z, dim=1)
    ce = -logp.gather(1, y).mean()
    grad = logp.exp_()
    grad.scatter_add_(1, y, grad.new_full((B, 1), -1.0))
    grad /= B
    kd = None
    rows = None if kd_rows is None or teacher is None else torch.nonzero(kd_rows).flatten()
    if rows is not None and len(rows):
        t = temperature
        log_s = F.log_softmax(z.index_select(0, rows) / t, dim=1)
        log_t = F.log_softmax(teacher / t, dim=1)
        p_t = log_t.exp()
        kd = (t * t) * (p_t * (log_t - log_s)).sum(dim=1).mean()
        grad.index_add_(0, rows, log_s.exp_().sub_(p_t), alpha=tau * t / len(rows))
    return grad, ce, kd


@dataclass
class StageOneLoss:
    """The stage-one loss of a method: CE, LA (fixed τ), BS (τ = 1) or GraLoss (τ(t) grows).

    One class for all four: they differ only in τ(t). ``ce`` is τ ≡ 0, ``la`` is τ ≡ ``tau``,
    ``bs`` is τ ≡ 1, ``graloss`` is ``tau_schedule(t, T, schedule, alpha, beta)``.
    """

    name: str
    log_pi: torch.Tensor
    epochs: int
    tau: float = 1.0
    schedule: str = "power"
    alpha: float = 1.0
    beta: float = 2.0

    METHODS = ("ce", "la", "bs", "graloss")

    def __post_init__(self):
        if self.name not in self.METHODS:
            raise ValueError(f"unknown loss {self.name!r}; choose one of {', '.join(self.METHODS)}")

    def tau_at(self, t: float) -> float:
        """τ at progress t (epochs, fractional allowed)."""
        if self.name == "ce":
            return 0.0
        if self.name == "la":
            return float(self.tau)
        if self.name == "bs":
            return 1.0
        return tau_schedule(t, self.epochs, self.schedule, self.alpha, self.beta)

    def __call__(self, z: torch.Tensor, y: torch.Tensor, t: float) -> torch.Tensor:
        return logit_adjusted_ce(z, y, self.log_pi, self.tau_at(t))

