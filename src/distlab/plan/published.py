"""Published figures that the planner's predictions are compared against.

Three papers. Each number below was checked against the paper's own text, and the
section, table or figure it comes from is named next to it:

* ZeRO: Rajbhandari, Rasley, Ruwase and He, "ZeRO: Memory Optimizations Toward
  Training Trillion Parameter Models", SC 2020, arXiv:1910.02054. The model-state
  memory per device of a 7.5B-parameter model on 64 data-parallel GPUs at each
  ZeRO-DP stage (Figure 1, Section 5, Table 1).
* Megatron-LM at scale: Narayanan, Shoeybi, Casper, LeGresley, Patwary,
  Korthikanti, Vainbrand, Kashinkunti, Bernauer, Catanzaro, Phanishayee and
  Zaharia, "Efficient Large-Scale Language Model Training on GPU Clusters Using
  Megatron-LM", SC 2021, arXiv:2104.04473. The weak-scaling runs of Table 1 (1.7B
  to 1008B parameters on 32 to 3072 A100 GPUs).
* Llama 3: Llama Team, AI @ Meta, "The Llama 3 Herd of Models", 2024,
  arXiv:2407.21783. The three 405B pre-training configurations of Table 4 and the
  model shape of Table 3.

How to read a row:

* A field holds the paper's figure wherever the paper states one.
* Where the paper states no value, the field's name is listed in the row's
  ``unstated`` and ``notes`` says where the value came from: the authors' published
  launch scripts, an inference from the paper's text (the reasoning is given), or
  an assumption of ours.
* A value worked out from printed columns by arithmetic (the data-parallel size
  from the GPU count, the global batch from Batch size/DP times DP) is not listed
  in ``unstated``; ``notes`` shows the arithmetic.
* ``printed`` holds the table row cell by cell, as printed, so the paper's figure
  is never mixed up with a value derived from it.
* The papers leave some hardware figures out (NVLink bandwidth, the H100 peak).
  Those come from NVIDIA's product specifications, and the comment next to each
  one says so.

Units: GB = 1e9 bytes (the ZeRO paper's own arithmetic: 16 bytes x 7.5e9 = 120 GB);
TFLOP/s = 1e12 FLOP/s; network links in Gbit/s per GPU; NVLink in GB/s per GPU,
with both directions added together as NVIDIA quotes it.

Each table row keeps its printed cells, its settings and its notes together, so
that it can be read against the paper line by line.
"""

from __future__ import annotations

from dataclasses import dataclass

# ---------------------------------------------------------------------------
# Citations
# ---------------------------------------------------------------------------

ZERO_2020 = (
    "Rajbhandari, Rasley, Ruwase, He. ZeRO: Memory Optimizations Toward Training "
    "Trillion Parameter Models. SC 2020. arXiv:1910.02054"
)
MEGATRON_2021 = (
    "Narayanan, Shoeybi, Casper, LeGresley, Patwary, Korthikanti, Vainbrand, "
    "Kashinkunti, Bernauer, Catanzaro, Phanishayee, Zaharia. Efficient Large-Scale "
    "Language Model Training on GPU Clusters Using Megatron-LM. SC 2021. arXiv:2104.04473"
)
MEGATRON_2021_SCRIPTS = (
    "NVIDIA/Megatron-LM, examples/sc21/run_table_1.sh and examples/sc21/CONFIG.sh "
    "(the authors' scripts for the paper's Table 1, added to the repository for SC21)"
)
LLAMA3_2024 = "Llama Team, AI @ Meta. The Llama 3 Herd of Models. 2024. arXiv:2407.21783"
NVIDIA_A100_SPEC = "NVIDIA A100 Tensor Core GPU datasheet and Ampere architecture whitepaper"
NVIDIA_H100_SPEC = "NVIDIA H100 Tensor Core GPU datasheet and Hopper architecture whitepaper"

# The FLOP conventions of ``PublishedRun.flops_convention``.
FLOPS_HARDWARE_WITH_RECOMPUTE = "hardware, with recompute (Megatron formula)"
FLOPS_MODEL = "model FLOPs (MFU)"


