"""Finished runs as the report reads them (run dirs or W&B), with figures and predictions."""

from __future__ import annotations

import glob
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distlab.config import Config
from distlab.errors import DistlabError
from distlab.launch.wandb_run import wandb_mode
from distlab.measure.wire import KINDS
from distlab.model import PRESETS
from distlab.run.files import (
    CONFIG_FILE,
    METRICS_FILE,
    RANKS_DIR,
    SUMMARY_FILE,
    read_jsonl,
    read_memory_ranks,
)
from distlab.theory import predict
from distlab.theory.collectives import ExpertRouting

MIB = 2**20


@dataclass
class Run:
    """One finished run read back from its run dir (or from W&B)."""

    path: Path
    summary: dict
    metrics: list[dict]
    config: dict = field(default_factory=dict)
    """The resolved ``config.yaml`` ({} when missing)."""
    rank_metrics: dict[int, list[dict]] = field(default_factory=dict)
    """``ranks/rank<r>.jsonl``: each rank's per-step memory and communication."""

    @property
    def label(self) -> str:
        """``strategy xN``: what ran, on how many ranks; a mixture-of-experts model is named
        too (``ep x4 small-moe``), since it is another model than the dense presets."""
        label = f"{self.summary['strategy']} x{self.summary['nproc']}"
        model = self.summary.get("model", "")
        return f"{label} {model}" if PRESETS.get(model) and PRESETS[model].n_expert else label

    @property
    def predicted(self) -> dict[str, Any]:
        """Theory for this run: recomputed from its config when possible, else its summary's."""
        if "_predicted" not in self.__dict__:
            self.__dict__["_predicted"] = self._predict()
        return self.__dict__["_predicted"]

    def _predict(self) -> dict[str, Any]:
        if self.config:
            try:
                known = {k: v for k, v in self.config.items() if k in Config.__dataclass_fields__}
                return predict(Config(**known), self.expert_routing())
            except Exception:  # noqa: BLE001 - old or foreign config: fall back to the summary
                pass
        predicted = dict(self.summary.get("predicted") or {})
        if "model_state_bytes_per_rank" not in predicted:
            state = self.summary.get("predicted_model_state_bytes_per_rank")
            if state:
                predicted["model_state_bytes_per_rank"] = state
        return predicted

    def expert_routing(self) -> ExpertRouting | None:
        """An ``ep`` run's rows sent and received in the step whose communication the summary
        holds (``comm_step``), for the theory; None for other runs."""
        step = self.summary.get("comm_step")
        row = next((m for m in self.metrics if m.get("step") == step), {})
        if "ep/rows_sent" not in row:
            return None
        return ExpertRouting(row["ep/rows_sent"], row["ep/rows_received"])


def _one_row_per_step(path: Path) -> list[dict]:
    """A JSON-lines file's rows; for a step written twice (a restarted run), the last one wins."""
    rows = {row.get("step", index): row for index, row in enumerate(read_jsonl(path))}
    return [rows[k] for k in sorted(rows, key=lambda k: (isinstance(k, str), k))]


def load_runs(patterns: list[str]) -> list[Run]:
    """Read every run dir the patterns name; one-line error for anything that is not one."""
    paths: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) or [pattern]
        paths += [Path(m) for m in matches]
    runs = []
    for path in paths:
        summary_file, metrics_file = path / SUMMARY_FILE, path / METRICS_FILE
        if not summary_file.is_file() or not metrics_file.is_file():
            raise DistlabError(f"{path} is not a finished run dir (no summary.json/metrics.jsonl)")
        try:
            summary = json.loads(summary_file.read_text())
            metrics = _one_row_per_step(metrics_file)
            config_file = path / CONFIG_FILE
            config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
            ranks = {}
            for rank_file in sorted((path / RANKS_DIR).glob("rank*.jsonl")):
                ranks[int(rank_file.stem.removeprefix("rank"))] = _one_row_per_step(rank_file)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise DistlabError(f"{path} has a corrupt summary or metrics file: {exc}") from None
        runs.append(Run(path, summary, metrics, config or {}, ranks))
    if not runs:
        raise DistlabError("no run dirs given")
    return runs


def load_wandb_runs(project: str, group: str | None = None) -> list[Run]:
    """Finished runs of a W&B project (``entity/project``), optionally one group (online only)."""
    if wandb_mode() != "online":
        raise DistlabError(
            "reading runs from W&B needs an API key (wandb login or WANDB_API_KEY); "
            "offline runs are read from their run dirs"
        )
    import wandb

    filters: dict[str, Any] = {"state": "finished"}
    if group:
        filters["group"] = group
    runs = []
    for remote in wandb.Api().runs(project, filters=filters):
        summary = _unflatten(dict(remote.summary))
        if "strategy" not in summary:
            continue
        metrics = [dict(row) for row in remote.scan_history()]
        metrics = [m for m in metrics if "loss" in m and "step" in m]
        runs.append(Run(Path(remote.name), summary, metrics, dict(remote.config)))
    if not runs:
        raise DistlabError(f"no finished distlab runs in W&B project {project}")
    return runs


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """Undo RunRecorder's ``a/b`` summary flattening."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if key.startswith("_"):
            continue
        node = out
        parts = key.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def ratio(measured: float | None, predicted: float | None) -> float | None:
    """measured / predicted, or None when either is missing (or the prediction is 0)."""
    if measured is None or predicted is None or not predicted:
        return None
    return measured / predicted


def peak_memory_by_rank(run: Run) -> list[int]:
    """Each rank's peak memory (RSS on CPU): from the summary, else the rank files."""
    by_rank = run.summary.get("peak_memory_bytes_by_rank")
    if by_rank:
        return list(by_rank)
    return [rows[-1]["peak_memory_bytes"] for _, rows in sorted(run.rank_metrics.items()) if rows]


