"""python -m pipeline ..."""

from pipeline.cli import main

if __name__ == "__main__":  # guarded: spawned workers (vLLM, process pools) re-import this module
    raise SystemExit(main())