# ---------------------------------------------------------------------------
# Types
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ZeroMemoryExample:
    """The model-state bytes per device of one model at each of the four ZeRO-DP stages."""

    parameters: int
    gpus: int
    """Data-parallel degree N_d."""
    optimizer_bytes_per_param: int
    """K: bytes of optimizer state per parameter (mixed-precision Adam: 12)."""
    param_bytes: int
    grad_bytes: int
    gb_per_stage: tuple[float, float, float, float]
    """Baseline data parallelism, P_os, P_os+g, P_os+g+p: GB (1e9 bytes) per device."""
    source: str
    notes: str = ""


@dataclass(frozen=True)
class PublishedShape:
    """A transformer's shape, as a planner needs it."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn_hidden: int
    vocab: int
    seq_len: int
    swiglu: bool
    """True: gated MLP with three ffn_hidden x hidden matrices; False: GeLU, two."""


@dataclass(frozen=True)
class PublishedHardware:
    """A GPU and the network around it, as a paper's cluster had them."""

    key: str
    """The ``PublishedRun.gpu`` key."""
    name: str
    peak_tflops_16bit: float
    """Dense fp16/bf16 tensor-core peak: the denominator of the papers' percentages."""
    memory_gb: float
    gpus_per_node: int
    nvlink_gb_s: float
    """NVLink bandwidth per GPU, both directions added together (NVIDIA's figure)."""
    inter_node_gbit_s_per_gpu: float
    """Inter-node bandwidth per GPU (one NIC per GPU on both clusters)."""
    inter_node_network: str
    sources: str


@dataclass(frozen=True)
class PublishedRun:
    """One published training configuration and the throughput it reached."""

    name: str
    source: str
    """Paper and table."""
    shape: PublishedShape
    parameters_billion: float | None
    """As printed by the paper, or None where the table does not print it."""
    gpus: int
    gpus_per_node: int
    gpu: str
    """A ``PublishedHardware.key``: "a100-80gb" or "h100-sxm"."""
    tp: int
    pp: int
    cp: int
    dp: int
    global_batch: int
    """Sequences per optimizer step."""
    micro_batch: int
    """Sequences per micro-batch."""
    schedule: str
    """"1f1b" or "interleaved-1f1b" (the names ``Config.schedule`` uses)."""
    virtual_stages: int
    """Model chunks per pipeline rank (v); 1 without interleaving."""
    recompute: str
    """Activation recomputation: "full", "selective" or "none"."""
    zero: int
    """Data-parallel sharding as a ZeRO stage: 0 plain data parallelism, 1 optimizer
    states, 2 plus gradients, 3 plus parameters."""
    flops_convention: str
    """What the throughput counts: FLOPS_HARDWARE_WITH_RECOMPUTE or FLOPS_MODEL."""
    achieved_tflops_per_gpu: float
    percent_of_peak: float
    """The paper's utilisation column in percent, under ``flops_convention``."""
    mfu: float | None
    """Model FLOPs utilisation as a fraction, where the paper prints one; else None."""
    aggregate_pflops: float | None
    printed: tuple[str, ...]
    """The table row as printed, one cell per column (the table's column constant)."""
    unstated: tuple[str, ...]
    """Fields whose value the paper does not state (``notes`` says where it came from)."""
    notes: str


# ---------------------------------------------------------------------------
# ZeRO (Rajbhandari et al. 2020)
# ---------------------------------------------------------------------------

ZERO_PAPER = ZeroMemoryExample(
    # Figure 1 caption: "we assume a model size of Psi = 7.5B and DP of N_d = 64
    # with K = 12 based on mixed-precision training with Adam optimizer".
    parameters=7_500_000_000,
    gpus=64,
    # Section 3.1: "an fp16 copy of the parameters and the gradients, with memory
    # requirements of 2 Psi and 2 Psi bytes respectively ... an fp32 copy of the
    # parameters, momentum and variance ... 4 Psi, 4 Psi, and 4 Psi bytes ...
    # Mixed-precision Adam has K=12."
    optimizer_bytes_per_param=12,
    param_bytes=2,
    grad_bytes=2,
    # Sections 5.1-5.3: "a 7.5 B parameter model requires 31.4GB of memory using
    # P_os with 64-way DP (N_d=64), while requiring 120 GB with standard DP";
    # "only 16.6 GB of memory using P_os+g"; "1.9 GB of model-state memory using
    # P_os+p+g". Figure 1 shows the same four numbers.
    gb_per_stage=(120.0, 31.4, 16.6, 1.9),
    source=f"{ZERO_2020}, Figure 1 and Sections 5.1-5.3 (also Table 1, N_d = 64 row)",
    notes=(
        "Table 1 prints the same N_d = 64 row for the 7.5B model as 31.4 / 16.6 / 1.88 GB "
        "(P_os / P_os+g / P_os+g+p) and 120 GB in its N_d = 1 row; the text rounds the "
        "last to 1.9 GB. Formulas (Figure 1): (2 + 2 + K) Psi; 2 Psi + 2 Psi + K Psi / N_d; "
        "2 Psi + (2 + K) Psi / N_d; (2 + 2 + K) Psi / N_d. These give 120, 31.41, 16.64 and "
        "1.875 GB with GB = 1e9 bytes. Model states only: no activations, buffers or "
        "fragmentation (Section 3.2 counts those separately)."
    ),
)


