"""The run's W&B run, owned by the launcher's driver process and fed from the run dir.

The driver (the local launcher's loop, the Ray driver) lives across restarts,
so one distlab run is one W&B run whatever happens to the ranks; rank code
never imports W&B. ``WandbFeed.poll`` (called where the launchers poll
``events.jsonl`` for the fault lines) logs each new line of ``metrics.jsonl``
once, at ``step=metrics["step"]``, with the attempt that produced it
(``attempt``, 1 for the first); steps that a restart redoes are not logged
again (their losses are bitwise those already logged). Config goes in at the
start, the summary at the end.

The W&B run id is kept in ``RUN_DIR/wandb.json``. ``--resume`` of a run dir
that has one continues that W&B run: ``wandb.init(resume_from="ID?_step=K-1")``
rewinds it to the step before the resumed checkpoint K, so the history stays
one line per step, also when the source logged steps past K before it died.
Offline, W&B accepts ``resume_from`` and records the rewind point in the
offline run (its run record's ``branch_point``); the rewind itself happens when
the run is synced (sync the source's offline run first: ``wandb sync`` uploads
several offline runs of one id in start-time order).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from distlab.checkpoint.layout import checkpoint_step
from distlab.config import Config, model_shape
from distlab.errors import first_line
from distlab.model import count_parameters
from distlab.run.files import EVENTS_FILE, METRICS_FILE, WANDB_FILE, JsonlTail


def wandb_mode() -> str:
    """``online`` when the user has a W&B API key (or forces a mode), else ``offline``."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_wandb_info(run_dir: Path) -> dict[str, Any] | None:
    """The W&B run a run dir logged to (``wandb.json``), or None."""
    try:
        info = json.loads((Path(run_dir) / WANDB_FILE).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("id") else None


class WandbFeed:
    """Opens the W&B run, logs the run dir's new steps to it, closes it with the summary."""

    def __init__(self, run: Any, run_dir: Path, next_step: int) -> None:
        self.run = run
        self.run_dir = Path(run_dir)
        self.next_step = next_step
        self.attempt = 1
        self.events = JsonlTail(self.run_dir / EVENTS_FILE)
        self.metrics = JsonlTail(self.run_dir / METRICS_FILE)

    @classmethod
    def start(cls, config: Config, run_dir: Path) -> WandbFeed | None:
        """The run's W&B run (None with ``--no-wandb``, or if W&B cannot start: one warning)."""
        if not config.wandb:
            return None
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            import wandb
        except ImportError:
            print("distlab: warning: wandb is not installed; not logging to W&B", flush=True)
            return None

        mode = wandb_mode()
        source, from_step = None, 0
        if config.resume:
            checkpoint = Path(config.resume)
            source = read_wandb_info(checkpoint.parent.parent)
            from_step = checkpoint_step(checkpoint)
        common = {
            "group": config.wandb_group,
            "name": config.wandb_name or run_dir.name,
            "dir": str(run_dir),
            "mode": mode,
            "config": {
                **config.to_dict(),
                "parameters": count_parameters(model_shape(config)),
            },
            "allow_val_change": True,
            "reinit": "finish_previous",
        }
        run = None
        if source is not None and from_step > 0:
            try:
                run = wandb.init(
                    project=source.get("project") or config.wandb_project,
                    entity=source.get("entity"),
                    resume_from=f"{source['id']}?_step={from_step - 1}",
                    **common,
                )
            except Exception as exc:  # noqa: BLE001 - W&B raises many types
                print(
                    f"distlab: warning: could not continue W&B run {source['id']} "
                    f"({first_line(exc)}); starting a new W&B run",
                    flush=True,
                )
        if run is None:
            source = None
            try:
                run = wandb.init(project=config.wandb_project, **common)
            except Exception as exc:  # noqa: BLE001
                print(f"distlab: warning: not logging to W&B: {first_line(exc)}", flush=True)
                return None
        info = {
            "id": run.id,
            "project": run.project,
            "entity": getattr(run, "entity", None) or None,
            "mode": mode,
            "continues": source["id"] if source else None,
            "from_step": from_step if source else 0,
        }
        (run_dir / WANDB_FILE).write_text(json.dumps(info, indent=2) + "\n")
        return cls(run, run_dir, from_step if source else 0)

    def poll(self) -> None:
        """Log the steps recorded since the last poll, each step once."""
        for event in self.events.read():
            if event.get("event") == "start":
                self.attempt = event.get("attempt", self.attempt)
        for metrics in self.metrics.read():
            step = metrics.get("step")
            if not isinstance(step, int) or step < self.next_step:
                continue  # logged already (a restart redid it) or the resumed source's
            self.run.log({**metrics, "attempt": self.attempt}, step=step)
            self.next_step = step + 1

    def finish(self, summary: dict[str, Any] | None) -> None:
        """Log what is left, then close the W&B run: with the summary, or as failed (None);
        then stop W&B's service process, so the run's files are whole when this returns."""
        import wandb

        try:
            self.poll()
            if summary is None:
                self.run.finish(exit_code=1)
            else:
                self.run.config.update({"dp_size": summary.get("dp_size")}, allow_val_change=True)
                self.run.summary.update(flatten(summary))
                self.run.finish()
            # W&B's service process may still be writing the offline run's file when finish()
            # returns (a resumed run's file was written 9 ms later, and read before that it
            # lacked its run record); teardown waits for that process to stop. Its exit hook
            # does the same, but is not reliable beside multiprocessing, W&B's docs say.
            wandb.teardown()
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - never fail a run over W&B
            print(f"distlab: warning: closing the W&B run failed: {first_line(exc)}", flush=True)
