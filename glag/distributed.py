"""Multi-process helpers for ``torchrun`` (DESIGN.md, "Scale").

``torchrun --nproc_per_node N tools/train_stage1.py ...`` starts N processes and sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in each. :func:`init_from_env`
reads them and joins the process group: ``nccl`` when CUDA is available (each process on GPU
``LOCAL_RANK``), else ``gloo`` on CPU. Without those variables (a plain ``python`` run) it does
nothing and every helper below answers as for a single process (rank 0 of 1), so library code
calls them unconditionally.

Conventions used by stage one and extraction: the main process (rank 0) alone logs at INFO,
shows progress bars and writes run files; per-process randomness is seeded with ``seed + rank``.
"""
from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# How long a collective (e.g. the barrier while rank 0 merges feature shards) may wait.
DEFAULT_TIMEOUT = timedelta(minutes=60)

_owns_group = False  # True when init_from_env created the process group (then cleanup ends it)


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset): what torchrun asked for."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_from_env(backend: str | None = None, timeout: timedelta = DEFAULT_TIMEOUT) -> tuple[int, int]:
    """Join the process group torchrun describes in the environment; returns ``(rank, world_size)``.

    Idempotent: a second call (or a group made by the caller) is left as it is. With
    ``WORLD_SIZE`` unset or 1 nothing is initialised and ``(0, 1)`` is returned.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; default ``nccl`` when CUDA is available, else ``gloo``.
        timeout: how long collectives wait for the slowest process.
    """
    global _owns_group
    if dist.is_available() and dist.is_initialized():
        return rank(), world_size()
    if env_world_size() <= 1:
        return 0, 1
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed; "
                           "run a single process (python instead of torchrun)")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} unset: "
                           f"start multi-process runs with torchrun --nproc_per_node N ...")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, timeout=timeout)
    _owns_group = True
    log.debug("process group: rank %d of %d, backend %s", rank(), world_size(), backend)
    return rank(), world_size()


def rank() -> int:
    """This process's rank in the group, 0 without one."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Processes in the group, 1 without one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    """Rank on this machine (``LOCAL_RANK``, set by torchrun), 0 when unset."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def is_main() -> bool:
    """True on rank 0 (and in a single process): the process that logs and writes."""
    return rank() == 0


def device() -> torch.device:
    """Where this process computes: ``cuda:LOCAL_RANK`` under nccl, ``cuda`` for a single process
    with a GPU, else ``cpu``."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if is_distributed() and dist.get_backend() != "nccl":
        return torch.device("cpu")  # gloo was asked for explicitly: stay on the CPU
    return torch.device("cuda", local_rank() if is_distributed() else torch.cuda.current_device())


def barrier() -> None:
    """Wait until every process gets here (no-op for a single process)."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[local_rank()])
        else:
            dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over processes in place and return it (unchanged for a single process).

    Under nccl the tensor must be on this process's GPU (:func:`device`)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_object(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (picklable objects; ``[obj]`` for one process)."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy ``module``'s buffers (e.g. BatchNorm running statistics) from rank ``src`` to all."""
    if is_distributed():
        for buf in module.buffers():
            dist.broadcast(buf.data, src)


def cleanup() -> None:
    """Leave the process group if :func:`init_from_env` made it (safe to call always)."""
    global _owns_group
    if _owns_group and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _owns_group = False


class OnDevice(torch.nn.Module):
    """``model`` run on ``device`` for code that feeds CPU batches and wants CPU outputs
    (:func:`glag.inference.iterate_outputs`): ``forward_both(x)`` moves ``x`` there and the
    (features, logits) back. Use the model itself when ``device`` is the CPU."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        super().__init__()
        self.model, self.device = model, torch.device(device)
        self.train(model.training)  # callers save and restore the mode through the wrapper

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f, z = self.model.forward_both(x.to(self.device, non_blocking=True))
        return f.cpu(), z.cpu()


def on_device(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` itself on the CPU, else :class:`OnDevice` around it."""
    return model if torch.device(device).type == "cpu" else OnDevice(model, device)
