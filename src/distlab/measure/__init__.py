"""Measuring a rank: memory, model FLOPs utilisation, and every collective it issues.

``memory`` and ``mfu`` are small; communication is counted by the ``distlab_gloo``
process group (``process_group``) into a per-process tally (``counter``), with
the bytes each collective puts on the wire modelled in ``wire`` and checked
against the kernel's TCP counters in ``tcp``.
"""
