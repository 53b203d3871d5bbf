"""Live recovery (``--ft live``): when a data-parallel replica dies, the others keep stepping.

Each rank of a ddp run is a torchft replica: a process with a torch.distributed world
of its own (one rank: its checkpoint writes and bookkeeping) and a torchft ``Manager``.
Before every step the Manager joins a quorum of the live replicas at the launcher's
Lighthouse (``distlab.launch.live``); the step's gradients are then all-reduced over
exactly those replicas (torchft's ``DistributedDataParallel``: DDP's buckets, each
reduced through the Manager), and the update is applied only if torchft says every
replica got through the all-reduce (``should_commit``; else the step is run again).

The batch contract holds: step s's global batch depends only on the seed and s, and
replica r always trains the rows ``rank_slice(batch, r, R)``, R = ``--nproc``, whoever
else is alive. A dead replica's rows are dropped, not handed to the others: a step in
which k of R replicas take part averages the gradient (and the loss) over their k/R of
the rows. Nothing is replayed, so no survivor redoes a step.

Healing: the launcher restarts a dead replica alone. It starts from step 0 (replica 0:
from the newest checkpoint), joins the next quorum, finds its peers ahead and loads a
live peer's model, optimizer and schedule (the Manager's ``state_dict`` callbacks, sent
over torchft's HTTP transport) before it takes part in that very step
(``use_async_quorum=False``: heal first, then step with the others).

Replica 0 writes the run dir as rank 0 does (``metrics.jsonl`` with ``replicas`` and
``quorum_s`` per step, the summary, the checkpoints), so no step is committed without it:
the others run a step again until replica 0 is in its quorum. Losing it is not recovered
live: the launcher restarts every replica from the newest checkpoint, as ``--ft restart``
does.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed import ReduceOp, TCPStore
from torchft.manager import Manager

from distlab.checkpoint.state import set_schedule_position
from distlab.config import Config
from distlab.distributed import RankContext, init_rank
from distlab.run.events import append_event, read_events
from distlab.run.files import LOGS_DIR, METRICS_FILE, read_jsonl
from distlab.run.heartbeat import beat
from distlab.strategies.base import ModuleTrainStep
from distlab.strategies.step_parts import no_sync_unless
from distlab.train.loop import RankTrainer, write_pid
from distlab.train.rank import done_marker, rank_config, run_reporting
from distlab.train.replica_comm import ReplicaDDP, ReplicaGroup

READY_POLL_S = 0.05
REPLICA_0_ABSENT = "replica 0 is not in this step's quorum"


class LiveTrainStep(ModuleTrainStep):
    """ddp's train step with torchft's DDP: gradients (and the loss) are averaged over the
    replicas in this step's quorum; the update waits for torchft's ``should_commit``."""

    def __init__(
        self,
        model: nn.Module,
        ctx: RankContext,
        config: Config,
        manager: Manager,
        replica_group: ReplicaGroup,
    ):
        ctx.place(model)
        buckets = {} if config.bucket_mb is None else {"bucket_cap_mb": config.bucket_mb}
        wrapped = ReplicaDDP(manager, model, **buckets)
        super().__init__(
            wrapped,
            ctx,
            config,
            dp_rank=ctx.rank,  # this replica's rows, whoever else is alive
            dp_size=config.nproc,
            dp_group=None,
            gradient_sync=partial(no_sync_unless, no_sync=wrapped.no_sync),
            plain_model=model,
            keep_gradients=True,
        )
        self.manager = manager
        self.replica_group = replica_group
        """The Manager's process group over the quorum's replicas (torchft reconfigures it)."""
        self.replica_losses: list[float | None] = []
        """The last step's loss of each replica's rows (None: not in the quorum)."""

    def should_commit(self, local_loss: torch.Tensor) -> bool:
        """Gather every replica's loss over the quorum (slot r holds replica r's; an absent
        replica's slot stays 0 and it is counted absent), then ask torchft whether every
        replica in the quorum got through this step's all-reduces."""
        losses = torch.zeros(2, self.dp_size, dtype=torch.float64)
        losses[0, self.dp_rank] = local_loss.detach().double()
        losses[1, self.dp_rank] = 1.0  # present
        self.manager.allreduce(losses, reduce_op=ReduceOp.SUM).wait()
        self.replica_losses = [
            loss if present else None for loss, present in zip(*losses.tolist(), strict=True)
        ]
        if self.replica_losses[0] is None and not self.manager.errored():
            # Replica 0 records every step: a step it is not in (it is late, stuck in the
            # last step's broken all-reduce) is not committed by anyone, and is run again.
            self.manager.report_error(RuntimeError(REPLICA_0_ABSENT))
        committed = self.manager.should_commit()
        self.replica_group.after_commit(committed)
        return committed

    def step_metrics(
        self, quorum_s: float, tokens_per_step: int, step_time: float
    ) -> dict[str, Any]:
        """The last step's ``metrics.jsonl`` fields of live recovery: how many replicas took
        part, each replica's loss (None: absent), the seconds spent waiting for the quorum,
        and the tokens per second of the rows those replicas trained (an absent replica's
        rows are dropped, so a short step trains ``replicas / nproc`` of the batch)."""
        replicas = sum(loss is not None for loss in self.replica_losses)
        trained = tokens_per_step * replicas / len(self.replica_losses)
        return {
            "replicas": replicas,
            "replica_losses": self.replica_losses,
            "quorum_s": quorum_s,
            "tokens_per_s": trained / step_time,
        }

    def mean_loss(self, local: torch.Tensor) -> float:
        """The mean over the rows of the replicas that took part: the mean of their losses
        (each replica's is the mean over its equally many rows)."""
        present = [loss for loss in self.replica_losses if loss is not None]
        # none: the all-reduce failed (the step is not committed, not recorded, run again)
        return sum(present) / len(present) if present else float("nan")

    def replica_state(self) -> dict[str, Any]:
        """What a healing peer loads: model, optimizer and the schedule's position."""
        return {
            "model": self.plain_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.scheduler.last_epoch,
        }

    def load_replica_state(self, state: dict[str, Any]) -> None:
        """Take a live peer's state (``replica_state``), sent by torchft while healing."""
        self.plain_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        set_schedule_position(self.scheduler, state["step"])