# ---------------------------------------------------------------------------
# Hardware
# ---------------------------------------------------------------------------

A100_SELENE = PublishedHardware(
    key="a100-80gb",
    name="NVIDIA A100 80GB SXM4 in DGX A100 nodes (Selene)",
    # Megatron 2021, Section 5: "The peak device throughput of an A100 GPU with
    # 16-bit precision is 312 teraFLOP/s."
    peak_tflops_16bit=312.0,
    # Megatron 2021, Section 5: "Each cluster node has 8 NVIDIA 80-GB A100 GPUs".
    memory_gb=80.0,
    gpus_per_node=8,
    # Not in the paper (Section 5 says only "connected to each other by NVLink and
    # NVSwitch"): 600 GB/s per GPU (300 GB/s each way), NVIDIA's A100 SXM figure.
    nvlink_gb_s=600.0,
    # Megatron 2021, Section 5: "Each node has eight NVIDIA Mellanox 200Gbps HDR
    # Infiniband HCAs for application communication, with an additional two HCAs
    # per node for dedicated storage."
    inter_node_gbit_s_per_gpu=200.0,
    inter_node_network=(
        "8 x 200 Gbit/s HDR InfiniBand HCAs per node (one per GPU), three-level fat tree "
        "(leaf, spine, core) with 850 switches"
    ),
    sources=(
        f"{MEGATRON_2021}, Section 5 (peak, node, InfiniBand); {NVIDIA_A100_SPEC} (NVLink "
        "600 GB/s; read here as quoted by secondary spec pages, not from the PDF itself)"
    ),
)

H100_META = PublishedHardware(
    key="h100-sxm",
    name="NVIDIA H100 80GB HBM3, 700 W (SXM), Grand Teton servers, Meta RoCE cluster",
    # Not in the Llama 3 paper, which prints MFU but not the peak it divides by:
    # NVIDIA's dense BF16 tensor-core peak of the H100 SXM (1,979 TFLOP/s "with
    # sparsity" in the datasheet; 989.4 dense in the whitepaper's table). The
    # paper's rows agree with it to rounding: 430/989.4 = 43.5% (printed 43%),
    # 380/989.4 = 38.4% (38%); 400/989.4 = 40.4% against the printed 41%, so the
    # TFLOPs/GPU column is rounded more coarsely than the MFU column.
    peak_tflops_16bit=989.4,
    # Llama 3, Section 3.3.1: "up to 16K H100 GPUs, each running at 700W TDP with
    # 80GB HBM3 ... Each server is equipped with eight GPUs and two CPUs. Within a
    # server, the eight GPUs are connected via NVLink."
    memory_gb=80.0,
    gpus_per_node=8,
    # Not in the paper: 900 GB/s per GPU (NVLink 4, 450 GB/s each way), NVIDIA's
    # H100 SXM figure.
    nvlink_gb_s=900.0,
    # Llama 3, Section 3.3.1: "Both RoCE and Infiniband clusters leverage 400 Gbps
    # interconnects between GPUs."
    inter_node_gbit_s_per_gpu=400.0,
    inter_node_network=(
        "RoCE (Arista 7800 and Minipack2 switches), three-layer Clos: 16 GPUs per rack "
        "under one top-of-rack switch, 192 racks per pod of 3,072 GPUs at full bisection "
        "bandwidth, 8 pods (24K GPUs) joined by aggregation switches oversubscribed 1:7"
    ),
    sources=(
        f"{LLAMA3_2024}, Section 3.3.1 (GPU, server, network); {NVIDIA_H100_SPEC} (BF16 "
        "peak and NVLink 900 GB/s; read here as quoted by secondary spec pages, not from "
        "the PDF itself)"
    ),
)

