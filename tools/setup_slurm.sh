#!/usr/bin/env bash
# Install Debian's slurm-wlm (slurmctld, slurmd and the client commands) for the SLURM tests (idempotent).
# The test fixture (tests/slurm_cluster.py) writes its own slurm.conf and starts a one-node cluster.
set -euo pipefail
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null; then
    echo "slurm-wlm already installed: $(slurmctld -V)"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends slurm-wlm
echo "installed: $(slurmctld -V)"
