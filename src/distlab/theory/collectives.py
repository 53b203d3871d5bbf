"""What a communication prediction is made of: collectives, the step's facts, expert routing.

``CommPrediction`` adds up rank 0's collectives per type (payload and wire bytes,
calls); ``StepFacts`` is what every part of ``theory.comm``'s prediction reads of
rank 0's step; ``ExpertRouting`` carries an ``ep`` run's measured routing counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from distlab.config import Config
from distlab.measure.wire import KINDS, wire_bytes
from distlab.strategies.parallel_dims import numel
from distlab.theory.rank_layout import RankLayout

INT64 = 8


@dataclass
class CommPrediction:
    """Predicted communication of rank 0 in one optimizer step."""

    kinds: dict[str, float] = field(default_factory=dict)
    """Payload bytes per collective type."""
    calls: dict[str, int] = field(default_factory=dict)
    """Number of collectives per type (where the schedule is known exactly)."""
    wire_bytes: float = 0.0
    """Bytes rank 0 sends over TCP under gloo's algorithms."""
    formula: str = ""
    notes: list[str] = field(default_factory=list)
    uncounted: set[str] = field(default_factory=set)
    """Types whose number of calls is not predicted (bucketing decides it)."""

    @property
    def bytes(self) -> float:
        return sum(self.kinds.values())

    def add(
        self,
        kind: str,
        payload: float,
        group_size: int,
        calls: int | None = 1,
        relative_rank: int = 0,
        wire: float | None = None,
    ) -> None:
        """Add ``calls`` collectives of ``kind`` (None: number not predicted) moving ``payload``;
        ``wire``: the bytes sent, where gloo's algorithm model does not say (unequal splits)."""
        if group_size <= 1 and kind not in ("send", "recv"):
            return
        self.kinds[kind] = self.kinds.get(kind, 0.0) + payload
        if calls is None:
            self.uncounted.add(kind)
        else:
            self.calls[kind] = self.calls.get(kind, 0) + calls
        if wire is None:
            wire = wire_bytes(kind, int(payload), group_size, relative_rank)
        self.wire_bytes += wire

    def to_dict(self) -> dict[str, Any]:
        ordered = {k: self.kinds[k] for k in KINDS if k in self.kinds}
        return {
            "bytes": self.bytes,
            "wire_bytes": round(self.wire_bytes),
            "kinds": ordered,
            "calls": {
                k: self.calls[k] for k in KINDS if k in self.calls and k not in self.uncounted
            },
            "formula": self.formula,
            "notes": self.notes,
        }


@dataclass(frozen=True)
class ExpertRouting:
    """Rank 0's expert-parallel rows in one step (the run's ``ep/rows_sent``,
    ``ep/rows_received``), summed over MoE layers and micro-batches."""

    rows_sent: list[float]
    """Rows rank 0 sent to each rank of its ep group (itself included); a mean over
    several steps may be fractional."""
    rows_received: list[float]
    """Rows rank 0 received from each rank of its ep group (itself included)."""


@dataclass(frozen=True)
class StepFacts:
    """What every part of the prediction reads of rank 0's step."""

    config: Config
    layout: RankLayout
    shapes: dict[str, tuple[int, ...]]
    """Rank 0's parameters: its pipeline stage(s), tensor-parallel local."""
    rows: int
    """Rows of the global batch on this data-parallel rank."""
    seq: int
    accum: int
    """Micro-batches per step outside pipelines (1 inside one: the schedule's own)."""
    model_bytes: int
    """Bytes per element of parameters gathered and activations under FSDP/ZeRO bf16."""
    matmul_bytes: int
    """Bytes per element of matmul outputs (bf16 under autocast too)."""
    routing: ExpertRouting | None

    @property
    def p_local(self) -> int:
        """Rank 0's parameter elements."""
        return numel(self.shapes)