PUBLISHED_HARDWARE: tuple[PublishedHardware, ...] = (A100_SELENE, H100_META)


# ---------------------------------------------------------------------------
# Megatron-LM (Narayanan et al. 2021), Table 1: weak scaling, 1.7B to 1008B
# ---------------------------------------------------------------------------

# Section 5.1: "All models use a vocabulary size (denoted by V) of 51,200 (multiple
# of 1024) and a sequence length (s) of 2048."
MEGATRON_SEQ_LEN = 2048
MEGATRON_VOCAB = 51_200
# Section 5: "All of our results are run with mixed precision on the Selene
# supercomputer". The paper says 16-bit without naming the format; fp16 (with a
# loss scale of 8192) is from the authors' CONFIG.sh, which passes --fp16.
MEGATRON_PRECISION = "mixed precision, fp16 (fp16 from the authors' scripts)"
MEGATRON_GPU = A100_SELENE.key
MEGATRON_GPUS_PER_NODE = 8
# Section 5.1: "we use the interleaved pipeline schedule with the scatter/gather
# optimization enabled". The authors' run_table_1.sh sets the number of model
# chunks per run (see each row); for 39.1B and 1008B it sets none, i.e. the
# non-interleaved 1F1B schedule.
MEGATRON_SCHEDULE_STATED = "interleaved 1F1B with the scatter/gather optimization (Section 5.1)"
# Appendix: "we are using activation recomputation, which requires an additional
# forward pass before the backward pass"; Section 5.1: "equation (3) assumes
# activation recomputation and takes into account the floating-point operations
# associated with the extra forward pass". The scripts pass
# --activations-checkpoint-method uniform (later renamed --recompute-method).
MEGATRON_RECOMPUTE = "full"
# Equation (3), Section 5.1 and Appendix: FLOPs per iteration counted for the
# TFLOP/s columns, "considering just these GEMMs". B global batch, s sequence
# length, l layers, h hidden size, V vocabulary. Per layer 4 x (24 B s h^2 +
# 4 B s^2 h) (forward, recomputed forward, backward at twice the forward), plus
# 6 B s h V for the logit layer (not recomputed). Model FLOPs without the
# recomputed forward are 3/4 of the layer term, so these figures are above an MFU.
MEGATRON_FLOPS_FORMULA = "F = 96 B s l h^2 (1 + s/(6h) + V/(16 l h))"
# Equation (2): the parameter count of the Number-of-parameters column.
MEGATRON_PARAMS_FORMULA = "P = 12 l h^2 (1 + 13/(12h) + (V + s)/(12 l h))"
MEGATRON_TABLE1_COLUMNS: tuple[str, ...] = (
    "Number of parameters (billion)",
    "Attention heads",
    "Hidden size",
    "Number of layers",
    "Tensor model-parallel size",
    "Pipeline model-parallel size",
    "Number of GPUs",
    "Batch size",
    "Achieved teraFLOP/s per GPU",
    "Percentage of theoretical peak FLOP/s",
    "Achieved aggregate petaFLOP/s",
)

_MEGATRON_SOURCE = f"{MEGATRON_2021}, Table 1"
_MEGATRON_COMMON = (
    "GPT with GeLU MLP of 4h (Section 2.3, Appendix) and multi-head attention "
    "(kv_heads = heads). zero = 0: plain data parallelism, each worker holding a full "
    "copy of its model shard (Section 2.1); the scripts use DDP 'torch' (PP = 1) or "
    "'local' (PP > 1), without optimizer sharding. recompute = full (Appendix). "
    f"micro_batch: not in the paper; the value is from {MEGATRON_2021_SCRIPTS}."
)
_MEGATRON_NO_PIPELINE = (
    " PP = 1: no pipeline; the schedule field is moot (micro-batches are gradient "
    "accumulation), and virtual_stages = 1."
)