def memory_timelines(run: Run) -> list[dict[str, Any]]:
    """Each rank's ``ranks/memory_rank<r>.json``, timeline included ([] where there are none)."""
    try:
        return read_memory_ranks(run.path)
    except ValueError as exc:
        raise DistlabError(f"{run.path} has a corrupt memory timeline: {exc}") from None


def memory_peaks(run: Run) -> list[dict[str, Any] | None]:
    """Each rank's measured step memory (peak, its split and phase; None: the rank ran no step).

    From the summary (``memory_peak_by_rank``), else the rank files; [] for runs
    from before the step memory was measured.
    """
    records = run.summary.get("memory_peak_by_rank")
    if records:
        return list(records)
    return [{k: v for k, v in r.items() if k != "timeline"} for r in memory_timelines(run)]


def comm_per_step(run: Run) -> dict[str, Any] | None:
    """Rank 0's communication in a typical step, as flat ``kind/bytes`` keys (None: not counted)."""
    if run.summary.get("comm_counted") is False:
        return None
    comm = run.summary.get("comm_per_step")
    if comm:
        return comm
    steps = [m for m in run.metrics if "comm/bytes" in m]
    if not steps:
        return None
    steps = steps[1:] or steps
    ordered = sorted(steps, key=lambda m: m["comm/bytes"])
    row = ordered[(len(ordered) - 1) // 2]
    return {k.removeprefix("comm/"): v for k, v in row.items() if k.startswith("comm/")}


def run_mfu(run: Run) -> float | None:
    """The run's MFU at its median step (summary), else the median of the per-step values."""
    if run.summary.get("mfu") is not None:
        return run.summary["mfu"]
    values = [m["mfu"] for m in run.metrics if m.get("mfu") is not None]
    return statistics.median(values) if values else None


def figures(run: Run) -> dict[str, Any]:
    """Every number of the comparison table for one run (None where not available)."""
    s = run.summary
    predicted = run.predicted
    state_pred = (predicted.get("model_state_bytes_per_rank") or {}).get("total")
    comm = comm_per_step(run)
    comm_pred = predicted.get("comm_per_step")
    memory = peak_memory_by_rank(run)
    step_memory = memory_peaks(run)
    rank0 = step_memory[0] if step_memory else None
    memory_pred = predicted.get("memory_peak")
    comm_bytes = comm.get("bytes") if comm else None
    pred_bytes = comm_pred.get("bytes") if comm_pred else None
    return {
        "label": run.label,
        "strategy": s["strategy"],
        "nproc": s["nproc"],
        "run": run.path.name,
        "final_loss": s.get("final_loss"),
        "final_val_loss": s.get("final_val_loss"),  # runs with --eval-every
        "tokens_per_s": s.get("tokens_per_s"),
        "mfu": run_mfu(run),
        "peak_memory_max": max(memory) if memory else None,
        "peak_memory_by_rank": memory,
        "state_bytes": s["model_state_bytes_per_rank"]["total"],
        "state_pred": state_pred,
        "state_ratio": ratio(s["model_state_bytes_per_rank"]["total"], state_pred),
        "comm_bytes": comm_bytes,
        "comm_pred": pred_bytes,
        "comm_ratio": ratio(comm_bytes, pred_bytes),
        "wire_bytes": comm.get("wire_bytes") if comm else None,
        "wire_pred": comm_pred.get("wire_bytes") if comm_pred else None,
        "comm_time_s": comm.get("time_s") if comm else None,
        "comm_kinds": {k: comm[f"{k}/bytes"] for k in KINDS if comm and f"{k}/bytes" in comm},
        "comm_kinds_pred": dict(comm_pred.get("kinds", {})) if comm_pred else {},
        "bubble": predicted.get("pipeline_bubble"),
        "step_memory": rank0,
        "step_memory_max": max((r["peak"] for r in step_memory if r), default=None),
        "step_memory_pred": memory_pred,
        "step_memory_ratio": ratio(
            rank0["peak"] if rank0 else None, memory_pred["total"] if memory_pred else None
        ),
        "median_step_time_s": s.get("median_step_time_s"),
        **routing_figures(run),
    }


def routing_figures(run: Run) -> dict[str, Any]:
    """A MoE run's routing over its steps (rank 0's rows; ``distlab.moe.RoutingTally``): the
    last step's aux loss and tokens per expert, the mean and worst load imbalance, the
    dropped tokens (0: dropless); empty for a dense run."""
    steps = [m for m in run.metrics if "moe/tokens_per_expert" in m]
    if not steps:
        return {}
    imbalance = [m["moe/load_imbalance"] for m in steps]
    return {
        "moe_aux_loss": steps[-1]["moe/aux_loss"],
        "moe_tokens_per_expert": steps[-1]["moe/tokens_per_expert"],
        "moe_imbalance_mean": statistics.mean(imbalance),
        "moe_imbalance_max": max(imbalance),
        "moe_dropped_tokens": sum(m["moe/dropped_tokens"] for m in steps),
    }
