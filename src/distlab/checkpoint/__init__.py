"""Checkpoints: atomic, durable, rotating, sharded; and loading them back without running anything.

A checkpoint is written by every rank into ``checkpoints/.tmp-step_NNNNNN`` and
renamed to ``checkpoints/step_NNNNNN`` by rank 0 only after every rank has
finished writing and every file is fsync'ed, so a crash during a save (of a
process, or of the OS) leaves the previous checkpoints intact. NNNNNN is the
number of completed steps, i.e. the step a resume runs next. Old checkpoints
are rotated out only after the new one is durable, through a ``.trash-`` name.

Inside a checkpoint:

- the strategy's state, written by ``TrainStep.save_checkpoint``. Torch-native
  strategies write DCP (``torch.distributed.checkpoint``): model and optimizer
  state under the plain model's parameter names (FQNs), each rank writing the
  shards it holds, so it loads into any strategy at any world size. Only
  tensors go in: the learning-rate schedule is not saved but derived from the step.
- ``rng_rankR.pt``: rank R's random-number generator states, a dict of tensors.
- ``meta.json``: the step, the strategy and world size that wrote it, and its
  format (``dcp`` or the strategy's own, e.g. DeepSpeed's), written last.

The modules, in the order a checkpoint lives:

- ``layout``: where checkpoints are, their names, ``meta.json``;
- ``durable``: fsync'ed writes, renames and removals;
- ``save``: the commit protocol (stage, fsync, rename, rotate) and its crash points;
- ``safe_unpickle``: the exact-name allow-lists every pickle is checked with;
- ``verify``: checking every file of a checkpoint before anything reads it;
- ``state``: saving and loading model, optimizer, schedule and RNG state (DCP).
"""
