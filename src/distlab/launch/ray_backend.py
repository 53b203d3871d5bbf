"""Ray Train as distlab runs it: on the counting gloo backend (``distlab.measure``), without
Ray Data's actor or a placement-group cleaner, its autoscaling coordinator started early.

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


def start_autoscaling_coordinator() -> None:
    """Start Ray Train's autoscaling coordinator now, while the driver builds the trainer.

    Ray Train's controller sends its resource request to this detached actor (Ray Data's
    ``AutoscalingCoordinator``, one per cluster) as soon as it starts, creating the actor
    if none exists, and waits up to 5 s for the answer before it starts the workers. A new
    actor is a new worker process that imports Ray Data: 2.3 s of that wait on an idle
    2-core machine (0.25 s with the actor started here); past 5 s the request fails and
    the controller's next decision sends it again. Created here, from the driver, the
    actor starts beside the controller, which then finds it by name (``get_if_exists``).
    An elastic run's controller asks it for the cluster's free resources too.
    """
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )

    get_or_create_autoscaling_coordinator()  # the actor's handle; its process starts now


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
