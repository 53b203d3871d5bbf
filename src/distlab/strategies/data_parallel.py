"""How the data-parallel replicas share the work: the flavour a strategy declares.

Every strategy names its flavour in ``Strategy.data_parallel``. The flavour decides
what each rank keeps whole and what it splits with the other replicas, and so what
the theory predicts (``distlab.theory``): the communication through a table of one
function per flavour (``theory.comm_data_parallel``), the memory from the facts below.

What each flavour splits over the data-parallel ranks (every rank holds the rest whole):

    flavour        parameters  gradients  optimizer state  run by
    none           -           -          -                (no data parallelism: single, tp, pp)
    ddp            -           -          -                torch DDP
    fsdp           split       split      split            torch FSDP2 (hsdp: within each group)
    zero1          -           -          split            DeepSpeed, ZeRO stage 1
    zero2          -           split      split            DeepSpeed, ZeRO stage 2
    zero3          split       split      split            DeepSpeed, ZeRO stage 3
    fairscale-oss  -           -          split            fairscale OSS under torch DDP
    fairscale-sdp  -           split      split            fairscale OSS + ShardedDataParallel
    ep             -           -          -                torch (expert parallelism splits
                                                           the experts, not the replicas)

``DataParallel`` names the flavours, ``FLAVOUR_FACTS`` is the table, and a member's
properties read its row: ``DataParallel.ZERO2.shards_gradients`` is True.
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple


class Library(Enum):
    """What keeps the replicas in step."""

    TORCH = "torch"
    DEEPSPEED = "DeepSpeed"
    FAIRSCALE = "fairscale"


class DataParallel(Enum):
    """A data-parallel flavour (``Strategy.data_parallel``): what it splits over the
    data-parallel ranks and what runs it (the module docstring's table)."""

    NONE = "none"
    """No data parallelism: one replica (single; tp and pp spread one replica over the ranks)."""
    DDP = "ddp"
    """torch DDP: every rank holds the whole model state; the gradients are all-reduced."""
    FSDP = "fsdp"
    """torch FSDP2: parameters, gradients and optimizer state split over the shard ranks
    (every data-parallel rank, or hsdp's group); each unit's parameters gathered for use."""
    ZERO1 = "zero1"
    """DeepSpeed ZeRO-1: the optimizer state split; the gradients all-reduced whole."""
    ZERO2 = "zero2"
    """DeepSpeed ZeRO-2: the optimizer state and the gradients split."""
    ZERO3 = "zero3"
    """DeepSpeed ZeRO-3: the parameters split too, gathered for use."""
    FAIRSCALE_OSS = "fairscale-oss"
    """fairscale's OSS optimizer under torch DDP: the optimizer state split."""
    FAIRSCALE_SDP = "fairscale-sdp"
    """fairscale's OSS under its ShardedDataParallel: each gradient reduced to the rank that
    owns its optimizer state, so the gradients are split too."""
    EP = "ep"
    """Expert parallelism's replicas: the dense parameters whole on every rank and
    all-reduced; the experts split over the ``--ep`` ranks by expert parallelism."""

    @property
    def shards_parameters(self) -> bool:
        """Whether each rank holds only its share of the parameters between their uses."""
        return FLAVOUR_FACTS[self].parameters

    @property
    def shards_gradients(self) -> bool:
        """Whether each rank keeps only its share of the reduced gradients."""
        return FLAVOUR_FACTS[self].gradients

    @property
    def shards_optimizer_state(self) -> bool:
        """Whether each rank holds (and steps) only its share of the optimizer state."""
        return FLAVOUR_FACTS[self].optimizer_state

    @property
    def zero_stage(self) -> int:
        """The ZeRO stage whose split this flavour makes (the planner's ``--zero``): 3 with
        the parameters split, 2 with the gradients, 1 with the optimizer state, else 0."""
        facts = FLAVOUR_FACTS[self]
        return 3 if facts.parameters else 2 if facts.gradients else int(facts.optimizer_state)

    @property
    def replicates_model_state(self) -> bool:
        """Whether every rank holds the whole model state (the flavour splits nothing)."""
        facts = FLAVOUR_FACTS[self]
        return not (facts.parameters or facts.gradients or facts.optimizer_state)

    @property
    def deepspeed(self) -> bool:
        """Whether DeepSpeed runs it (a ZeRO stage)."""
        return FLAVOUR_FACTS[self].library is Library.DEEPSPEED

    @property
    def fairscale(self) -> bool:
        """Whether fairscale runs it (OSS)."""
        return FLAVOUR_FACTS[self].library is Library.FAIRSCALE

    @property
    def casts_model(self) -> bool:
        """Whether ``--precision bf16`` makes the model itself bf16, every op included (FSDP2's
        ``MixedPrecisionPolicy``, DeepSpeed's bf16 mode); the others autocast over fp32
        parameters."""
        return self is DataParallel.FSDP or self.deepspeed


class Facts(NamedTuple):
    """One flavour's row of the module docstring's table."""

    parameters: bool
    """Whether it splits the parameters over the data-parallel ranks."""
    gradients: bool
    """Whether it splits the gradients."""
    optimizer_state: bool
    """Whether it splits the optimizer state."""
    library: Library
    """What runs it."""


FLAVOUR_FACTS: dict[DataParallel, Facts] = {
    #                                 splits: parameters, gradients, optimizer state; run by
    DataParallel.NONE:          Facts(False, False, False, Library.TORCH),
    DataParallel.DDP:           Facts(False, False, False, Library.TORCH),
    DataParallel.FSDP:          Facts(True,  True,  True,  Library.TORCH),
    DataParallel.ZERO1:         Facts(False, False, True,  Library.DEEPSPEED),
    DataParallel.ZERO2:         Facts(False, True,  True,  Library.DEEPSPEED),
    DataParallel.ZERO3:         Facts(True,  True,  True,  Library.DEEPSPEED),
    DataParallel.FAIRSCALE_OSS: Facts(False, False, True,  Library.FAIRSCALE),
    DataParallel.FAIRSCALE_SDP: Facts(False, True,  True,  Library.FAIRSCALE),
    DataParallel.EP:            Facts(False, False, False, Library.TORCH),
}  # fmt: skip
"""Each flavour's facts, in one place (the module docstring's table)."""
