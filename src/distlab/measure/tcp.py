"""An independent check of the counted bytes: the kernel's TCP byte counters (``ss -tinp``)."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

_SS_FIELDS = re.compile(r"(bytes_acked|bytes_received|bytes_sent):(\d+)")


_SS_PID = re.compile(r"pid=(\d+)")


@dataclass(frozen=True)
class TcpBytes:
    """Bytes the kernel counted on one process's TCP sockets to 127.0.0.1."""

    sent: int
    """Acknowledged bytes sent (``bytes_acked``: excludes retransmissions)."""
    received: int
    sockets: int

    def __sub__(self, other: TcpBytes) -> TcpBytes:
        return TcpBytes(self.sent - other.sent, self.received - other.received, self.sockets)


def tcp_bytes(pid: int, exclude_ports: Iterable[int] = ()) -> TcpBytes:
    """Per-socket counters from ``ss -tinp`` summed over ``pid``'s loopback TCP sockets.

    ``exclude_ports`` leaves out connections to or from those ports (the
    rendezvous store, for instance), so only gloo's pair connections remain.
    """
    output = subprocess.run(
        ["ss", "-tinpH", "state", "established"], capture_output=True, text=True, check=True
    ).stdout
    return parse_ss(output, pid, exclude_ports)


def parse_ss(output: str, pid: int, exclude_ports: Iterable[int] = ()) -> TcpBytes:
    """Sum ``bytes_acked``/``bytes_received`` of ``pid``'s 127.0.0.1 sockets in ``ss -tinpH``.

    Each socket is a line with the addresses and ``users:((...,pid=N,...))``
    followed by an indented line of counters.
    """
    excluded = {str(p) for p in exclude_ports}
    sent = received = sockets = 0
    lines = output.splitlines()
    for index, line in enumerate(lines):
        if line.startswith(("\t", " ")) or index + 1 >= len(lines):
            continue
        if pid not in {int(p) for p in _SS_PID.findall(line)} or "127.0.0.1" not in line:
            continue
        ports = {addr.rsplit(":", 1)[-1] for addr in line.split() if addr.count(":") == 1}
        if ports & excluded:
            continue
        fields = dict(_SS_FIELDS.findall(lines[index + 1]))
        sent += int(fields.get("bytes_acked", 0))
        received += int(fields.get("bytes_received", 0))
        sockets += 1
    return TcpBytes(sent, received, sockets)
