"""Losses and τ schedules against values computed by hand."""
import math

import pytest
import torch

from glag.losses import StageOneLoss, ce_kd_logit_grad, kd_loss, log_prior, logit_adjusted_ce, tau_schedule


def test_tau_schedule_power_and_variants():
    assert tau_schedule(0, 10) == 0.0
    assert tau_schedule(5, 10) == pytest.approx(0.25)  # α=1, β=2: (1/2)^2
    assert tau_schedule(10, 10) == pytest.approx(1.0)
    assert tau_schedule(20, 10) == pytest.approx(1.0)  # clipped at t = T
    assert tau_schedule(5, 10, "linear") == pytest.approx(0.5)
    assert tau_schedule(5, 10, "concave") == pytest.approx(math.sqrt(0.5))
    assert tau_schedule(5, 10, "power", alpha=0.8, beta=3.0) == pytest.approx(0.8 * 0.125)
    assert tau_schedule(4, 10, "step") == 0.0 and tau_schedule(5, 10, "step") == 1.0
    assert tau_schedule(3, 10, "constant", alpha=0.7) == pytest.approx(0.7)
    # convex lies below linear, concave above, in the middle of training
    assert tau_schedule(3, 10, "convex") < tau_schedule(3, 10, "linear") < tau_schedule(3, 10, "concave")
    with pytest.raises(ValueError, match="unknown"):
        tau_schedule(1, 10, "cubic")
    with pytest.raises(ValueError, match="progress t must be a finite number of epochs, got nan"):
        tau_schedule(float("nan"), 10)  # was nan
    with pytest.raises(ValueError, match="T must be positive, got nan"):
        tau_schedule(1, float("nan"))


def test_log_prior_and_error():
    lp = log_prior([3, 1])
    assert torch.allclose(lp, torch.tensor([math.log(0.75), math.log(0.25)]))
    with pytest.raises(ValueError, match="no training samples"):
        log_prior([3, 0])


def test_logit_adjusted_ce_by_hand():
    z = torch.tensor([[1.0, 2.0]])
    y = torch.tensor([0])
    lp = torch.tensor([math.log(0.75), math.log(0.25)])
    # τ = 0: plain CE = -log(e^1 / (e^1 + e^2))
    ce = -math.log(math.e / (math.e + math.e ** 2))
    assert logit_adjusted_ce(z, y, lp, 0.0).item() == pytest.approx(ce, rel=1e-6)
    # τ = 1 (Balanced Softmax): logits + log π = [1 + log .75, 2 + log .25]
    a, b = 1 + math.log(0.75), 2 + math.log(0.25)
    bs = -math.log(math.exp(a) / (math.exp(a) + math.exp(b)))
    assert logit_adjusted_ce(z, y, lp, 1.0).item() == pytest.approx(bs, rel=1e-6)
    # the head class (0) as the target: adjustment lowers its loss vs CE
    assert bs < ce


def test_stage_one_loss_methods_share_one_formula():
    lp = log_prior([500, 50, 5])
    z, y = torch.randn(8, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    ce = StageOneLoss("ce", lp, 10)
    bs = StageOneLoss("bs", lp, 10)
    la = StageOneLoss("la", lp, 10, tau=0.5)
    gl = StageOneLoss("graloss", lp, 10)
    assert ce.tau_at(7) == 0.0 and bs.tau_at(0) == 1.0 and la.tau_at(3) == 0.5
    assert gl.tau_at(0) == 0.0 and gl.tau_at(10) == pytest.approx(1.0)
    assert torch.allclose(gl(z, y, 0), ce(z, y, 0))  # GraLoss starts as CE
    assert torch.allclose(gl(z, y, 10), bs(z, y, 0))  # and ends as Balanced Softmax
    assert torch.allclose(gl(z, y, 5), logit_adjusted_ce(z, y, lp, 0.25))
    with pytest.raises(ValueError, match="unknown loss"):
        StageOneLoss("focal", lp, 10)


def test_kd_loss_by_hand():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[2.0, 0.0]])
    T = 2.0
    p = torch.softmax(t / T, 1)[0]
    q = torch.softmax(s / T, 1)[0]
    expected = T * T * float((p * (p / q).log()).sum())
    assert kd_loss(s, t, T).item() == pytest.approx(expected, rel=1e-6)
    assert kd_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-7)
    # gradient flows to the student only
    s2 = s.clone().requires_grad_(True)
    t2 = t.clone().requires_grad_(True)
    kd_loss(s2, t2).backward()
    assert s2.grad is not None and s2.grad.abs().sum() > 0 and t2.grad is None
    assert kd_loss(torch.zeros(0, 3), torch.zeros(0, 3)).item() == 0.0


@pytest.mark.parametrize("n_kd", [0, 1, 37])
def test_closed_form_gradient_matches_autograd(n_kd):
    """Stage two's closed-form ∂(CE + τ·KD)/∂z against autograd through F.cross_entropy and kd_loss."""
    g = torch.Generator().manual_seed(n_kd)
    B, C, tau, T = 64, 11, 0.7, 2.0
    z = (3 * torch.randn(B, C, generator=g, dtype=torch.float64)).requires_grad_()
    y = torch.randint(0, C, (B,), generator=g)
    rows = torch.zeros(B, dtype=torch.bool)
    rows[torch.randperm(B, generator=g)[:n_kd]] = True
    teacher = 3 * torch.randn(n_kd, C, generator=g, dtype=torch.float64)
    ce = torch.nn.functional.cross_entropy(z, y)
    loss = ce + (tau * kd_loss(z[rows], teacher, T) if n_kd else 0.0)
    loss.backward()
    grad, ce2, kd2 = ce_kd_logit_grad(z.detach(), y, rows, teacher, tau, T)
    assert torch.allclose(grad, z.grad, rtol=1e-10, atol=1e-12)
    assert torch.allclose(ce2, ce.detach())
    if n_kd:
        assert torch.allclose(kd2, kd_loss(z.detach()[rows], teacher, T))
    else:
        assert kd2 is None
    # no KD rows given: plain CE
    grad_ce, _, none = ce_kd_logit_grad(z.detach(), y)
    ref = torch.autograd.grad(torch.nn.functional.cross_entropy(z, y), z)[0]
    assert none is None and torch.allclose(grad_ce, ref, rtol=1e-10, atol=1e-12)
