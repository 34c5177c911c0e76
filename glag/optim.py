"""Stage two's optimizer: SGD with momentum and weight decay, written out (METHOD.md step 9).

``torch.optim.SGD``'s update (dampening 0, no Nesterov), op for op, so results are bitwise the
same (the test compares them), for a classifier of two tensors: its first construction in a
process imports ``torch._dynamo`` (~3 s and ~70 MiB here) and each step costs ~0.15 ms of
bookkeeping, both of which dominate a linear head's stage two. Stage one keeps ``torch.optim``.
"""
from __future__ import annotations

import torch


class MomentumSGD:
    """``g = grad + wd·p``; ``buf = g`` on the first step, else ``buf = m·buf + g``; ``p -= lr·buf``.

    Args:
        params: the tensors to update (their ``.grad`` is read at each :meth:`step`).
        momentum: m.  weight_decay: wd (applied to every tensor, as ``torch.optim.SGD`` does).
    """

    def __init__(self, params, momentum: float, weight_decay: float):
        self.params = list(params)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)

    @torch.no_grad()
    def step(self, lr: float) -> None:
        for i, p in enumerate(self.params):
            g = p.grad.add(p, alpha=self.weight_decay) if self.weight_decay else p.grad
            if self.momentum:
                buf = self.buffers[i]
                if buf is None:
                    buf = self.buffers[i] = torch.clone(g).detach()
                else:
                    buf.mul_(self.momentum).add_(g)
                g = buf
            p.add_(g, alpha=-lr)

    def state_dict(self) -> dict:
        return {"momentum": self.momentum, "weight_decay": self.weight_decay,
                "buffers": [None if b is None else b.clone() for b in self.buffers]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["buffers"]) != len(self.params):
            raise ValueError(f"optimizer state has {len(state['buffers'])} buffers for {len(self.params)} tensors")
        self.buffers = [None if b is None else b.clone() for b in state["buffers"]]
