"""Data-parallel training under ``torchrun``: process group, DDP wrapping, rank-0-only writes.

Launch any script (or ``synthmed fit``) with ``torchrun --nproc_per_node=K`` and the same
``Synthesizer.fit`` trains one model with PyTorch's DistributedDataParallel: torchrun sets
``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`setup`
(called by ``fit``) initialises the default process group from them (``gloo`` on CPU, ``nccl``
on CUDA, one GPU per local rank), and :func:`parallelize` (called by the base's
``_make_private`` seam) wraps the module in DDP and gives each rank a disjoint share of every
minibatch. Gradients are averaged across
ranks at every step, so every rank ends with the same weights; only rank 0 writes files
(:func:`is_main_process`).

The global minibatch keeps the size the user asked for: each of the K ranks takes about
``batch_size / K`` of its patients per step.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler

from synthmed.errors import SynthmedError


def launched_by_torchrun() -> bool:
    """True when the environment describes a multi-process job (``WORLD_SIZE`` > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def is_distributed() -> bool:
    """True when a default process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's global rank (0 outside a distributed job)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def get_world_size() -> int:
    """Number of processes in the job (1 outside a distributed job)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1")) if launched_by_torchrun() else 1


def is_main_process() -> bool:
    """True on rank 0 (and in every non-distributed process): the one process that writes."""
    return get_rank() == 0


def setup(device: torch.device) -> torch.device:
    """Join the job torchrun started, if any, and return the device this rank trains on.

    Without ``WORLD_SIZE`` > 1 this does nothing. Otherwise it initialises the default process
    group once (``nccl`` for CUDA, ``gloo`` for CPU) and, on CUDA, pins this rank to the GPU of
    its ``LOCAL_RANK``. A process group the user initialised already is used as it is.
    """
    if not launched_by_torchrun() and not is_distributed():
        return device
    if not dist.is_available():
        raise SynthmedError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        atexit.register(_destroy)
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return device


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _DDP(DistributedDataParallel):
    """DistributedDataParallel that still answers the wrapped module's attributes.

    Gradients are synchronised only for computations that go through ``forward`` (``ddp(x)``);
    attribute access (``ddp.hidden_size``, helper methods) falls through to the module.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


class _RankBatches(Sampler):
    """This rank's share of every minibatch the original batch sampler draws.

    At each epoch rank 0 draws the whole epoch's minibatches with the model's own batch sampler
    (so bucketing by length, seeded shuffles and the like are kept) and broadcasts them; rank r
    then takes ``batch[r::world_size]`` of each. Every rank runs the same number of steps, the
    ranks' patients are disjoint, and together they make exactly the original minibatch. A
    minibatch with fewer patients than ranks is repeated so that no rank gets an empty share.
    """

    def __init__(self, batches: Iterable[Sequence[int]], rank: int, world_size: int) -> None:
        self.batches = batches
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[int]]:
        plan = [[int(i) for i in batch] for batch in self.batches] if self.rank == 0 else None
        box = [plan]
        dist.broadcast_object_list(box, src=0)
        for batch in box[0]:
            if not batch:
                yield []
                continue
            mine = batch[self.rank :: self.world_size]
            yield mine or [batch[self.rank % len(batch)]]


def _average_gradients(parameters: list[torch.nn.Parameter]) -> None:
    """Replace every gradient by its mean over the ranks (one all-reduce of a flat buffer)."""
    if not parameters:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for parameter, grad in zip(parameters, grads, strict=True):
        size = grad.numel()
        parameter.grad = flat[offset : offset + size].view_as(grad).clone()
        offset += size


def parallelize(
    module: torch.nn.Module,
    data_loader: DataLoader,
    device: torch.device,
    seed: int,
    optimizer: torch.optim.Optimizer | None = None,
    strategy: str = "ddp",
) -> tuple[torch.nn.Module, DataLoader]:
    """Make ``module``'s training data-parallel across ranks; identity outside a job.

    Inside a job, the returned loader yields this rank's part of each minibatch drawn by the
    original loader's batch sampler (see :class:`_RankBatches`), with the original dataset,
    collate function and workers, and the gradients are averaged over the ranks at every step:

    - ``strategy="ddp"`` (default): ``module`` is wrapped in DistributedDataParallel, which
      all-reduces gradients during the backward pass of any computation that goes through its
      ``forward``.
    - ``strategy="allreduce"``: for losses DDP does not support (a gradient penalty computed
      with ``torch.autograd.grad``, several forward passes per step), ``module`` is returned as
      it is, its parameters are broadcast from rank 0, and ``optimizer`` averages the gradients
      over the ranks before each ``step()``.

    ``seed`` is accepted for samplers that need one; the original sampler's own seeding decides
    the order.
    """
    if not is_distributed():
        return module, data_loader
    if strategy not in ("ddp", "allreduce"):
        raise ValueError(f"distributed strategy must be 'ddp' or 'allreduce', got {strategy!r}")
    if data_loader.batch_sampler is None:
        raise SynthmedError(
            "distributed training needs a DataLoader that draws minibatches "
            "(batch_size or batch_sampler)"
        )
    loader = DataLoader(
        data_loader.dataset,
        batch_sampler=_RankBatches(
            data_loader.batch_sampler, dist.get_rank(), dist.get_world_size()
        ),
        collate_fn=data_loader.collate_fn,
        num_workers=data_loader.num_workers,
        pin_memory=data_loader.pin_memory,
    )
    if strategy == "allreduce":
        if optimizer is None:
            raise SynthmedError("the 'allreduce' distributed strategy needs the optimizer")
        parameters = [p for p in module.parameters() if p.requires_grad]
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor, src=0)
        optimizer.register_step_pre_hook(lambda *_: _average_gradients(parameters))
        return module, loader
    device_ids = (
        [device.index if device.index is not None else 0] if device.type == "cuda" else None
    )
    wrapped = _DDP(module, device_ids=device_ids, find_unused_parameters=True)
    return wrapped, loader
