"""The demo: synthetic scenes served over HTTP on 127.0.0.1, then every available stage end to end on CPU."""

from __future__ import annotations

import functools
import http.server
import json
import random
import socket
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipelineError, SettingsChangedError
from pipeline.nano import world
from pipeline.resources import repo_path

DEMO_MANIFEST = repo_path("manifests", "demo.yaml")
WORLD_TABLE = "world.parquet"
URL_LIST = "urls.parquet"
HELDOUT_DIR = "heldout"
HELDOUT_JSONL = "benchmark.jsonl"
HELDOUT_SEED = 7_000_000
"""The held-out benchmark's scenes come from their own RNG stream (the demo world uses seed 0)."""


def make_demo_data(out_dir: str | Path, n_images: int = 60, seed: int = 0, size: int = world.IMAGE_SIZE) -> Path:
    """Render n scenes to out_dir/images/*.png and write out_dir/world.parquet (ground truth). Deterministic."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(n_images):
        scene = world.sample_scene(rng)
        name = f"scene_{i:05d}.png"
        (out / "images" / name).write_bytes(world.encode(world.render(scene, size)))
        mcqs = world.pick_mcqs(scene, rng, k=5)
        rows.append({
            "scene_id": i,
            "file": f"images/{name}",
            "scene": scene.to_json(),
            "reference_caption": world.caption(scene, i % 3),
            "mcqs": json.dumps([q.to_dict() for q in mcqs]),
        })
    pq.write_table(pa.Table.from_pylist(rows), out / WORLD_TABLE)
    make_heldout_benchmark(out, seen={r["scene"] for r in rows}, size=size)
    return out


def make_heldout_benchmark(out_dir: str | Path, n_scenes: int = 40, questions: int = 3,
                           seen: set[str] | None = None, size: int = world.IMAGE_SIZE) -> Path:
    """out_dir/heldout/benchmark.jsonl (+ images/): scenes never shown to download/qa/train (their own seed,
    and any scene equal to one in `seen` is skipped), `questions` MCQs each, one JSONL row per question
    {image, question, options, answer, reference, truth (the scene, JSON), id}. Deterministic."""
    out = Path(out_dir) / HELDOUT_DIR
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(HELDOUT_SEED)
    lines: list[str] = []
    i = 0
    while i < n_scenes:
        scene = world.sample_scene(rng)
        if seen is not None and scene.to_json() in seen:
            continue
        name = f"images/heldout_{i:05d}.png"
        (out / name).write_bytes(world.encode(world.render(scene, size)))
        for j, q in enumerate(world.pick_mcqs(scene, rng, k=questions)):
            lines.append(json.dumps({"image": name, "question": q.question, "options": list(q.options),
                                     "answer": q.answer, "reference": world.caption(scene, i % 3),
                                     "truth": scene.to_json(), "id": f"heldout-{i:05d}-{j}"}))
        i += 1
    path = out / HELDOUT_JSONL
    path.write_text("\n".join(lines) + "\n")
    return path


def write_url_list(data_dir: str | Path, base_url: str) -> Path:
    """urls.parquet: one row per scene with its URL and the ground truth carried through as extra columns."""
    data = Path(data_dir)
    table = pq.read_table(data / WORLD_TABLE).to_pylist()
    rows = [{"url": f"{base_url.rstrip('/')}/{r['file']}", "caption": r["reference_caption"],
             "scene_id": r["scene_id"], "scene": r["scene"], "mcqs": r["mcqs"]} for r in table]
    path = data / URL_LIST
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


class _Server(http.server.ThreadingHTTPServer):
    """Threaded, with a listen backlog large enough for a downloader's burst of connections (the default
    of 5 drops SYNs under 8+ concurrent fetches, costing a 1 s retransmit each)."""

    daemon_threads = True
    request_queue_size = 256


@contextmanager
def serve_directory(directory: str | Path, port: int = 0):
    """A quiet threaded HTTP server for `directory` on 127.0.0.1; yields its base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # noqa: D401 - silence request logs
            pass

    handler = functools.partial(Quiet, directory=str(directory))
    try:
        server = _Server(("127.0.0.1", port), handler)
    except OSError as exc:
        raise PipelineError(f"cannot serve the demo images on 127.0.0.1:{port}: {exc}; pass another --port") from None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def run_demo(root: str, data_dir: str, port: int, n_images: int, manifest: str | None, out=sys.stdout,
             train: bool = False) -> int:
    """Generate the demo world, serve it, and run every available stage over all its shards. `train`: RL of the
    captioner (the manifest's train settings) instead of registering the trained one."""
    from pipeline.config import load_config
    from pipeline.runner import run_stage
    from pipeline.shards import format_shard_spec
    from pipeline.stage import STAGE_ORDER, available_stages

    data = Path(data_dir)
    if not (data / WORLD_TABLE).exists():
        make_demo_data(data, n_images=n_images)
        print(f"demo: rendered {n_images} scenes into {data}/", file=out)
    elif not (data / HELDOUT_DIR / HELDOUT_JSONL).exists():  # a data dir from before the held-out benchmark
        seen = {r["scene"] for r in pq.read_table(data / WORLD_TABLE, columns=["scene"]).to_pylist()}
        make_heldout_benchmark(data, seen=seen)
    manifest_path = manifest or (str(DEMO_MANIFEST) if DEMO_MANIFEST.exists() else None)
    config = load_config(manifest_path, overrides=[f"download.urls={data / URL_LIST}",
                                                   *(["train.load=null"] if train else [])], root=root)
    relocate_benchmarks(config, data)
    num_shards = -(-n_images // config.shard_size)
    shards = list(range(num_shards))
    with serve_directory(data, port) as base_url:
        write_url_list(data, base_url)
        print(f"demo: serving {data}/ at {base_url}; root {config.root}; shards {format_shard_spec(shards)}", file=out)
        declared = available_stages(config)
        stages, skipped = runnable_stages(config, {s: declared[s] for s in STAGE_ORDER if s in declared})
        if skipped:
            print(f"demo: {manifest_path or 'the default configuration'} cannot run "
                  + "; ".join(f"{s} ({why})" for s, why in skipped.items())
                  + f"; running {', '.join(stages) or 'nothing'}", file=out)
        if not stages:
            print("demo: no stage can run; the demo world is ready in", data, file=out)
            return 0
        code = 0
        for stage in stages:
            if stage == "evaluate" and "train" in stages:
                add_trained_captioner(config)
            try:
                report = run_stage(config, stage, None if declared[stage].whole_run else shards, out=out)
            except SettingsChangedError as exc:
                raise SettingsChangedError(f"{exc}. The demo reruns a root with the settings it was made with: "
                                           f"give this demo another --root (e.g. {config.root.rstrip('/')}-train)"
                                           ) from None
            code = max(code, report.exit_code)
            if report.exit_code:
                break
    print(f"demo: finished ({', '.join(stages)}); outputs under {config.root}", file=out)
    if code == 0:
        show_results(config, stages, out)
    return code


def runnable_stages(config, declared: dict) -> tuple[list[str], dict[str, str]]:
    """The stages (in order) whose engines the configuration names and finds, and why each other one cannot run
    (a model not set or missing, a server that does not answer, a model taken from a stage that cannot run)."""
    from pipeline.preflight import engine_problem
    from pipeline.resources import stage_reference

    ready: list[str] = []
    skipped: dict[str, str] = {}
    for name, stage in declared.items():
        for setting, cfg in (stage.engines(config) if stage.engines else {}).items():
            ref = stage_reference(cfg.model) if cfg.backend in ("hf", "vllm") else None
            if ref is not None and ref[0] not in ready:
                skipped[name] = f"{setting}.model is {cfg.model}, but {ref[0]} does not run"
                break
            problem = engine_problem(setting, cfg)
            if problem:
                skipped[name] = problem
                break
        else:
            ready.append(name)
    return ready, skipped


def relocate_benchmarks(config, data: Path) -> None:
    """The demo manifest names its held-out benchmark under ./demo_data; follow --data-dir."""
    moved = []
    for bench in config.evaluate.benchmarks:
        if bench.path and bench.path.startswith("./demo_data/"):
            bench = bench.model_copy(update={"path": str(data / bench.path.removeprefix("./demo_data/"))})
        moved.append(bench)
    config.evaluate.benchmarks = moved


def add_trained_captioner(config) -> None:
    """When the demo trained a captioner, evaluate it beside the nano ones (same engine settings)."""
    caps = dict(config.evaluate.captioners)
    if caps and "trained" not in caps:
        first = next(iter(caps.values()))
        caps["trained"] = first.model_copy(update={"model": "train:latest"})
        config.evaluate.captioners = caps


def show_results(config, stages: list[str], out) -> None:
    """The evaluate table and the browse gallery of the captions, when those stages ran."""
    from pipeline.storage import Storage

    storage = Storage(config.root, config.storage_options, config.work_dir)
    if "evaluate" in stages:
        rel = f"eval/{config.evaluate.name}/report.md"
        if storage.exists(rel):
            with storage.open(rel, "rb") as f:
                print("\n" + f.read().decode(), file=out)
    if "annotate" in stages and storage.is_local:
        from pipeline.publish.gallery import write_gallery
        from pipeline.publish.report import report_link, write_report
        from pipeline.publish.source import CommittedSource

        source = CommittedSource(storage, "captions")
        print(f"demo: the run's report: {write_report(source)}", file=out)
        gallery = Path(storage.path("gallery"))
        folder = write_gallery(source, gallery, report=report_link(storage, gallery))
        print(f"demo: gallery of the captions: {folder / 'index.html'}", file=out)
