"""What the planner plans for: a device (its peak FLOP/s, memory, how fast its matmuls
really run) and the links between devices, from a table of datasheet figures, a JSON
file (``--gpu-spec``), or this machine's CPU.

Links follow the alpha-beta model: sending n bytes over a link takes
``latency + n / bandwidth``. ``bandwidth`` is one GPU's share in one direction (NVLink:
half the bidirectional datasheet figure; InfiniBand/RoCE: one NIC per GPU).

Matmuls follow the same model: a product of 2 m n k FLOPs takes
``matmul_overhead_s + 2 m n k / (peak x matmul_efficiency)``: small products are
dominated by the fixed cost (launch, tiling), large ones approach the efficiency
ceiling. The H100's two constants are fitted to the bf16 rates measured by
``benchmarks/matmul_rate.py`` (docs/measurements/matmul_rate_h100.json); other GPUs
take the H100's efficiency and overhead (their own measurements would replace them
through ``--gpu-spec``); the CPU's come from ``--calibrate``.
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

from distlab.errors import DistlabError
from distlab.measure.mfu import PROBE_SIZE, cpu_model, gpu_peak

GB = 1e9


@dataclass(frozen=True)
class Link:
    """One GPU's path to its peers: seconds per message and bytes per second."""

    bandwidth: float
    """Bytes per second, one direction, one GPU's share."""
    latency: float
    """Seconds per message (per step of a ring)."""

    def seconds(self, messages: float, nbytes: float) -> float:
        """Time to send ``messages`` messages totalling ``nbytes`` bytes, one after another."""
        return messages * self.latency + nbytes / self.bandwidth


@dataclass(frozen=True)
class Device:
    """One accelerator (or this machine's CPU) and the cluster links around it."""

    name: str
    peak_flops: dict[str, float]
    """Dense peak FLOP/s by precision: "bf16" (also for "mixed") and "fp32"."""
    memory_bytes: float
    memory_bandwidth: float
    """Bytes per second of device memory: the time of elementwise work and the optimizer."""
    intra_node: Link
    inter_node: Link
    gpus_per_node: int
    elementwise_bandwidth: float = 0.0
    """Bytes per second elementwise kernels (norms, activations, softmax, the optimizer)
    stream; 0: the memory bandwidth (GPUs: memory-bound). Eager CPU kernels run below the
    copy bandwidth: fitted by ``--calibrate``."""
    matmul_efficiency: float = 0.76
    """Fraction of the peak that large matmuls reach."""
    matmul_overhead_s: float = 6e-6
    """Fixed seconds per matmul (launch and small-shape inefficiency)."""
    layer_overhead_s: float = 0.0
    """Host seconds per layer per micro-batch, forward and backward (Python, autograd and
    kernel launches of eager PyTorch). A GPU runs it ahead of its kernels (a micro-batch
    takes the longer of the two); on a CPU the host is the device (they add)."""
    overlaps_comm: bool = True
    """Whether communication runs under compute (GPUs: yes; a CPU whose cores compute: no)."""
    cores: int = 0
    """CPU only: the cores all ranks of a node share (ranks beyond them wait their turn)."""
    oversubscription_exponent: float = 1.0
    """CPU only: r ranks on c < r cores compute (r / c) ** this slower (1: a fair share;
    more: the cost of switching between them)."""
    engine_overhead_s: dict[str, float] = field(default_factory=dict)
    """Seconds an engine adds to every step (e.g. "deepspeed": its hooks and bookkeeping)."""
    source: str = "datasheet"
    notes: tuple[str, ...] = field(default_factory=tuple)

    def elementwise_rate(self) -> float:
        """Bytes per second of elementwise work."""
        return self.elementwise_bandwidth or self.memory_bandwidth

    def peak(self, precision: str) -> float:
        """Peak FLOP/s of the precision the matmuls run in."""
        return self.peak_flops["fp32" if precision == "fp32" else "bf16"]

    def to_dict(self) -> dict[str, object]:
        """JSON form (the ``--gpu-spec`` and calibration file format)."""
        return asdict(self)


H100_MATMUL_EFFICIENCY = 0.78
H100_MATMUL_OVERHEAD_S = 15e-6
"""Fitted to the H100's 96 measured bf16 and fp32 matmul rates (rms error 15%) by
``python -m distlab.plan --calibrate docs/measurements/matmul_rate_h100.json --gpu
h100-sxm``; the other GPUs take them too until their own rates are measured."""


