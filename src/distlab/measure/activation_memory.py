"""Peak memory of one forward and backward by category, measured by torch's ``MemTracker``.

``torch.distributed._tools.mem_tracker.MemTracker`` follows every tensor created
while it is active (CPU tensors too) and files it as parameter, gradient,
activation (saved for backward, or alive across a module boundary), temporary
or optimizer state. Its peak snapshot splits the moment of highest total memory
by those categories: what activation checkpointing (``--ac``) lowers is the
activation part.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker

ACTIVATIONS = "Activation"
"""The category name of saved activations in ``peak_bytes``'s result."""


CATEGORY_NAMES = {
    "PARAM": "Parameter",
    "BUFFER": "Buffer",
    "GRAD": "Gradient",
    "ACT": ACTIVATIONS,
    "TEMP": "Temp",
    "OPT": "Optstate",
    "OTH": "Other",
}
"""MemTracker's category enum names, as its own ``display_snapshot`` prints them."""


def peak_bytes(model: nn.Module, step: Callable[[], None]) -> dict[str, int]:
    """Bytes at the peak of ``step()`` (a forward and backward of ``model``), by category.

    Keys are MemTracker's category names (``Parameter``, ``Gradient``, ``Activation``,
    ``Temp``, ...) and ``Total``, summed over devices.
    """
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        step()
    totals: dict[str, int] = {}
    for by_kind in tracker.get_tracker_snapshot("peak").values():
        for kind, size in by_kind.items():
            name = kind if isinstance(kind, str) else CATEGORY_NAMES.get(kind.name, kind.name)
            totals[name] = totals.get(name, 0) + size
    return totals
