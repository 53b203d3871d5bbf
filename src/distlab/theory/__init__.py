"""Theory next to every measurement: model-state bytes, communication per step, pipeline bubble.

Everything here is a prediction for rank 0 (first pipeline stage, first
tensor-parallel shard, first data-parallel replica) computed from the config
alone, so ``python -m distlab.compare`` can put it beside what a run measured.
One place per quantity:

- model-state bytes (parameters, gradients, optimizer state between steps): each
  strategy's own ``Strategy.predicted_state_bytes``, in ``distlab.strategies``. They
  stay beside the code that lays the state out because they depend on more than
  the degrees and the flavour: DeepSpeed's buffers and fp32 master slice
  (``strategies.deepspeed_memory``), the whole tensors OSS assigns to each rank
  (``fairscale_oss.oss_partition`` replays its greedy assignment), FSDP's dim-0
  shards of the tensor-parallel pieces (``state_bytes.rank0_state_bytes``); a
  change to how a strategy holds its state then changes its prediction in the same
  file;
- communication per step: ``theory.comm``, the data-parallel flavour's collectives
  through a table of one function per flavour (``theory.comm_data_parallel``) plus
  tensor, context and pipeline parallelism's (``theory.comm_model_parallel``);
- peak memory of a step by category, activations included: ``theory.memory``
  (with ``theory.activations`` and ``theory.parameter_bytes``), which starts from the
  strategy's model-state bytes;
- the pipeline bubble: below.

Communication and peak memory read one ``RankLayout`` (``theory.rank_layout``): the
strategy's degrees and its data-parallel flavour (``strategies.data_parallel``), whose
facts (what it splits over the replicas, what runs it) choose the formulas: the
theory branches on the flavour, never on a strategy's name.
"""

from __future__ import annotations

from typing import Any

from distlab.config import Config, model_shape
from distlab.model import count_parameters
from distlab.strategies import registry
from distlab.strategies.pipeline_schedules import bubble_fraction
from distlab.theory.collectives import ExpertRouting
from distlab.theory.comm import predict_comm
from distlab.theory.memory import predict_peak
from distlab.theory.rank_layout import microbatches, rank_layout


def pipeline_bubble(config: Config) -> float | None:
    """Idle fraction of a step under ``config``'s schedule; None without pipelining.

    p pipeline ranks, m microbatches: (p - 1) / (m + p - 1) for GPipe and 1F1B,
    less for the interleaved and zero-bubble schedules
    (``strategies.pipeline_schedules``: the formulas and their assumptions).
    """
    layout = rank_layout(config)
    if layout is None or layout.pp <= 1:
        return None
    return bubble_fraction(config.schedule, layout.pp, microbatches(config, layout))


def predict(config: Config, routing: ExpertRouting | None = None) -> dict[str, Any]:
    """Every prediction for ``config``'s rank 0, as plain data (summary.json).

    ``routing``: an ``ep`` run's routing counts of the step whose communication is
    compared (its all-to-all volume depends on them).
    """
    n_params = count_parameters(model_shape(config))
    strategy = registry.get(config.strategy)
    comm = predict_comm(config, routing)
    return {
        "model_state_bytes_per_rank": strategy.predicted_state_bytes(config, n_params).to_dict(),
        "comm_per_step": comm.to_dict() if comm is not None else None,
        "pipeline_bubble": pipeline_bubble(config),
        "memory_peak": predict_peak(config).to_dict() if rank_layout(config) is not None else None,
    }
