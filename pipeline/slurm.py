"""`python -m pipeline.slurm slice SPEC NUM_TASKS TASK`, as sbatch scripts rendered by versions before the
executors package call it (their "Resubmit with: sbatch <this file>" must keep working). The SLURM executor
itself is `pipeline.executors.slurm`."""

from __future__ import annotations

import sys

from pipeline.executors.slurm import _main

if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
