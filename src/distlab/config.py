"""The run configuration: a typed dataclass, loaded from YAML plus CLI overrides.

Every field with its docstring (the flags' help), then what a config implies (the
model shape, micro-batches, checkpoints). Reading one from YAML and flags is
``distlab.config_reading``; the values each field accepts are checked in
``distlab.config_checks``; the ``--inject-fault`` grammar lives in
``distlab.fault_spec``.

Precedence, lowest to highest: the defaults below, ``configs/*.yaml`` given
with ``--config``, then command-line flags. ``validate`` turns every impossible
value into a one-line ``DistlabError`` that names the field.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distlab.model import PRESETS, GPTConfig

AUTO = "auto"
"""``--micro-batch auto``: the largest micro-batch that fits (``distlab.launch.micro_batch``)."""


@dataclass
class Config:
    """Everything that defines a run. Every field can be set in YAML or on the CLI."""

    strategy: str = "single"
    """Name of the parallelism strategy (see ``python -m distlab.launch --list``)."""
    nproc: int = 1
    """Number of ranks (processes) to launch on this machine."""
    model: str = "small"
    """Model preset: tiny, small or gpt2, or the mixture-of-experts tiny-moe or small-moe
    (see ``distlab.model.PRESETS``); --layers, --hidden, --heads, --vocab reshape it."""
    layers: int | None = None
    """Transformer blocks, in place of the preset's (a model shape of your own: with
    --layers, --hidden, --heads or --vocab the model's context length is --seq-len)."""
    hidden: int | None = None
    """Model width (d_model), in place of the preset's; a multiple of --heads."""
    heads: int | None = None
    """Attention heads per block, in place of the preset's."""
    vocab: int | None = None
    """Vocabulary size, in place of the preset's 256 (at least 256: every tokenizer here starts
    from the 256 bytes); default: the tokenizer's."""
    data: str | None = None
    """What to train on: text files (a file, directory or glob; a document each), parquet,
    JSON lines, CSV or Arrow files, a save_to_disk directory, or a cached Hugging Face hub
    dataset name (a document per row); default: the bundled corpus."""
    data_column: str = "text"
    """The column of a dataset's rows that holds the text."""
    data_split: str = "train"
    """The split of a dataset with several (a hub dataset, a saved DatasetDict)."""
    tokenizer: str = "bytes"
    """bytes (token = UTF-8 byte), bpe:VOCAB (a byte-level BPE trained on the training
    documents, cached), or a tokenizer.json / Hugging Face tokenizer directory; the model's
    vocabulary follows it unless --vocab is given (and must hold it)."""
    steps: int = 100
    """Number of optimizer steps."""
    global_batch: int = 16
    """Sequences per optimizer step, summed over all data-parallel ranks."""
    micro_batch: int | str | None = None
    """Sequences per forward pass on one rank, or auto: the largest that fits the device's
    memory (found by short probe runs, then cached under the cache dir); default: auto on
    a GPU, the whole local batch on a CPU."""
    memory_budget: str | None = None
    """Bytes one rank may use, e.g. 20GiB or 512MB (--micro-batch auto keeps each rank's
    measured peak under it); default: 90% of the GPU's memory, or on a CPU the available
    RAM / nproc."""
    seq_len: int | None = None
    """Tokens per sequence; default: the model preset's context length."""
    optimizer: str = "adamw"
    """sgd (plain, no momentum) or adamw."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = 10
    """Linear warm-up steps before the cosine decay."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (ignored by sgd)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    seed: int = 0
    """Seeds the initial weights and the batch sequence."""
    precision: str = "fp32"
    """fp32, or bf16 mixed precision with fp32 master weights and optimizer state: FSDP2's
    MixedPrecisionPolicy under fsdp, hsdp and the fsdp compositions, DeepSpeed's bf16 mode
    under zero1/2/3, autocast elsewhere."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu or cuda."""
    launcher: str = "ray"
    """How ranks are started: ray (Ray Train workers, restarted on failure) or local
    (a spawned process per rank on this machine; for debugging and fast tests)."""
    ray_address: str | None = None
    """Ray cluster to join (host:port of its head); default: $RAY_ADDRESS, else a local
    Ray instance started for this run and shut down at its end."""
    timeout_s: float = 60.0
    """Collective timeout: a rank blocked this long in a collective fails the run
    (which turns a hung rank into a failure that --max-failures can recover from)."""
    max_failures: int = 0
    """Restart all ranks from the newest complete checkpoint after up to this many
    failures (a rank that dies, crashes or hangs); 0 fails the run at the first one."""
    elastic: int = 0
    """MIN_RANKS: after a lost node, continue at as many ranks as the surviving nodes hold
    (at least this many; ddp and fsdp on --launcher ray), resharded from the newest
    checkpoint with the same global batch, and grow back when nodes return; 0: restart
    only at --nproc ranks."""
    ft: str = "restart"
    """How the run recovers from a failed rank: restart (stop every rank, start them all again
    from the newest checkpoint) or live (strategy ddp with --launcher local: each rank is a
    torchft replica; when one dies the others keep stepping without it, and it is restarted
    alone and heals from a live peer's state; needs the ft extra: pip install 'distlab[ft]')."""
    rejoin_after: int = 0
    """--ft live only: restart a dead replica once replica 0 has recorded this many more steps
    without it (a stand-in for a replacement machine's start-up time; 0: at once)."""
    inject_fault: str | None = None
    """Testing: comma-separated faults, each fired once per run. RANK@STEP SIGKILLs that
    rank when STEP steps are done; RANK@STEP:raise makes it raise an exception there
    instead (a crash, retried like a kill). RANK@STEP:STAGE SIGKILLs it at a crash point
    of saving checkpoint step_STEP: save (its strategy state written, not its RNG file),
    save-mid-shard (its RNG file half written), and on rank 0 only save-before-rename
    (all written and fsync'ed, not renamed), save-after-rename (renamed, parent dir not
    fsync'ed) and save-rotation (committed, one old checkpoint moved to trash)."""
    resume: str | None = None
    """Run dir (its newest complete checkpoint) or checkpoint dir to continue from, in a
    new run dir; the source run's config is the base that flags override."""
    init_from: str | None = None
    """Directory of a Hugging Face GPT-2 of the --model shape (config.json and
    model.safetensors, e.g. written by distlab export) whose weights the run starts from in
    place of the seed's; a new run from step 0, unlike --resume (docs/hugging_face.md)."""
    threads_per_rank: int = 1
    """CPU threads per rank (intra-op); one keeps ranks from oversubscribing cores."""
    comm_stats: bool = True
    """Count every collective per step (CPU/gloo): a counting process group wraps gloo."""
    compile: bool = False
    """torch.compile each transformer block on its own (regional; inductor, cached under
    the distlab cache dir); step 0 pays the compilation, reported apart as compile_s."""
    ac: str = "none"
    """Activation checkpointing of each transformer block: none, full (keep only the block's
    input, recompute the block in backward) or selective (keep matmul and attention outputs,
    recompute norms, GELU and adds); less activation memory for more compute."""
    quiet: bool = False
    """Print nothing but errors (no progress, no summary table)."""
    log_every: int = 10
    """Print a progress line every this many steps (when not on a terminal)."""
    eval_every: int = 0
    """Compute the loss on held-out documents (val_loss, val_bpb) every this many steps and
    after the last; 0: never, and training uses the whole corpus (with it, the rest)."""
    eval_batches: int = 4
    """Validation batches (of --global-batch sequences each) per evaluation."""
    checkpoint_every: int = 0
    """Save a sharded checkpoint every this many steps; 0 saves only at the end."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    final_checkpoint: bool = True
    """Save a checkpoint after the last step (so the run can be resumed or extended);
    --no-final-checkpoint for throw-away runs (benchmarks, --micro-batch auto's probes)."""
    run_dir: str | None = None
    """Directory for config.yaml, metrics.jsonl, summary.json and checkpoints."""
    runs_root: str = "runs"
    """Parent directory of run dirs when run_dir is not given."""
    save_final_weights: bool = False
    """Write the full final weights to final_weights.pt (used by parity checks)."""
    pictures: bool = True
    """Draw the run's pictures when its ranks are done: memory_timeline.png (memory-tracked
    steps) and time_rank_gantt.png (time-tracked steps), about a second of plotting each on
    a CPU; --no-pictures for runs nobody looks at (parity checks, --micro-batch auto's
    probes): their figures stay in the run's files."""
    reshard_after_forward: bool = True
    """FSDP only: free gathered parameters after forward (ZeRO-3) or keep them (ZeRO-2)."""
    reshard_between_microbatches: bool = False
    """FSDP only, with several micro-batches per step: free the gathered parameters after
    each micro-batch and gather them again for the next (less memory during the step, one
    gather per micro-batch); default: keep them gathered until the step's last backward."""
    prefetch: int | None = None
    """FSDP only: how many blocks ahead FSDP2 gathers (``fully_shard.set_prefetch``): in
    forward each block issues the next N blocks' all-gathers before it computes, in backward
    the previous N. On a CPU the unshard is also made asynchronous, so a prefetched
    all-gather runs while the block computes (gloo's synchronous all-gather blocks the rank
    where it is issued). 0: no forward prefetch; backward keeps FSDP2's one block, which it
    has no switch for. Default: FSDP2's own (no explicit prefetch in forward, one block in
    backward; synchronous on a CPU). The memory theory holds block k and the N blocks before
    it (at least one) gathered in each block's backward; it has no forward moment, so the
    up to N + 1 blocks gathered in forward are not modelled."""
    offload: str = "none"
    """DeepSpeed ZeRO: none, optimizer (state on CPU) or params (ZeRO-3: also params);
    fsdp: none or params (FSDP2's CPU offload: params, grads and optimizer state on CPU)."""
    zero_reduce: str | None = None
    """ZeRO-2/3 only, with several micro-batches per step: reduce the gradients once per step
    (``once``: they accumulate unsharded on each rank until the step's last backward) or in
    every micro-batch's backward (``per-microbatch``: sharded gradients, A times the
    reduction bytes); default: once for zero2, per-microbatch for zero3."""
    bucket_mb: float | None = None
    """DDP only (ddp, cp, ddp+pp, fairscale-oss): the gradient bucket size in MiB
    (``bucket_cap_mb``); smaller buckets start their all-reduces earlier in backward, in more
    calls. Default: torch's 25 MiB, with a first bucket of 1 MiB (a value given here sizes
    every bucket, the first too)."""
    dp: int | None = None
    """Data-parallel degree of a composed strategy; default: nproc / (cp * tp * pp)."""
    dp_replicate: int | None = None
    """hsdp only: replica groups, each holding a full copy of the (sharded) model state;
    gradients are all-reduced across them. Default: nproc / dp_shard if --dp-shard is given,
    else 2 when nproc is even and >= 4, else 1."""
    dp_shard: int | None = None
    """hsdp only: ranks in each replica group, which shard parameters, gradients and
    optimizer state among themselves (FSDP/ZeRO-3); default: nproc / dp_replicate."""
    ep: int | None = None
    """ep only: expert-parallel degree, the ranks each MoE layer's experts are split over
    (each holds n_expert / ep of them); default: nproc."""
    tp: int = 1
    """Tensor-parallel degree (tp and compositions with tp)."""
    pp: int = 1
    """Pipeline-parallel degree, i.e. stages (pp and compositions with pp)."""
    cp: int = 1
    """Context-parallel degree (cp and compositions with cp): ranks that split every sequence
    into 2 cp chunks, rank r holding chunks r and 2 cp - 1 - r; default for strategy cp: all
    ranks."""
    cp_attention: str = "allgather"
    """How a context-parallel rank gets the other ranks' keys and values: ``allgather`` (one
    all-gather per layer, reduce-scatter in backward) or ``ring`` (cp - 1 send/recv steps
    around the ring, the gradients sent back the same way)."""
    schedule: str = "1f1b"
    """Pipeline schedule: gpipe, 1f1b, interleaved-1f1b, looped-bfs, interleaved-zb, zbv or
    dualpipev (``distlab.strategies.pipeline_schedules``)."""
    microbatches: int | None = None
    """Pipeline micro-batches per step on each pipeline; default: local batch / micro_batch
    with --micro-batch, else the largest divisor of the local batch that is at most 2 x pp
    (every micro-batch the same number of rows)."""
    sequence_parallel: bool = False
    """Tensor parallel only: shard the norm/dropout regions along the sequence too."""
    track_memory: str = "sample"
    """Which steps run inside torch's MemTracker, measuring memory by category: ``sample``
    (the last step, and in a process with over 10 steps after it the second one, the first
    steady one, so long runs and restarts show memory early), ``every`` step, or ``off``.
    Every op of a tracked step passes through it (1.37x the step time of the small model
    on a CPU: ``benchmarks/tracker_overhead.py``), so the run's throughput and MFU leave
    tracked steps out when untracked ones exist. Off under ``--compile``, which does not
    compile while a tracker is active."""
    track_time: str = "sample"
    """Which steps record where their time goes (``distlab.measure.timeline``): phase spans,
    every collective from issue to completion, and the rank thread's CPU clock, split into
    compute, exposed communication, bubble, data, optimizer and host. ``sample`` (the last
    step the memory tracker leaves alone, and in a process with over 10 steps after it the
    third one), ``every`` step, or ``off``. A few microseconds per collective and phase."""
    profile: bool = False
    """Also record torch.profiler traces of the time-tracked steps (``RUN_DIR/profile/
    rank<r>.json``) and derive the same time breakdown from them, independently of
    distlab's own timeline (``profiler_time_breakdown_by_rank`` in the summary)."""
    wandb: bool = True
    """Log to Weights & Biases (offline unless an API key is configured)."""
    wandb_project: str = "distlab"
    """W&B project name."""
    wandb_group: str | None = None
    """W&B group, so runs of one experiment sit together."""
    wandb_name: str | None = None
    """W&B run name; default: the run dir's name."""

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data (what ``config.yaml`` holds)."""
        return dataclasses.asdict(self)


def cache_dir() -> Path:
    """Where distlab caches corpora and measured peaks: $DISTLAB_CACHE, else ~/.cache/distlab."""
    return Path(os.environ.get("DISTLAB_CACHE") or Path.home() / ".cache" / "distlab")


SHAPE_FIELDS = {"layers": "n_layer", "hidden": "d_model", "heads": "n_head", "vocab": "vocab_size"}
"""Config fields that reshape the preset -> the ``GPTConfig`` field each replaces."""


def reshaped(config: Config) -> bool:
    """Whether the config gives a model shape of its own (--layers, --hidden, --heads, --vocab)."""
    return any(getattr(config, name) is not None for name in SHAPE_FIELDS)


def model_shape(config: Config) -> GPTConfig:
    """The transformer ``config`` trains: its preset, with the shape flags in place of the
    preset's values; a reshaped model's context length is ``--seq-len`` (else the preset's)."""
    preset = PRESETS[config.model]
    changes: dict[str, int] = {
        attribute: getattr(config, name)
        for name, attribute in SHAPE_FIELDS.items()
        if getattr(config, name) is not None
    }
    if changes and config.seq_len is not None:
        changes["block_size"] = config.seq_len
    return dataclasses.replace(preset, **changes) if changes else preset


def model_label(config: Config) -> str:
    """The model as a run names it: the preset, and the shape given in its place if any."""
    if not reshaped(config):
        return config.model
    shape = model_shape(config)
    return (
        f"{config.model} reshaped: {shape.n_layer} layers x {shape.d_model}, "
        f"{shape.n_head} heads, vocab {shape.vocab_size}, context {shape.block_size}"
    )


def resolved_seq_len(config: Config) -> int:
    """Sequence length: the configured one, else the model's context length."""
    return config.seq_len if config.seq_len is not None else model_shape(config).block_size


def fixed_micro_batch(config: Config) -> int | None:
    """The configured micro-batch size; None for the whole local batch or (not yet resolved) auto.

    ``distlab.launch`` resolves auto to a number before any rank starts.
    """
    return None if config.micro_batch == AUTO else config.micro_batch  # type: ignore[return-value]


def grad_accum_steps(config: Config, dp_size: int) -> int:
    """Micro-batches per optimizer step on one rank."""
    local = config.global_batch // dp_size
    micro = fixed_micro_batch(config) or local
    return local // micro


def checkpoint_steps(config: Config) -> list[int]:
    """The steps after which a checkpoint is saved (``step_N`` for N in the list)."""
    every = config.checkpoint_every
    steps = set(range(every, config.steps + 1, every)) if every > 0 else set()
    return sorted(steps | ({config.steps} if config.final_checkpoint else set()))
