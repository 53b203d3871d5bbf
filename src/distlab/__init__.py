"""distlab: a distributed-training lab for one workstation (see the README)."""
