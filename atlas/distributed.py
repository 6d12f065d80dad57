"""Several processes, one analysis: ``atlas analyze`` under ``torchrun`` (torch.distributed).

``torchrun --nproc_per_node N -m atlas.cli analyze ...`` (or a multi-node launch) starts N processes
with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment.
:func:`from_environment` reads them and joins the process group (NCCL when the process runs on CUDA,
gloo on the CPU); each process runs on ``cuda:LOCAL_RANK`` when on GPU. Nothing here is a scheduler or
a launcher of its own: torchrun (or SLURM's ``srun`` setting the same variables) starts the processes.

What each rank does (:func:`atlas.analyze.run_analysis` with ``comm``): the corpus's batches are split
into ``WORLD_SIZE`` contiguous ranges, rank r analyses range r into its own summaries, then the
summaries are combined on rank 0 by a binary tree of point-to-point transfers (``send``/``recv`` of
each tensor of the summaries' ``state_dict``) and the exact merge of :mod:`atlas.stats`: at step s,
rank r with ``r % 2s == 0`` receives rank ``r + s``'s summaries and merges them into its own, so rank 0
holds everything after ``ceil(log2 N)`` steps and no rank ever holds more than two summaries. Rank 0
writes the cache. Any number of ranks works, more ranks than batches included: a rank whose range is
empty folds nothing and sends empty summaries (the merge's identity). The ranks meet at a barrier once
the cache is written, and only then leave the process group (:func:`shutdown`). Small values
(fingerprints, input-scale contributions, the final manifest) travel as Python objects
(``all_gather_object`` / ``broadcast_object_list``).

Readers: :mod:`atlas.build` (``from_environment``, ``shutdown``) and :mod:`atlas.analyze`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import AtlasError

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched() -> bool:
    """True when this process was started by torchrun (or another launcher) as one of several ranks."""
    return all(v in os.environ for v in ENV_VARS) and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise AtlasError(f"the environment variable {name}={os.environ[name]!r} is not a number: launch "
                         "atlas with torchrun, which sets RANK, WORLD_SIZE and LOCAL_RANK") from None


def rank_device(device: str | None, local_rank: int) -> str:
    """The device of the process with ``local_rank``: ``cuda:LOCAL_RANK`` on GPU, else as given.

    ``None`` (the default) and ``cuda`` mean this node's GPU number LOCAL_RANK when CUDA is available;
    an explicit ``cuda:N`` or ``cpu`` is kept.
    """
    if device is None:
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return f"cuda:{local_rank}"
    return device


@dataclass
class Comm:
    """This process's place in the process group and the few collectives the analysis needs."""

    rank: int
    world: int
    local_rank: int
    backend: str
    device: torch.device

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    def all_gather(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj, src: int = 0):
        """Rank ``src``'s ``obj`` on every rank."""
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    # ---------------------------------------------------------------- summaries

    def _send_state(self, state: dict, dst: int) -> None:
        import torch.distributed as dist

        leaves = _leaves(state)
        meta = [(path, (tuple(v.shape), str(v.dtype)) if isinstance(v, torch.Tensor) else ("obj", v))
                for path, v in leaves]
        dist.send_object_list([meta], dst=dst, device=self._object_device())
        for _, v in leaves:
            if isinstance(v, torch.Tensor):
                dist.send(v.detach().to(self.device).contiguous(), dst=dst)

    def _recv_state(self, src: int) -> dict:
        import torch.distributed as dist

        box = [None]
        dist.recv_object_list(box, src=src, device=self._object_device())
        state: dict = {}
        for path, (shape, dtype) in box[0]:
            if shape == "obj":
                value = dtype
            else:
                value = torch.empty(shape, dtype=getattr(torch, dtype.replace("torch.", "")), device=self.device)
                dist.recv(value, src=src)
            _set(state, path, value)
        return state

    def _object_device(self):
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def reduce_summaries(self, summaries, empty) -> None:
        """Merge every rank's ``summaries`` into rank 0's (binary tree; see the module docstring).

        ``empty()`` makes a fresh summaries object of the same shape to load a received state into.
        After the call only rank 0's ``summaries`` hold the whole; the others hold a part.
        """
        step = 1
        while step < self.world:
            if self.rank % (2 * step) == step:
                self._send_state(summaries.state_dict(), dst=self.rank - step)
                return
            if self.rank % (2 * step) == 0 and self.rank + step < self.world:
                other = empty()
                other.load_state_dict(self._recv_state(self.rank + step))
                summaries.merge(other)
                del other
            step *= 2


def _leaves(tree, prefix=()):
    if isinstance(tree, dict):
        out = []
        for key in tree:  # insertion order: the same on every rank (same code, same settings)
            out += _leaves(tree[key], prefix + (key,))
        return out
    return [(prefix, tree)]


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def from_environment(device: str | None) -> tuple[Comm | None, str | None]:
    """Join the process group when launched by torchrun; returns ``(comm or None, this rank's device)``.

    Outside torchrun (or with ``WORLD_SIZE=1``) returns ``(None, device)`` unchanged.
    """
    if not launched():
        return None, device
    import torch.distributed as dist

    rank, world, local_rank = (_env_int(v) for v in ENV_VARS)
    if not 0 <= rank < world:
        raise AtlasError(f"RANK={rank} is outside 0..WORLD_SIZE-1={world - 1}: launch atlas with torchrun")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise AtlasError(f"{name} is not set although WORLD_SIZE={world}: launch atlas with torchrun (or "
                             "set MASTER_ADDR and MASTER_PORT like it does)")
    dev = torch.device(rank_device(device, local_rank))
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise AtlasError(f"--device {device} was asked for but CUDA is not available here: pass --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise AtlasError(f"rank {rank} would use {dev} but this node has {torch.cuda.device_count()} GPU(s): "
                             "pass --nproc_per_node at most the number of GPUs to torchrun")
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        extra = {"device_id": dev} if backend == "nccl" else {}  # NCCL: bind this rank's GPU at once
        dist.init_process_group(backend=backend, rank=rank, world_size=world, **extra)
    return Comm(rank=rank, world=world, local_rank=local_rank, backend=backend, device=dev), str(dev)


def shutdown(comm: Comm | None) -> None:
    """Leave the process group (every rank calls it at the end)."""
    if comm is None:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