def _gpu(
    name: str,
    table_name: str,
    memory_gb: float,
    hbm_tb_s: float,
    nvlink_gb_s: float,
    nic_gb_s: float,
) -> Device:
    """A GPU from the datasheet table of ``distlab.measure.mfu`` plus memory and links."""
    return Device(
        name=name,
        peak_flops={
            "bf16": gpu_peak(table_name, "bf16", tf32=False) or 0.0,
            "fp32": gpu_peak(table_name, "fp32", tf32=False) or 0.0,
        },
        memory_bytes=memory_gb * GB,
        memory_bandwidth=hbm_tb_s * 1e12,
        intra_node=Link(bandwidth=nvlink_gb_s * GB, latency=3e-6),
        inter_node=Link(bandwidth=nic_gb_s * GB, latency=8e-6),
        gpus_per_node=8,
        matmul_efficiency=H100_MATMUL_EFFICIENCY,
        matmul_overhead_s=H100_MATMUL_OVERHEAD_S,
        source=(
            f"datasheet: {table_name} peak (distlab.measure.mfu), {memory_gb:g} GB at "
            f"{hbm_tb_s:g} TB/s, NVLink {nvlink_gb_s:g} GB/s and {nic_gb_s:g} GB/s NIC per GPU "
            "each way; latencies 3 us (NVLink) and 8 us (network) assumed; matmuls as "
            "measured on an H100"
        ),
    )


GPUS: dict[str, Device] = {
    "a100-40gb": _gpu("a100-40gb", "A100", 40, 1.555, 300, 25),
    "a100-80gb": _gpu("a100-80gb", "A100", 80, 2.039, 300, 25),
    "h100-sxm": _gpu("h100-sxm", "H100", 80, 3.35, 450, 50),
    "h200": _gpu("h200", "H200", 141, 4.8, 450, 50),
}
"""Datasheet devices (DGX/HGX nodes of 8: A100 with HDR 200 Gb/s, H100/H200 with NDR
400 Gb/s per GPU). "fp32" is the CUDA-core peak: torch's matmuls stay in fp32 unless
tf32 is switched on."""


def cpu_device(cores: int | None = None) -> Device:
    """This machine's CPU, one rank per core (``threads_per_rank`` 1), uncalibrated.

    Peak: the lab's 1-thread matmul probe (``distlab.measure.mfu.cpu_peak``, cached);
    memory: the machine's RAM. The rest are starting points that ``--calibrate`` fits
    (the same every time, so a calibration is reproducible): elementwise kernels at
    5 GB/s, loopback TCP at 50 us and 1 GB/s.
    """
    from distlab.measure.mfu import cpu_peak  # torch probe only when asked for a CPU plan

    peak = cpu_peak(1, "fp32").flops
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    loopback = Link(bandwidth=1e9, latency=50e-6)
    return Device(
        name="cpu",
        peak_flops={"fp32": peak, "bf16": peak},
        memory_bytes=float(memory),
        memory_bandwidth=5e9,
        elementwise_bandwidth=5e9,
        intra_node=loopback,
        inter_node=loopback,
        gpus_per_node=cores or os.cpu_count() or 1,
        matmul_efficiency=0.7,
        matmul_overhead_s=20e-6,
        overlaps_comm=False,
        cores=cores or os.cpu_count() or 1,
        source=f"{cpu_model()}: {PROBE_SIZE}^2 fp32 matmul probe per core",
    )


def device_from_file(path: Path) -> Device:
    """A device from a JSON file with ``Device``'s fields (``--gpu-spec``, calibrations)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DistlabError(f"--gpu-spec {path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise DistlabError(f"--gpu-spec {path}: not a JSON device ({exc})") from None
    if not isinstance(data, dict):
        raise DistlabError(f"--gpu-spec {path}: not a JSON object of device fields")
    known = {f.name for f in fields(Device)}
    unknown = sorted(set(data) - known)
    missing = sorted(
        f.name
        for f in fields(Device)
        if f.default is MISSING and f.default_factory is MISSING and f.name not in data
    )
    if unknown:
        raise DistlabError(f"--gpu-spec {path}: unknown fields {unknown} (known: {sorted(known)})")
    try:
        data["intra_node"] = Link(**data["intra_node"])
        data["inter_node"] = Link(**data["inter_node"])
        data["notes"] = tuple(data.get("notes", ()))
        return Device(**data)
    except (KeyError, TypeError) as exc:
        raise DistlabError(
            f"--gpu-spec {path}: missing or bad field ({exc}; missing: {missing})"
        ) from None


def device_spec(name: str, spec: Path | None = None, calibration: Path | None = None) -> Device:
    """The device called ``name`` ("cpu" or a key of ``GPUS``), or the one in ``spec``;
    a calibration file replaces its fitted constants."""
    if spec is not None:
        device = device_from_file(spec)
    elif name == "cpu":
        device = cpu_device()
    elif name in GPUS:
        device = GPUS[name]
    else:
        raise DistlabError(
            f"unknown GPU '{name}' (choose one of: cpu, {', '.join(GPUS)}, or --gpu-spec FILE)"
        )
    if calibration is not None:
        fitted = device_from_file(calibration)
        if fitted.name != device.name:
            raise DistlabError(
                f"--calibration {calibration} is for {fitted.name}, not {device.name} "
                f"(calibrate {device.name} or choose its device)"
            )
        # the fitted constants come from the file; this machine's own facts stay
        device = replace(
            fitted,
            memory_bytes=device.memory_bytes,
            gpus_per_node=device.gpus_per_node,
            overlaps_comm=device.overlaps_comm,
            cores=device.cores,
        )
    return device
