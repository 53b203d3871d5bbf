"""How long this process has spent in ``torch.compile``, by torch's own accounting.

``compile_seconds`` is the sum of dynamo's two outermost compile phases:
``entire_frame_compile`` (tracing a frame, AOTAutograd's forward/backward
split, inductor compiling the forward, or loading it from the cache) and
``entire_backward_compile`` (inductor compiling the backward graph, which
happens lazily in the first backward). Compilation runs synchronously in the
calling thread, so the difference of ``compile_seconds`` across a step is the
part of that step's wall time spent compiling (measured here: 40.70 s of a
40.74 s first step). It does not include the time other ranks then wait for
the slowest one to finish compiling.

torch exposes this only privately, as ``torch._dynamo.utils.calculate_time_spent``
(checked on torch 2.13; its form is unchanged from earlier 2.x releases).
``torch._dynamo`` takes about 2 s to import, so it is read only once a run has
imported it (runs with ``--compile`` do); before that nothing was compiled.
"""

from __future__ import annotations

import sys


def compile_seconds() -> float:
    """Seconds this process has spent compiling so far (0 if nothing was compiled)."""
    if "torch._dynamo" not in sys.modules:
        return 0.0
    from torch._dynamo.utils import calculate_time_spent

    return calculate_time_spent().get("total_wall_time", 0.0)


def compile_cache_counts() -> dict[str, int]:
    """Graphs AOTAutograd loaded from its cache (``hits``) or compiled anew (``misses``)."""
    if "torch._dynamo" not in sys.modules:
        return {"hits": 0, "misses": 0}
    from torch._dynamo.utils import counters

    cache = counters["aot_autograd"]
    return {"hits": cache["autograd_cache_hit"], "misses": cache["autograd_cache_miss"]}