def _megatron(
    printed: tuple[str, ...],
    micro_batch: int,
    notes: str,
    schedule: str = "1f1b",
    virtual_stages: int = 1,
    unstated: tuple[str, ...] = ("micro_batch",),
) -> PublishedRun:
    """One row of Table 1 from its printed cells (``MEGATRON_TABLE1_COLUMNS``), the
    settings the authors' scripts give, and what the row's notes add."""
    params, heads, hidden, layers, tp, pp, gpus, batch, tflops, percent, pflops = printed
    tp_, pp_, gpus_ = int(tp), int(pp), int(gpus)
    common = _MEGATRON_COMMON + (_MEGATRON_NO_PIPELINE if pp_ == 1 else "")
    return PublishedRun(
        name=f"{float(params):g}B",
        source=_MEGATRON_SOURCE,
        shape=PublishedShape(
            layers=int(layers),
            hidden=int(hidden),
            heads=int(heads),
            kv_heads=int(heads),
            ffn_hidden=4 * int(hidden),
            vocab=MEGATRON_VOCAB,
            seq_len=MEGATRON_SEQ_LEN,
            swiglu=False,
        ),
        parameters_billion=float(params),
        gpus=gpus_,
        gpus_per_node=MEGATRON_GPUS_PER_NODE,
        gpu=MEGATRON_GPU,
        tp=tp_,
        pp=pp_,
        cp=1,
        dp=gpus_ // (tp_ * pp_),
        global_batch=int(batch),
        micro_batch=micro_batch,
        schedule=schedule,
        virtual_stages=virtual_stages,
        recompute=MEGATRON_RECOMPUTE,
        zero=0,
        flops_convention=FLOPS_HARDWARE_WITH_RECOMPUTE,
        achieved_tflops_per_gpu=float(tflops),
        percent_of_peak=float(percent.rstrip("%")),
        mfu=None,
        aggregate_pflops=float(pflops),
        printed=printed,
        unstated=unstated,
        notes=common + notes,
    )


