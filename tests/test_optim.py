"""Stage two's written-out SGD against torch.optim.SGD, its oracle."""
import pytest
import torch

from glag.optim import MomentumSGD


@pytest.mark.parametrize("momentum,wd", [(0.9, 5e-4), (0.0, 5e-4), (0.9, 0.0)])
def test_momentum_sgd_equals_torch_sgd_bitwise(momentum, wd):
    g = torch.Generator().manual_seed(0)
    ours, ref = torch.nn.Linear(16, 7), torch.nn.Linear(16, 7)
    ref.load_state_dict(ours.state_dict())
    opt = MomentumSGD(ours.parameters(), momentum=momentum, weight_decay=wd)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=momentum, weight_decay=wd)
    for step in range(25):
        lr = 0.1 * (1 - step / 25) + 1e-3  # the rate changes every step, as stage two's cosine does
        for group in opt_ref.param_groups:
            group["lr"] = lr
        for p, q in zip(ours.parameters(), ref.parameters()):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step(lr)
        opt_ref.step()
        for p, q in zip(ours.parameters(), ref.parameters()):
            assert torch.equal(p, q), step


def test_state_round_trip_continues_identically():
    torch.manual_seed(0)
    a = torch.nn.Linear(4, 3)
    opt = MomentumSGD(a.parameters(), momentum=0.9, weight_decay=5e-4)
    grads = [[torch.randn_like(p) for p in a.parameters()] for _ in range(6)]

    def run(model, optimizer, steps):
        for gs in steps:
            for p, gr in zip(model.parameters(), gs):
                p.grad = gr.clone()
            optimizer.step(0.05)

    run(a, opt, grads[:3])
    b = torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    opt_b = MomentumSGD(b.parameters(), momentum=0.9, weight_decay=5e-4)
    opt_b.load_state_dict(opt.state_dict())
    run(a, opt, grads[3:])
    run(b, opt_b, grads[3:])
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    with pytest.raises(ValueError, match="buffers"):
        MomentumSGD([torch.zeros(2)], 0.9, 0.0).load_state_dict(opt.state_dict())
