"""Data-parallel training under ``torchrun``: the Trainer runs unchanged on every rank.

``torchrun --nproc_per_node=N script.py`` starts N copies of a script; each
sees ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` and the Trainer joins the process
group itself (gloo on CPU, nccl on GPU). Then:

* every global batch (``batch_size`` samples, drawn from the same seeded
  permutation on every rank) is split across the ranks, so N ranks at batch
  size B take the same optimizer steps as one process at batch size B;
* the model is wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`,
  which averages gradients during the backward pass; each rank's loss is
  scaled by ``world * n_rank / n_global`` first, so that the average equals the
  gradient of the mean loss over the global batch even when the ranks'
  slices differ in size (the last, ragged batch);
* training-loss sums and sample counts are summed across ranks for the
  history; validation metrics are computed on every rank from identical
  weights, so they agree without a reduction;
* checkpoints are written by rank 0 only.

Outside torchrun (no ``WORLD_SIZE`` > 1) every function here is a no-op.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world_size() -> int:
    """The WORLD_SIZE torchrun set for this process (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def current(init: bool = True) -> DistEnv | None:
    """This process's place in the group, joining it first if torchrun launched us; None if alone."""
    if not dist.is_available():
        return None
    if not dist.is_initialized():
        if not init or launched_world_size() <= 1:
            return None
        init_process_group()
    if dist.get_world_size() <= 1:
        return None
    return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def init_process_group(backend: str | None = None) -> None:
    """gloo on CPU, nccl when CUDA is available (each rank on the GPU of its LOCAL_RANK)."""
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"))
    # Left to interpreter shutdown, gloo's worker threads can be torn down while still
    # joinable, and the process dies with SIGABRT after its work is done.
    atexit.register(_leave_group)


def _leave_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process(env: DistEnv | None = None) -> bool:
    """True for rank 0, and for a process that is not part of a group."""
    env = env or current(init=False)
    return env is None or env.is_main


def shard_batches(batches: list[list[int]], env: DistEnv | None) -> list[list[int]]:
    """This rank's slice of every global batch (strided, so sizes differ by at most one).

    A global batch smaller than the world size would leave a rank without
    data; it is dropped on every rank alike.
    """
    if env is None:
        return batches
    return [b[env.rank :: env.world_size] for b in batches if len(b) >= env.world_size]


def wrap(model: nn.Module, env: DistEnv | None) -> nn.Module:
    """The module to run forward passes through: a DDP wrapper under torchrun, else the model itself."""
    if env is None:
        return model
    device = next(model.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def mean_loss_scale(n_local: int, env: DistEnv | None, device: torch.device) -> float:
    """Factor making DDP's gradient average the gradient of the global-batch mean loss."""
    if env is None:
        return 1.0
    n_global = torch.tensor([float(n_local)], device=device)
    dist.all_reduce(n_global)
    return env.world_size * n_local / float(n_global.item())


def average_gradients(params, env: DistEnv | None) -> None:
    """Average the gradients of parameters outside the DDP module (as DDP does for its own)."""
    if env is None:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= env.world_size


def sum_across(values: list[float], env: DistEnv | None) -> list[float]:
    """Element-wise sums over the ranks (training-loss sums, sample counts)."""
    if env is None:
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_tensor_(t: torch.Tensor, env: DistEnv | None, op: str = "sum") -> torch.Tensor:
    """``t`` in place: its element-wise ``op`` (sum, max, min) over the ranks; any device or dtype."""
    if env is None:
        return t
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    # nccl reduces CUDA tensors only; calibration statistics live on the CPU.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
    moved = t.to(device)
    dist.all_reduce(moved, ops[op])
    if moved is not t:
        t.copy_(moved)
    return t


def gather_objects(obj: object, env: DistEnv | None) -> list:
    """Every rank's ``obj`` (picklable, tensors included), in rank order; ``[obj]`` when alone."""
    if env is None:
        return [obj]
    out: list = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv | None) -> None:
    if env is not None:
        dist.barrier()