MEGATRON_WEAK_SCALING: tuple[PublishedRun, ...] = (
    _megatron(
        ("1.7", "24", "2304", "24", "1", "1", "32", "512", "137", "44%", "4.4"),
        micro_batch=16,
        notes=" dp = 32 / (1 x 1) = 32; micro-batches per step = 512 / (16 x 32) = 1.",
    ),
    _megatron(
        ("3.6", "32", "3072", "30", "2", "1", "64", "512", "138", "44%", "8.8"),
        micro_batch=16,
        notes=" dp = 64 / (2 x 1) = 32; micro-batches per step = 512 / (16 x 32) = 1.",
    ),
    _megatron(
        ("7.5", "32", "4096", "36", "4", "1", "128", "512", "142", "46%", "18.2"),
        micro_batch=16,
        notes=" dp = 128 / (4 x 1) = 32; micro-batches per step = 512 / (16 x 32) = 1.",
    ),
    _megatron(
        ("18.4", "48", "6144", "40", "8", "1", "256", "1024", "135", "43%", "34.6"),
        micro_batch=8,
        notes=" dp = 256 / (8 x 1) = 32; micro-batches per step = 1024 / (8 x 32) = 4.",
    ),
    _megatron(
        ("39.1", "64", "8192", "48", "8", "2", "512", "1536", "138", "44%", "70.8"),
        micro_batch=4,
        unstated=("micro_batch", "schedule", "virtual_stages"),
        notes=(
            " schedule and virtual_stages: the paper says Table 1 uses the interleaved schedule "
            "(Section 5.1), but the authors' run_table_1.sh sets no --num-layers-per-virtual-"
            "pipeline-stage for this size, i.e. non-interleaved 1F1B (v = 1); the script's value is"
            " used here, and the two sources disagree. dp = 512 / (8 x 2) = 32; micro-batches per "
            "pipeline per step = 1536 / (4 x 32) = 12."
        ),
    ),
    _megatron(
        ("76.1", "80", "10240", "60", "8", "4", "1024", "1792", "140", "45%", "143.8"),
        micro_batch=2,
        schedule="interleaved-1f1b",
        virtual_stages=3,
        unstated=("micro_batch", "virtual_stages"),
        notes=(
            " virtual_stages: not in the paper; run_table_1.sh passes --num-layers-per-virtual-"
            "pipeline-stage 5, and 60 layers / 4 stages / 5 = 3 chunks per rank. dp = 1024 / (8 x "
            "4) = 32; micro-batches per pipeline per step = 1792 / (2 x 32) = 28."
        ),
    ),
    _megatron(
        ("145.6", "96", "12288", "80", "8", "8", "1536", "2304", "148", "47%", "227.1"),
        micro_batch=2,
        schedule="interleaved-1f1b",
        virtual_stages=2,
        unstated=("micro_batch", "virtual_stages"),
        notes=(
            " virtual_stages: not in the paper; run_table_1.sh passes --num-layers-per-virtual-"
            "pipeline-stage 5, and 80 layers / 8 stages / 5 = 2 chunks per rank. dp = 1536 / (8 x "
            "8) = 24; micro-batches per pipeline per step = 2304 / (2 x 24) = 48."
        ),
    ),
    _megatron(
        ("310.1", "128", "16384", "96", "8", "16", "1920", "2160", "155", "50%", "297.4"),
        micro_batch=1,
        schedule="interleaved-1f1b",
        virtual_stages=2,
        unstated=("micro_batch", "virtual_stages"),
        notes=(
            " virtual_stages: not in the paper; run_table_1.sh passes --num-layers-per-virtual-"
            "pipeline-stage 3, and 96 layers / 16 stages / 3 = 2 chunks per rank. dp = 1920 / (8 x "
            "16) = 15; micro-batches per pipeline per step = 2160 / (1 x 15) = 144."
        ),
    ),
    _megatron(
        ("529.6", "128", "20480", "105", "8", "35", "2520", "2520", "163", "52%", "410.2"),
        micro_batch=1,
        schedule="interleaved-1f1b",
        virtual_stages=3,
        unstated=("micro_batch", "virtual_stages"),
        notes=(
            " virtual_stages: not in the paper; run_table_1.sh passes --num-layers-per-virtual-"
            "pipeline-stage 1, and 105 layers / 35 stages / 1 = 3 chunks per rank. dp = 2520 / (8 x"
            " 35) = 9; micro-batches per pipeline per step = 2520 / (1 x 9) = 280."
        ),
    ),
    _megatron(
        ("1008.0", "160", "25600", "128", "8", "64", "3072", "3072", "163", "52%", "502.0"),
        micro_batch=1,
        unstated=("micro_batch", "schedule", "virtual_stages"),
        notes=(
            " schedule and virtual_stages: the paper says Table 1 uses the interleaved schedule "
            "(Section 5.1), but the authors' run_table_1.sh sets no --num-layers-per-virtual-"
            "pipeline-stage for this size, i.e. non-interleaved 1F1B (v = 1); the script's value is"
            " used here, and the two sources disagree. dp = 3072 / (8 x 64) = 6; micro-batches per "
            "pipeline per step = 3072 / (1 x 6) = 512. Section 5.9: effective bisection bandwidth "
            "892 GB/s for pipeline point-to-point and 12.9 TB/s for data-parallel all-reduce on "
            "this run."
        ),
    ),
)


# ---------------------------------------------------------------------------
# Llama 3 (Llama Team 2024): 405B shape (Table 3), pre-training runs (Table 4)
# ---------------------------------------------------------------------------

