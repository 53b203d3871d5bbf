"""The planner's answer for people: a table of the best layouts and a picture of where
each one's step time and memory go."""

from __future__ import annotations

from pathlib import Path

from distlab.plan.search import Plan

GiB = 2**30
TIME_PARTS = (
    ("compute", "compute_s"),
    ("exposed comm", "exposed_comm_s"),
    ("bubble", "bubble_s"),
    ("optimizer", "optimizer_s"),
)
MEMORY_PARTS = ("params", "grads", "optimizer", "activations", "comm_buffers", "temporaries")


def fmt_bytes(n: float) -> str:
    """Bytes as GiB (or MiB below 1 GiB)."""
    return f"{n / GiB:.2f}G" if n >= GiB else f"{n / 2**20:.1f}M"


def table(plans: list[Plan], top: int) -> str:
    """The ``top`` plans as a fixed-width table, one row per layout."""
    header = (
        f"{'#':>2}  {'layout':44s} {'fits':4s} {'params':>7s} {'grads':>7s} {'optim':>7s} "
        f"{'activ':>7s} {'buffers':>7s} {'total':>7s}  {'step s':>8s} {'compute':>8s} "
        f"{'comm':>8s} {'bubble':>8s} {'tokens/s':>10s} {'TFLOP/s':>8s} {'MFU %':>6s}"
    )
    lines = [header, "-" * len(header)]
    for i, plan in enumerate(plans[:top], 1):
        m = plan.memory.by_category
        buffers = m["comm_buffers"] + m["temporaries"] + m.get("other", 0)
        lines.append(
            f"{i:>2}  {plan.layout.label()[:44]:44s} {'yes' if plan.fits else 'NO':4s} "
            f"{fmt_bytes(m['params']):>7s} {fmt_bytes(m['grads']):>7s} "
            f"{fmt_bytes(m['optimizer']):>7s} {fmt_bytes(m['activations']):>7s} "
            f"{fmt_bytes(buffers):>7s} {fmt_bytes(plan.memory.total):>7s}  "
            f"{plan.step.total_s:8.4g} {plan.step.compute_s:8.3g} {plan.step.exposed_comm_s:8.3g} "
            f"{plan.step.bubble_s:8.3g} {plan.tokens_per_s:10,.0f} {plan.tflops_per_gpu:8.4g} "
            f"{100 * plan.mfu:6.1f}"
        )
    return "\n".join(lines)


def picture(plans: list[Plan], top: int, path: Path, title: str, memory_limit: float) -> Path:
    """Two panels of horizontal bars, one bar per layout: the step's time split
    (compute, exposed communication, bubble, optimizer) and the memory per GPU by
    category against the device's memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = plans[:top][::-1]
    labels = [p.layout.label() for p in shown]
    fig, (time_ax, mem_ax) = plt.subplots(1, 2, figsize=(14, 0.45 * len(shown) + 1.8), sharey=True)
    left = [0.0] * len(shown)
    for name, attr in TIME_PARTS:
        values = [getattr(p.step, attr) for p in shown]
        time_ax.barh(labels, values, left=left, label=name)
        left = [a + b for a, b in zip(left, values, strict=True)]
    time_ax.set_xlabel("predicted step time (s)")
    time_ax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncol=4, fontsize=8, frameon=False)
    left = [0.0] * len(shown)
    for name in MEMORY_PARTS:
        values = [p.memory.by_category[name] / GiB for p in shown]
        mem_ax.barh(labels, values, left=left, label=name)
        left = [a + b for a, b in zip(left, values, strict=True)]
    largest = max(left)
    if memory_limit / GiB <= 3 * largest:
        mem_ax.axvline(memory_limit / GiB, color="black", linestyle="--", label="device memory")
        mem_ax.set_xlabel("predicted memory per GPU (GiB)")
    else:  # a line far off the bars would squash them
        mem_ax.set_xlabel(
            f"predicted memory per GPU (GiB; the device has {memory_limit / GiB:.0f} GiB)"
        )
    mem_ax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncol=4, fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
