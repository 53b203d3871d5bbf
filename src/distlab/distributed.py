"""Process-group set-up for one rank: backend, device, timeout."""

from __future__ import annotations

import itertools
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from distlab.config import Config
from distlab.errors import DistlabError
from distlab.measure.process_group import backend_for


@dataclass(frozen=True)
class RankContext:
    """Who this process is in the run and where it computes."""

    rank: int
    world_size: int
    device: torch.device
    nodes: tuple[int | None, ...] | None = None
    """The cluster node of every rank, on a cluster from ``distlab cluster up`` (else None)."""

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that writes the run dir and logs."""
        return self.rank == 0

    @property
    def device_type(self) -> str:
        """``cpu`` or ``cuda``: what device meshes are built on."""
        return self.device.type

    def place(self, model: torch.nn.Module) -> None:
        """Move ``model`` to this rank's device, unless all of it is there already.

        Already there is the common case on a CPU, and the only case in a traced
        step (``distlab.train.trace``), whose fake parameters ``Module.to`` cannot
        swap in place even when nothing would move.
        """
        tensors = itertools.chain(model.parameters(), model.buffers())
        if any(t.device != self.device for t in tensors):
            model.to(self.device)


def resolve_device(config: Config) -> str:
    """The device type a run uses: ``cuda`` when asked for or available, else ``cpu``."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise DistlabError(
            "--device cuda was requested but no CUDA GPU is visible; use --device cpu"
        )
    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return config.device


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def host_state(config: Config) -> bool:
    """Whether a GPU run keeps sharded state in host memory: fsdp's ``--offload params``.

    Its gradients are then CPU DTensors, so clipping's norm all-reduce runs on
    CPU tensors, which nccl refuses: such a run also gets a gloo backend for CPU tensors.
    """
    return config.strategy == "fsdp" and config.offload == "params"


def device_mesh(device_type: str, shape: tuple[int, ...], names: tuple[str, ...]) -> DeviceMesh:
    """``init_device_mesh`` over all ranks, dimensions ``names`` of sizes ``shape``.

    The mesh is bookkeeping (which ranks form which group), kept in real tensors
    even inside a step traced with fake tensors (``distlab.train.trace``), where
    torch would otherwise make its rank table fake and unreadable.
    """
    with unset_fake_temporarily():
        return init_device_mesh(device_type, shape, mesh_dim_names=names)


def init_rank(
    rank: int, world_size: int, rendezvous: str | dist.Store, config: Config
) -> RankContext:
    """Join the process group (gloo on CPU, nccl on GPUs) and pick this rank's device.

    ``rendezvous`` is an init method (``tcp://HOST:PORT``) or a store already made.

    On GPUs with ``host_state`` the group has gloo for CPU tensors besides nccl.

    On CPU the group is ``distlab_gloo`` (``distlab.measure``): gloo itself, behind a
    process group that counts every collective for the per-step communication
    metrics; ``comm_stats: false`` in the config uses plain gloo.
    """
    device_type = resolve_device(config)
    if device_type == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "cuda:nccl,cpu:gloo" if host_state(config) else "nccl"
    else:
        device = torch.device("cpu")
        backend = backend_for("cpu", config.comm_stats)
        torch.set_num_threads(config.threads_per_rank)
    where = (
        {"store": rendezvous} if isinstance(rendezvous, dist.Store) else {"init_method": rendezvous}
    )
    dist.init_process_group(
        backend=backend,
        **where,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=config.timeout_s),
    )
    return RankContext(rank=rank, world_size=world_size, device=device)


def shutdown() -> None:
    """Leave the process group if one is active."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