@dataclass(frozen=True)
class Join:
    """How a replica process joins the run (the live launcher decides)."""

    peers: int
    """How many replicas must be ready to step (Manager up, model built) before the first
    quorum: all of them when the launcher starts them together (so step 0 has every
    replica), 0 for a replica restarted alone, which joins whatever quorum comes next and
    heals."""
    at_step: int = 0
    """A replica restarted alone waits until replica 0 has recorded this many steps
    (``--rejoin-after``) before it starts its Manager."""

    @property
    def alone(self) -> bool:
        """Whether this replica was restarted alone (it must heal from a live peer)."""
        return self.peers == 0


def run_live_replica(
    rank: int,
    config_dict: dict[str, Any],
    token_file: str,
    run_dir: str,
    lighthouse: str,
    join: Join,
    errors: Any,
    environment: dict[str, str] | None = None,
) -> None:
    """A replica's process (the live launcher's): a world of one, a Manager, the live loop."""
    config = rank_config(config_dict, environment)
    # torchft warns at every quorum that it cannot reset NCCL's flight recorder (none on CPU),
    # and logs a failed step's traceback: distlab records it as a step_retry event instead
    logging.getLogger("torchft").setLevel(logging.CRITICAL)
    # a heal deserialises the peer's state from a read-only buffer; nothing writes to it
    warnings.filterwarnings("ignore", message="The given buffer is not writable")

    def body() -> None:
        if not wait_to_rejoin(Path(run_dir), join.at_step):
            return  # replica 0 finished the run meanwhile
        # The replica group's own store, the Manager's too, on a port the system picks as it
        # binds it (a port found free beforehand can be taken by another process meanwhile).
        store = TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
        ctx = init_rank(0, 1, store, config)
        ctx = dataclasses.replace(ctx, rank=rank)  # distlab's index: rows, files, faults
        replica_group = ReplicaGroup(timedelta(seconds=config.timeout_s))
        manager = Manager(
            pg=replica_group,
            load_state_dict=None,
            state_dict=None,  # registered once the train step exists (train_live)
            min_replica_size=1,
            use_async_quorum=False,  # a healing replica loads the state, then steps
            init_sync=False,  # every replica builds the same weights from the seed
            timeout=timedelta(seconds=config.timeout_s),
            quorum_timeout=timedelta(seconds=config.timeout_s),
            connect_timeout=timedelta(seconds=config.timeout_s),
            rank=0,
            world_size=1,
            store_addr="127.0.0.1",
            store_port=store.port,
            lighthouse_addr=lighthouse,
            replica_id=f"replica{rank}",
        )
        try:
            train_live(ctx, config, Path(token_file), Path(run_dir), manager, replica_group, join)
        finally:
            manager.shutdown(wait=False)

    run_reporting(rank, Path(run_dir), errors, body)


def wait_to_rejoin(run_dir: Path, at_step: int) -> bool:
    """Wait until replica 0 has recorded ``at_step`` steps; False if it finished first."""
    while read_jsonl_count(run_dir / METRICS_FILE) < at_step:
        if done_marker(run_dir, 0).exists():
            return False
        time.sleep(READY_POLL_S)
    return True


def read_jsonl_count(file: Path) -> int:
    """How many lines ``file`` holds (0 if it does not exist yet)."""
    try:
        return file.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def ready_marker(run_dir: Path, rank: int) -> Path:
    """``logs/replicaR.ready``: replica R is ready to ask for its first quorum."""
    return run_dir / LOGS_DIR / f"replica{rank}.ready"


def wait_for_peers(run_dir: Path, rank: int, peers: int, timeout_s: float) -> None:
    """Mark this replica ready; wait until the first ``peers`` replicas are (``timeout_s``).

    Called just before the first quorum. The Lighthouse waits for a heartbeating replica
    that has not asked for the quorum yet only ``JOIN_TIMEOUT_MS`` (1 s): a replica still
    building its model then (a busy machine: one CI run's replica 2 on the cluster) would be
    left out of step 0 and heal into a later step instead.
    """
    ready_marker(run_dir, rank).parent.mkdir(parents=True, exist_ok=True)
    ready_marker(run_dir, rank).touch()
    deadline = time.monotonic() + timeout_s
    while not all(ready_marker(run_dir, r).exists() for r in range(peers)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"replica {rank}: its peers did not start within {timeout_s:g} s")
        time.sleep(READY_POLL_S)


