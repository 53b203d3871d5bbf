"""Ray Train as distlab runs it: on the counting gloo backend (``distlab.measure``), without
Ray Data's actor or a placement-group cleaner.

Ray Train creates the process group itself, in its worker processes, before
the training function runs, so the ``distlab_gloo`` backend must be
registered in each worker first. ``torch_config`` returns a ``TorchConfig``
whose backend does that and then lets Ray set the group up as usual::

    TrainerWithoutRayData(..., torch_config=ray_backend.torch_config(cuda, timeout_s))

``TrainerWithoutRayData`` is Ray's ``TorchTrainer`` less two default callbacks:

- with every worker group (each restart and elastic resize) one starts a Ray Data
  ``DatasetManager`` actor, a fresh worker process importing Ray Data, even when the
  trainer has no datasets. distlab's ranks read their own batches (``distlab.data``), and
  while a restarted group starts that process takes a core from the new ranks.
- the other starts a detached ``PlacementGroupCleaner`` actor (one more process) that
  removes the run's placement group should the controller die. Its monitor asks Ray's
  state API, which needs the dashboard that distlab's Ray instances do not start: each
  query hangs for 40 s, so stopping the cleaner at the end of a run waited out its 12 s
  timeout. The placement group needs no cleaner here: the controller, an actor of the
  driver's job, creates it, and Ray removes a job's placement groups when its driver
  exits (checked by killing a driver with ``kill -9``: its group was ``REMOVED``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.torch.config import _TorchBackend
from ray.train.v2._internal.callbacks import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import (
    PlacementGroupCleanerCallback,
)

from distlab.measure.process_group import BACKEND, register_backend


class _CountingTorchBackend(_TorchBackend):
    """Ray's torch backend, registering ``distlab_gloo`` in every worker before the group."""

    def on_start(self, worker_group, backend_config) -> None:
        worker_group.execute(register_backend)
        super().on_start(worker_group, backend_config)


@dataclass
class CountingTorchConfig(TorchConfig):
    """``TorchConfig`` for the counting backend."""

    @property
    def backend_cls(self):
        return _CountingTorchBackend


def torch_config(cuda: bool, timeout_s: int, count: bool = True) -> TorchConfig:
    """NCCL on GPUs; on CPUs counted gloo (``count``) or plain gloo."""
    if cuda or not count:
        return TorchConfig(backend="nccl" if cuda else "gloo", timeout_s=timeout_s)
    return CountingTorchConfig(backend=BACKEND, timeout_s=timeout_s)


class TrainerWithoutRayData(TorchTrainer):
    """``TorchTrainer`` that starts no Ray Data actor (distlab passes no ``datasets``) and no
    placement-group cleaner."""

    def _create_default_callbacks(self) -> list:
        callbacks = super()._create_default_callbacks()
        unused = (DatasetsCallback, PlacementGroupCleanerCallback)
        return [each for each in callbacks if not isinstance(each, unused)]