# Table 3 (405B column) and Section 3.2: "126 layers, a token representation
# dimension of 16,384, and 128 attention heads"; FFN 53,248; 8 key/value heads
# (GQA); SwiGLU; vocabulary 128,000 as printed ("128K tokens ... 100K tokens from
# the tiktoken tokenizer with 28K additional tokens"); RoPE with theta = 500,000.
LLAMA3_405B_LAYERS = 126
LLAMA3_405B_ROPE_THETA = 500_000
LLAMA3_405B_SHAPE_8K = PublishedShape(
    layers=LLAMA3_405B_LAYERS,
    hidden=16_384,
    heads=128,
    kv_heads=8,
    ffn_hidden=53_248,
    vocab=128_000,
    seq_len=8_192,
    swiglu=True,
)
LLAMA3_405B_SHAPE_128K = PublishedShape(
    layers=LLAMA3_405B_LAYERS,
    hidden=16_384,
    heads=128,
    kv_heads=8,
    ffn_hidden=53_248,
    vocab=128_000,
    seq_len=131_072,
    swiglu=True,
)
LLAMA3_GPU = H100_META.key
LLAMA3_GPUS_PER_NODE = 8
# Section 3.3.2: "we achieve an overall BF16 Model FLOPs Utilization (MFU;
# Chowdhery et al. 2023) of 38-43%". The paper does not say which FLOP count it
# uses (for example how attention under the document mask is counted); the
# Chowdhery et al. (PaLM) definition counts the model's matmul FLOPs, attention
# included, and no recomputation.
LLAMA3_PRECISION = "BF16 (Section 3.3.2: 'BF16 Model FLOPs Utilization')"
# Section 3.3.2: "We use fully sharded data parallelism (FSDP ...), which shards the
# model, optimizer, and gradients ... Our use of FSDP for Llama 3 shards optimizer
# states and gradients, but for model shards we do not reshard after forward
# computation to avoid an extra all-gather communication during backward passes."
# FP32 gradient accumulation and FP32 reduce-scatter across DP ("Numerical stability").
LLAMA3_DATA_PARALLEL = (
    "FSDP sharding optimizer states and gradients; parameters sharded between steps but "
    "not resharded after the forward pass (PyTorch FSDP SHARD_GRAD_OP behaviour)"
)
# Section 3.3.2, "Pipeline parallelism improvements": an interleaved schedule
# (Narayanan et al. 2021) with V pipeline stages on one rank, bubble ratio
# (PP - 1) / (V * M), and N, the number of consecutive micro-batches for the same
# stage's forward or backward, made tunable between depth-first (N = PP) and
# breadth-first (N = M). One Transformer layer is taken from each of the first and
# last stages. Asynchronous point-to-point communication. V, M and N for the 405B
# runs are not stated.
LLAMA3_SCHEDULE_STATED = (
    "interleaved, V stages per rank, tunable N consecutive micro-batches (Section 3.3.2)"
)
# Section 3.3.2: "With these optimizations, we could pre-train Llama 3 on sequences
# of 8K tokens without activation checkpointing." Nothing is said of the 128K stage.
LLAMA3_RECOMPUTE_8K = "none"
# Section 3.3.2: the order of the parallelism dimensions, innermost first.
LLAMA3_PARALLEL_ORDER = ("tp", "cp", "pp", "dp")
LLAMA3_TABLE4_COLUMNS: tuple[str, ...] = (
    "GPUs",
    "TP",
    "CP",
    "PP",
    "DP",
    "Seq. Len.",
    "Batch size/DP",
    "Tokens/Batch",
    "TFLOPs/GPU",
    "BF16 MFU",
)

_LLAMA3_SOURCE = f"{LLAMA3_2024}, Table 4 (Section 3.3.2)"
_LLAMA3_COMMON = (
    "zero = 2 is our reading, not the paper's words: its FSDP shards optimizer states and "
    "gradients and does not reshard parameters after the forward pass, so full (TP/PP-"
    "sharded) parameters stay resident from forward to backward, as under ZeRO-2 (PyTorch "
    "FSDP SHARD_GRAD_OP). schedule interleaved-1f1b: the paper's interleaved schedule with "
    "a tunable N; N is not stated (N = PP is Megatron's interleaved 1F1B). "
    "micro_batch = 1 is an assumption: the paper states no micro-batch size. "
    "virtual_stages = 8 is inferred: removing one Transformer layer from each of the first "
    "and last stages leaves 'the first model chunk on the first stage [with] only the "
    "embedding', so a chunk holds one layer in the balanced layout, and (126 + 2) layers / "
    "16 pipeline ranks = 8 chunks per rank. MFU is BF16 model FLOPs over the H100 peak; the "
    "peak is not printed (989.4 TFLOP/s assumed, see H100_META)."
)
_LLAMA3_8K = (
    " recompute = none is stated for 8K sequences (Section 3.3.2: 'without activation "
    "checkpointing')."
)