def train_live(
    ctx: RankContext,
    config: Config,
    token_file: Path,
    run_dir: Path,
    manager: Manager,
    replica_group: ReplicaGroup,
    join: Join,
) -> dict[str, Any] | None:
    """Step with whichever replicas are alive until ``config.steps``; the summary on replica 0.

    Per step: fire this replica's injected fault (before it joins the quorum, so a replica
    killed there is in no quorum), join the quorum (healing if behind), then run the step
    on this replica's rows. The step number is the Manager's count of committed steps,
    which healing sets to the live peers'. A replica restarted ``alone`` that finds itself
    alone in its first quorum (the others finished the run) stops without stepping; one
    whose peers are at its own step (it died before step 0) steps with them.
    """
    alone = join.alone
    started = time.time()
    trainer, step_fn = replica_trainer(ctx, config, token_file, run_dir, manager, replica_group)
    wait_for_peers(run_dir, ctx.rank, join.peers, config.timeout_s)
    replicas_before = config.nproc
    unsaved: int | None = None  # replica 0: the last step, saved once the next quorum is formed
    last_retry: tuple[int, list[str]] | None = None
    try:
        while manager.current_step() < config.steps:
            before = manager.current_step()
            trainer.fire_fault_at(before)
            waited = time.perf_counter()
            manager.start_quorum()
            quorum_s = time.perf_counter() - waited
            step, replicas = manager.current_step(), manager.num_participants()
            if unsaved is not None and step == before:
                # Saved inside the quorum of the next step: the others wait for replica 0 in
                # that step's all-reduce. Saved before joining it, the Lighthouse formed the
                # quorum without replica 0, which then healed forward past unrecorded steps.
                trainer.save_checkpoint_if_due(unsaved)
            unsaved = None
            if step != before:
                append_event(
                    run_dir, "heal", rank=ctx.rank, from_step=before, step=step, heal_s=quorum_s
                )
            elif alone and replicas == 1:  # with peers at its own step, it steps with them
                append_event(run_dir, "rejoin_skipped", rank=ctx.rank, reason="no live peer")
                return None
            alone = False
            if step >= config.steps:
                break
            if ctx.is_main and replicas != replicas_before:
                append_event(run_dir, "quorum", step=step, replicas=replicas)
                replicas_before = replicas
            if not trainer.run_step(
                step, partial(step_fn.step_metrics, quorum_s, trainer.tokens_per_step)
            ):
                error = str(manager.errored() or "").splitlines()[:1]
                if (step, error) != last_retry:  # once while waiting for replica 0
                    append_event(run_dir, "step_retry", rank=ctx.rank, step=step, reason=error)
                last_retry = (step, error)
                if error == [REPLICA_0_ABSENT]:
                    time.sleep(READY_POLL_S)  # it is late: no need to spin
                continue
            if ctx.is_main:  # replica 0 alone saves: every replica holds the whole state
                unsaved = step
        if unsaved is not None:
            trainer.save_checkpoint_if_due(unsaved)
        figures = live_figures(run_dir, config) if ctx.is_main else None
        return trainer.conclude(started, figures)
    except BaseException:
        trainer.close_on_error()
        raise


def replica_trainer(
    ctx: RankContext,
    config: Config,
    token_file: Path,
    run_dir: Path,
    manager: Manager,
    replica_group: ReplicaGroup,
) -> tuple[RankTrainer, LiveTrainStep]:
    """This replica's trainer (model built, resumed) and its train step, whose state is
    registered with the Manager so that a peer can heal from it, or it from a peer."""
    write_pid(run_dir, ctx.rank)
    beat(run_dir, ctx.rank, "setup")
    trainer = RankTrainer(
        ctx,
        config,
        token_file,
        run_dir,
        prepare=lambda m: LiveTrainStep(m, ctx, config, manager, replica_group),
    )
    step_fn = trainer.train_step
    assert isinstance(step_fn, LiveTrainStep)
    manager.register_state_dict_fn("distlab", step_fn.load_replica_state, step_fn.replica_state)
    manager.load_state_dict({"step": trainer.resumed.start_step, "batches_committed": 0})
    return trainer, step_fn


def live_figures(run_dir: Path, config: Config) -> dict[str, Any]:
    """summary.json's live-recovery fields: steps run short of replicas, and the heals."""
    replicas = [
        (m["step"], m.get("replicas", config.nproc)) for m in read_jsonl(run_dir / METRICS_FILE)
    ]
    heals = [e for e in read_events(run_dir) if e["event"] == "heal"]
    return {
        "ft": "live",
        "steps_short_of_replicas": [step for step, k in replicas if k < config.nproc],
        "heals": [{k: e[k] for k in ("rank", "from_step", "step", "heal_s")} for e in heals],
    }
