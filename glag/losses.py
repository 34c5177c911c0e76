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
    if T <= 0:
        raise ValueError(f"the number of epochs T must be positive, got {T}")
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

