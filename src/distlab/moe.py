"""The mixture-of-experts feed-forward layer of the MoE presets (``tiny-moe``, ``small-moe``).

Each block's MLP becomes a router and E expert MLPs (d -> 4d -> GELU -> d)::

    x (N tokens, d) -> router (d -> E) -> softmax -> top-k experts per token
                    -> rows sorted by expert -> expert e runs its rows
                    -> rows put back -> sum of the k outputs weighted by the
                       renormalised top-k probabilities

- Dropless: every token goes to all of its k experts, whatever the load (no
  capacity factor, so no token is ever dropped: ``dropped_tokens`` is 0 by
  construction and reported as such).
- Deterministic: the top-k is a stable descending sort, so ties between equal
  probabilities go to the lower expert index, on every rank alike.
- The experts' weights are stacked 3-D parameters (``Experts``: E x d x 4d and
  E x 4d x d, plus biases), so expert parallelism shards them along dim 0
  (``distlab.strategies.expert_parallel``) and FSDP along the same dim.
- Where the sorted rows are computed is the layer's ``dispatch``: by default
  the local ``Experts`` (every expert on this rank); expert parallelism
  replaces it with an all-to-all to the ranks that hold each expert.

Auxiliary load-balancing loss (Switch Transformer / GShard form), computed per
sequence and averaged over the sequences (DeepSeek-V3's sequence-wise balance
loss): for a sequence of T tokens, f_i = (tokens of the sequence routed to
expert i) / (k T) and P_i = mean over its T tokens of the router probability of
expert i; the sequence's loss is E * sum_i f_i P_i (1 when perfectly balanced).
Averaging it over the sequences, not computing it over the whole batch, makes
it a mean of per-sequence terms exactly like the language-model loss: a
data-parallel split of the batch into equal row blocks (each rank averaging
its own sequences, the gradients averaged over ranks) gives the same objective
and the same gradients as one process with the whole batch. A batch-wide f_i P_i
(a product of two batch means) would not split that way. Only P_i carries a
gradient (f_i counts tokens). The training objective is the LM loss plus
``aux_coef`` times the sum of the layers' aux losses (``auxiliary_loss``).

Each layer records its last forward's aux loss and tokens per expert on
itself; ``auxiliary_loss`` and ``RoutingTally`` collect them from a model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class Experts(nn.Module):
    """E expert MLPs (d -> 4d -> GELU -> d) as stacked parameters, shardable along dim 0."""

    def __init__(self, n_expert: int, d_model: int) -> None:
        super().__init__()
        hidden = 4 * d_model
        self.up_weight = nn.Parameter(torch.empty(n_expert, d_model, hidden))
        self.up_bias = nn.Parameter(torch.zeros(n_expert, hidden))
        self.down_weight = nn.Parameter(torch.empty(n_expert, hidden, d_model))
        self.down_bias = nn.Parameter(torch.zeros(n_expert, d_model))

    def init_weights(self, std: float, residual_std: float) -> None:
        """GPT-2's initialisation, as for the dense MLP: up N(0, std), down N(0, residual_std)."""
        nn.init.normal_(self.up_weight, mean=0.0, std=std)
        nn.init.normal_(self.down_weight, mean=0.0, std=residual_std)
        nn.init.zeros_(self.up_bias)
        nn.init.zeros_(self.down_bias)

    def forward(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Run ``rows`` (sorted by expert, ``counts[e]`` rows for local expert e) through them."""
        weights = (self.up_weight, self.up_bias, self.down_weight, self.down_bias)
        up_w, up_b, down_w, down_b = (local_tensor(w) for w in weights)
        outputs = [
            F.gelu(part @ up_w[e] + up_b[e]) @ down_w[e] + down_b[e]
            for e, part in enumerate(rows.split(counts))
        ]
        return torch.cat(outputs)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter: the local shard of a DTensor (expert parallelism
    shards the stacked experts as DTensors), the tensor itself otherwise."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


Dispatch = Callable[[torch.Tensor, torch.Tensor, Experts], torch.Tensor]
"""``dispatch(rows, tokens_per_expert, experts)``: the expert outputs of ``rows`` (sorted by
expert; ``tokens_per_expert`` is a length-E tensor), in the same order."""


def local_dispatch(
    rows: torch.Tensor, tokens_per_expert: torch.Tensor, experts: Experts
) -> torch.Tensor:
    """Every expert is on this rank: run the rows through them here."""
    return experts(rows, tokens_per_expert.tolist())


@dataclass
class Routing:
    """Where the tokens of one forward went."""

    expert: torch.Tensor
    """(N, k) expert indices per token, most probable first."""
    weight: torch.Tensor
    """(N, k) renormalised routing weights (each row sums to 1)."""
    probs: torch.Tensor
    """(N, E) router probabilities (fp32)."""


def route(logits: torch.Tensor, top_k: int) -> Routing:
    """Softmax, then the top ``top_k`` experts per token; ties go to the lower expert index."""
    probs = logits.float().softmax(dim=-1)
    top, expert = torch.sort(probs, dim=-1, descending=True, stable=True)
    top, expert = top[:, :top_k], expert[:, :top_k]
    return Routing(expert=expert, weight=top / top.sum(dim=-1, keepdim=True), probs=probs)


def balance_loss(routing: Routing, batch: int, n_expert: int) -> torch.Tensor:
    """E * sum_i f_i P_i per sequence, averaged over the ``batch`` sequences (module docstring)."""
    expert = routing.expert.reshape(batch, -1)  # (B, T k)
    counts = torch.zeros(batch, n_expert, device=expert.device)
    counts.scatter_add_(1, expert, torch.ones_like(expert, dtype=counts.dtype))
    fraction = counts / expert.shape[1]  # f_i = count_i / (k T)
    mean_prob = routing.probs.reshape(batch, -1, n_expert).mean(dim=1)  # P_i
    return (n_expert * (fraction * mean_prob).sum(dim=-1)).mean()


class MoE(nn.Module):
    """Router + ``Experts``: the dropless top-k mixture that replaces a block's MLP."""

    def __init__(self, d_model: int, n_expert: int, top_k: int, aux_coef: float) -> None:
        super().__init__()
        self.n_expert, self.top_k, self.aux_coef = n_expert, top_k, aux_coef
        self.router = nn.Linear(d_model, n_expert, bias=False)
        self.experts = Experts(n_expert, d_model)
        self.dispatch: Dispatch = local_dispatch
        self.aux_loss: torch.Tensor | None = None
        """The last forward's balance loss (with its graph)."""
        self.tokens_per_expert: torch.Tensor | None = None
        """The last forward's (token, expert) assignments per expert, length E."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, d = x.shape
        flat = x.reshape(-1, d)
        routing = route(self.router(flat), self.top_k)
        self.aux_loss = balance_loss(routing, batch, self.n_expert)
        assignments = routing.expert.reshape(-1)  # token t's j-th choice at t k + j
        order = torch.argsort(assignments, stable=True)
        counts = torch.bincount(assignments, minlength=self.n_expert)
        self.tokens_per_expert = counts.detach()
        out_sorted = self.dispatch(flat[order // self.top_k], counts, self.experts)
        out = torch.empty_like(out_sorted).index_copy(0, order, out_sorted)
        weights = routing.weight.to(out.dtype).unsqueeze(-1)
        combined = (out.view(-1, self.top_k, out.shape[-1]) * weights).sum(dim=1)
        return combined.view(batch, seq, -1)


def moe_layers(model: nn.Module) -> list[MoE]:
    """The MoE layers of ``model`` (empty for a dense model), in module order."""
    return [module for module in model.modules() if isinstance(module, MoE)]


def auxiliary_loss(layers: list[MoE]) -> torch.Tensor | None:
    """``aux_coef`` times the sum of the layers' last balance losses; None for a dense model."""
    terms = [layer.aux_coef * layer.aux_loss for layer in layers if layer.aux_loss is not None]
    return torch.stack(terms).sum() if terms else None


class RoutingTally:
    """Routing statistics of one optimizer step, summed over its micro-batches (this rank)."""

    def __init__(self, layers: list[MoE]) -> None:
        self.layers = layers
        self.aux_sum = 0.0
        self.passes = 0
        self.tokens: torch.Tensor | None = None

    def add(self) -> None:
        """Record the layers' last forward (call once per micro-batch, after it)."""
        if not self.layers:
            return
        counts = torch.stack([layer.tokens_per_expert for layer in self.layers]).sum(dim=0)
        self.tokens = counts if self.tokens is None else self.tokens + counts
        self.aux_sum += float(sum(float(layer.aux_loss.detach()) for layer in self.layers))
        self.passes += 1

    def metrics(self) -> dict[str, float | list[int]]:
        """``moe/*`` metrics of the step; empty for a dense model.

        ``moe/tokens_per_expert``: (token, expert) assignments per expert of this
        rank's rows, summed over layers and micro-batches; ``moe/aux_loss``: the
        sum over layers of the balance loss (before ``aux_coef``), averaged over
        micro-batches; ``moe/load_imbalance``: the busiest expert's tokens over the
        mean (1 = perfectly balanced); ``moe/dropped_tokens``: 0, the layer is dropless.
        """
        if self.tokens is None:
            return {}
        tokens = self.tokens.tolist()
        mean = sum(tokens) / len(tokens)
        return {
            "moe/aux_loss": self.aux_sum / self.passes,
            "moe/tokens_per_expert": tokens,
            "moe/load_imbalance": max(tokens) / mean if mean else 0.0,
            "moe/dropped_tokens": 0,
        }
