"""What every rank runs: the entry points, the strategy-agnostic loop, faults, measurements."""