LLAMA3_405B: tuple[PublishedRun, ...] = (
    PublishedRun(
        name="405B 8K on 8,192 GPUs",
        source=_LLAMA3_SOURCE,
        shape=LLAMA3_405B_SHAPE_8K,
        parameters_billion=None,
        gpus=8_192,
        gpus_per_node=LLAMA3_GPUS_PER_NODE,
        gpu=LLAMA3_GPU,
        tp=8,
        pp=16,
        cp=1,
        dp=64,
        global_batch=2_048,
        micro_batch=1,
        schedule="interleaved-1f1b",
        virtual_stages=8,
        recompute=LLAMA3_RECOMPUTE_8K,
        zero=2,
        flops_convention=FLOPS_MODEL,
        achieved_tflops_per_gpu=430.0,
        percent_of_peak=43.0,
        mfu=0.43,
        aggregate_pflops=None,
        printed=("8,192", "8", "1", "16", "64", "8,192", "32", "16M", "430", "43%"),
        unstated=("micro_batch", "virtual_stages", "zero"),
        notes=_LLAMA3_COMMON
        + _LLAMA3_8K
        + " global_batch = DP x Batch size/DP = 64 x 32 = 2,048 sequences of 8,192 tokens = "
        "16,777,216 tokens (printed '16M'). The 405B model is the paper's ('405B "
        "parameters'); Table 4 prints no parameter count.",
    ),
    PublishedRun(
        name="405B 8K on 16,384 GPUs",
        source=_LLAMA3_SOURCE,
        shape=LLAMA3_405B_SHAPE_8K,
        parameters_billion=None,
        gpus=16_384,
        gpus_per_node=LLAMA3_GPUS_PER_NODE,
        gpu=LLAMA3_GPU,
        tp=8,
        pp=16,
        cp=1,
        dp=128,
        global_batch=2_048,
        micro_batch=1,
        schedule="interleaved-1f1b",
        virtual_stages=8,
        recompute=LLAMA3_RECOMPUTE_8K,
        zero=2,
        flops_convention=FLOPS_MODEL,
        achieved_tflops_per_gpu=400.0,
        percent_of_peak=41.0,
        mfu=0.41,
        aggregate_pflops=None,
        printed=("16,384", "8", "1", "16", "128", "8,192", "16", "16M", "400", "41%"),
        unstated=("micro_batch", "virtual_stages", "zero"),
        notes=_LLAMA3_COMMON
        + _LLAMA3_8K
        + " global_batch = 128 x 16 = 2,048 sequences of 8,192 tokens = 16,777,216 tokens "
        "(printed '16M'). Section 3.3.2 puts the drop from 43% to 41% down to 'the lower "
        "batch size per DP group needed to keep the global tokens per batch constant'.",
    ),
    PublishedRun(
        name="405B 128K on 16,384 GPUs",
        source=_LLAMA3_SOURCE,
        shape=LLAMA3_405B_SHAPE_128K,
        parameters_billion=None,
        gpus=16_384,
        gpus_per_node=LLAMA3_GPUS_PER_NODE,
        gpu=LLAMA3_GPU,
        tp=8,
        pp=16,
        cp=16,
        # The arXiv HTML of the July 2024 text prints DP = 4 in this row. Transcriptions
        # of the PDF (two of them naming v3, 23 November 2024) print 8; v3 itself was
        # not read here. 8 is the value that multiplies out: 8 x 16 x 16 x 8 =
        # 16,384 GPUs, and 8 x 16 x 131,072 = 16,777,216 tokens ('16M').
        dp=8,
        global_batch=128,
        micro_batch=1,
        schedule="interleaved-1f1b",
        virtual_stages=8,
        recompute="none",
        zero=2,
        flops_convention=FLOPS_MODEL,
        achieved_tflops_per_gpu=380.0,
        percent_of_peak=38.0,
        mfu=0.38,
        aggregate_pflops=None,
        printed=("16,384", "8", "16", "16", "8", "131,072", "16", "16M", "380", "38%"),
        unstated=("micro_batch", "virtual_stages", "zero", "recompute"),
        notes=_LLAMA3_COMMON
        + " recompute = none is an assumption: the paper states it only for 8K sequences. "
        "(With CP = 16, each rank holds 131,072 / 16 = 8,192 tokens of a sequence, as in the "
        "8K rows.) CP splits each sequence into 2 x CP = 32 chunks, two per CP rank (the i-th "
        "and the (2 x CP - 1 - i)-th), and all-gathers K and V (Section 3.3.2). DP: arXiv v1 "
        "prints 4, the later version 8, and 8 is consistent with the GPU count and the "
        "tokens per batch. global_batch = 8 x 16 = 128 sequences of 131,072 tokens = "
        "16,777,216 tokens (printed '16M').",
    ),
)

PUBLISHED_RUNS: tuple[PublishedRun, ...] = MEGATRON_WEAK_SCALING + LLAMA3_405B
