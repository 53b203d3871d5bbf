"""Launching a run (``python -m distlab.launch``): launchers start, watch and restart the ranks.

- ``ray`` (default): Ray Train's TorchTrainer runs one worker per rank on a
  Ray instance started for the run (or the cluster at ``--ray-address``);
  Ray's FailureConfig replaces the worker group after a failure.
- ``local``: one process per rank, forked from a server that has imported
  torch already (``launch.spawn``); the launcher itself restarts them.

Either way a restarted group resumes from the run dir's newest complete
checkpoint, ``events.jsonl`` records each fault and resume, a watchdog on the
ranks' step progress kills a hung rank (``launch.watchdog``), and the
launcher's own process writes the run's one W&B run (``launch.wandb_run``).

``distlab.launch.runner.run(config)`` is the one way in. This package file
imports nothing, so ``python -m distlab.launch`` can start the rank server
before it imports torch (``launch.__main__``).
"""
