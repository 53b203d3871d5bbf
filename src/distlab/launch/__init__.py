"""Launching a run (``python -m distlab.launch``): launchers start and watch the ranks."""
