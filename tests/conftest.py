"""Shared fixtures: the one-node SLURM cluster (tests/slurm_cluster.py) for tests marked `slurm`."""

from tests.slurm_cluster import slurm_cluster  # noqa: F401 - a session fixture, found by name
