"""Per-shard scheduling overhead of the Ray executor next to SLURM's, on the same demo shards, in one run.

Both clusters run on this machine: the one-node SLURM cluster of tests/slurm_cluster.py and a local Ray head
(tests/ray_cluster.py), each allowed `--parallel` tasks at once. The demo world's images are served on
127.0.0.1; each executor runs the chain download -> annotate (noop captioner) over the same `--shards` shards,
one task per shard, into its own root. Per executor:

    overhead per shard = (wall from `submit` to the last job's end x parallel - the shards' own work) / shards

where a shard's own work is the `seconds` its marker records (what the runner spent inside the unit). What is
left is the executor's cost per task: queueing, starting the task's process, importing the pipeline, claiming
and committing. Prints both and `ratio=<ray/slurm>` last.

    python tools/bench_executors.py [--shards 8] [--per-shard 3] [--parallel 2]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402


def manifest_for(work: Path, name: str, urls: Path, per_shard: int) -> Path:
    from pipeline.demo import DEMO_MANIFEST

    download = yaml.safe_load(DEMO_MANIFEST.read_text())["download"]
    data = {"name": f"bench-{name}", "root": str(work / f"root-{name}"), "shard_size": per_shard,
            "download": {**download, "urls": str(urls), "threads": 4},
            "annotate": {"captioner": {"backend": "noop"}},
            "ray": {"env": {"PYTHONPATH": str(REPO)}}}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def submit(executor: list[str], manifest: Path, shards: int, parallel: int, env: dict[str, str]) -> list[str]:
    res = subprocess.run([sys.executable, "-m", "pipeline", "submit", *executor, "--stage", "download,annotate",
                          "--shards", f"0-{shards - 1}", "--tasks", str(shards), "--parallel", str(parallel),
                          "--gpus", "0", "--manifest", str(manifest)], cwd=REPO, env=env, capture_output=True,
                         text=True)
    if res.returncode:
        raise RuntimeError(f"submit failed: {res.stderr}")
    return re.findall(r"submitted (?:Ray )?job (\S+?):", res.stdout)


def work_seconds(root: Path, shards: int) -> float:
    from pipeline.storage import Storage

    storage = Storage(str(root))
    total = 0.0
    for stage in ("download", "annotate"):
        markers = storage.unit_markers(stage)
        if len(markers) != shards or storage.unit_failures(stage):
            raise RuntimeError(f"{root}: {stage} committed {len(markers)} of {shards} shards")
        total += sum(float(m.get("stats", {}).get("seconds", 0.0)) for m in markers.values())
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=3, help="images per shard")
    parser.add_argument("--parallel", type=int, default=2, help="tasks at once (and the Ray cluster's CPUs)")
    args = parser.parse_args()

    import pyarrow.parquet as pq

    from pipeline.demo import make_demo_data, serve_directory, write_url_list
    from tests.ray_cluster import RayCluster
    from tests.ray_cluster import wait_for_job as wait_ray
    from tests.slurm_cluster import SlurmCluster, missing_binaries
    from tests.slurm_cluster import wait_for_job as wait_slurm

    if missing_binaries():
        print(f"SLURM is not installed ({', '.join(missing_binaries())}): run tools/setup_slurm.sh")
        return 2
    work = Path(tempfile.mkdtemp(prefix="bexec-", dir="/tmp"))
    slurm = SlurmCluster(work / "slurm", cpus=max(args.parallel, os.cpu_count() or 1))
    ray = RayCluster(work / "r" / "s", cpus=args.parallel)
    (work / "r").mkdir()
    slurm.start()
    ray.start()
    results: dict[str, tuple[float, float]] = {}
    try:
        data = make_demo_data(work / "data", n_images=args.shards * args.per_shard, size=48)
        with serve_directory(data) as base:
            urls = work / "urls.parquet"
            pq.write_table(pq.read_table(write_url_list(data, base)), urls)
            env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
            env.update({"PYTHONPATH": str(REPO), "SLURM_CONF": str(slurm.conf)})
            for name in ("slurm", "ray"):
                manifest = manifest_for(work, name, urls, args.per_shard)
                executor = ["--executor", "ray", "--address", ray.address] if name == "ray" else []
                t0 = time.perf_counter()
                jobs = submit(executor, manifest, args.shards, args.parallel, env)
                for job in jobs:
                    if name == "ray":
                        state = wait_ray(ray.address, job, timeout=3600)
                        if state != "SUCCEEDED":
                            raise RuntimeError(f"Ray job {job} ended {state}")
                    else:
                        wait_slurm(job, slurm.env, timeout=3600)
                wall = time.perf_counter() - t0
                own = work_seconds(work / f"root-{name}", args.shards)
                results[name] = (wall, (wall * args.parallel - own) / (2 * args.shards))
                print(f"{name}: {len(jobs)} jobs, {2 * args.shards} tasks ({args.parallel} at once): wall {wall:.1f}s, "
                      f"shard work {own:.1f}s, overhead {results[name][1]:.2f}s per shard", flush=True)
    finally:
        ray.stop()
        slurm.stop()
    print(f"ratio={results['ray'][1] / results['slurm'][1]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
