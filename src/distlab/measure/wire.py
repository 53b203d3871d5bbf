"""What a collective puts on the wire: payload bytes and the bytes this rank sends under gloo.

Payload bytes follow the nccl-tests convention, the size of the whole buffer:
all-reduce and broadcast: the tensor; all-gather: the gathered output;
reduce-scatter: the (unreduced) input; send/recv: the message. Wire bytes are
what this rank sends over TCP under gloo's algorithms (``wire_bytes``), checked
against the kernel's per-socket byte counters (``distlab.measure.tcp``) in
``tests/test_comm.py``. ``distlab.theory`` predicts with the same model.
"""

from __future__ import annotations

KINDS = (
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "broadcast",
    "send",
    "recv",
    "all_to_all",
    "reduce",
    "gather",
    "scatter",
    "barrier",
)
"""Collective types, in the order tables show them."""


def wire_bytes(kind: str, payload: int, group_size: int, relative_rank: int = 0) -> float:
    """Bytes this rank sends for one collective under gloo's algorithms (group of N).

    Measured with the kernel's TCP counters (``tests/test_comm.py``; 2 and 4
    ranks, within 0.1 %): all-reduce is a ring (reduce-scatter then
    all-gather), 2 (N-1)/N of the buffer per rank; all-gather is a ring,
    (N-1)/N of the gathered output. gloo's reduce-scatter is an all-reduce of
    the whole input followed by a local slice, so it sends 2 (N-1)/N of the
    input, twice what a ring reduce-scatter (NCCL) sends. Broadcast is a
    binomial tree: a rank sends the buffer once per child, and the ranks
    together send it N-1 times. ``relative_rank`` is (rank - root) mod N for
    rooted collectives.
    """
    n = group_size
    if n <= 1:
        return 0.0
    if kind in ("all_reduce", "reduce_scatter"):
        return 2.0 * (n - 1) / n * payload
    if kind in ("all_gather", "all_to_all"):
        return (n - 1) / n * payload
    if kind == "broadcast":
        return float(payload * binomial_children(relative_rank, n))
    if kind == "send":
        return float(payload)
    if kind in ("reduce", "gather"):
        return 0.0 if relative_rank == 0 else float(payload)
    if kind == "scatter":
        return float(payload * (n - 1)) if relative_rank == 0 else 0.0
    return 0.0


def binomial_children(relative_rank: int, n: int) -> int:
    """Children of a rank in a binomial broadcast tree over n ranks rooted at 0.

    Rank r receives in the round given by its highest bit and then sends to
    r + 2^k for every later round k while that rank exists.
    """
    k = relative_rank.bit_length()
    children = 0
    while relative_rank + (1 << k) < n:
        children += 1
        k += 1
    return children
