"""The command line: run | submit | retry | status | verify | browse | export | report | demo | export-qa | import-qa."""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.config import RunConfig, load_config
from pipeline.errors import PipelineError, UnknownStageError
from pipeline.redact import redact_text
from pipeline.runner import EXIT_USER_ERROR
from pipeline.shards import format_shard_spec, parse_shard_spec
from pipeline.stage import load_stage, resolve_stage_name, stage_folders, stage_modules


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", "-m", help="run manifest YAML (e.g. manifests/demo.yaml); defaults apply without one")
    p.add_argument("--root", help="storage root: a local path or fsspec URL such as s3://bucket/run (overrides the manifest)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a manifest field, e.g. --set annotate.captioner.batch_size=16 (repeatable)")


def _add_stage_and_shards(p: argparse.ArgumentParser, chain: bool = False) -> None:
    if chain:
        p.add_argument("--stage", "-s", required=True,
                       help="stage name, or a chain 'qa,train,annotate,evaluate' submitted in order, each job "
                            "starting after the previous one succeeded (--dependency=afterok)")
    else:
        p.add_argument("--stage", "-s", required=True, help="stage name: download, qa, train, annotate, evaluate")
    p.add_argument("--shards", help="shard spec: '0-999', '3,7,10-12' or '5' (required for per-shard stages; for a "
                                    "whole-run stage, its input shards, default: every committed one)")


def _config(args: argparse.Namespace) -> RunConfig:
    """The configuration of a command: manifest, --set items, then secret settings a SLURM task received."""
    from pipeline.executors.base import secret_overrides_from_env

    return load_config(args.manifest, [*args.overrides, *secret_overrides_from_env()], root=args.root)


def _add_root_args(p: argparse.ArgumentParser) -> None:
    """The root of a command that reads a run (browse, export, report): positional, or from a manifest."""
    p.add_argument("root", nargs="?", help="the run's storage root (default: the manifest's root)")
    p.add_argument("--manifest", "-m", help="run manifest (for storage_options)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a manifest field, e.g. --set storage_options.endpoint_url=http://...")


def _add_executor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", choices=("slurm", "ray"), default=None,
                   help="where tasks run: a SLURM array (default) or a Ray cluster (pip install -e '.[ray]'); "
                        "retry defaults to the executor of the stage's last submission")
    p.add_argument("--address", help="Ray: the cluster's job API, e.g. http://head:8265 or ray://head:10001 "
                                     "(default: ray.address in the manifest, else RAY_ADDRESS, else the local head)")


def _add_resource_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parallel", type=int, help="at most this many tasks at once (--array=...%%N)")
    p.add_argument("--gpus", type=int, help="GPUs per task (--gres=gpu:N)")
    p.add_argument("--cpus", type=int, help="CPUs per task")
    p.add_argument("--mem", help="memory per task, e.g. 64G")
    p.add_argument("--time", help="time limit per task, e.g. 04:00:00")
    p.add_argument("--partition", help="partition (default: slurm.partition in the manifest)")
    p.add_argument("--account", help="account (default: slurm.account in the manifest)")
    p.add_argument("--requeue", action="store_true", default=None,
                   help="requeue a task stopped by preemption or the time-limit warning")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Dense-caption datasets at scale, the CapRL way: shard-parallel stages over one shard-id space.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run one stage over a set of shards in this process",
                         description="Run one stage over a set of shards in this process. Committed shards are "
                                     "skipped; a failing shard is recorded and the others go on; the exit code "
                                     "is 1 if any shard failed, 75 if stopped by SIGTERM/SIGUSR1.")
    _add_stage_and_shards(run)
    _add_config_args(run)
    run.add_argument("--force", action="store_true", help="redo shards even if committed")
    run.add_argument("--failed-only", action="store_true",
                     help="for committed shards with failed rows, redo only those rows (stages with retry_shard, "
                          "e.g. download); uncommitted shards run as usual")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--load", metavar="PATH", help="train: register this trained checkpoint (e.g. CapRL-3B) "
                     "instead of training (the same as --set train.load=PATH)")

    submit = sub.add_parser(
        "submit", help="run a stage over shards as a SLURM job array (sbatch script saved under ROOT/logs)",
        description="Render an sbatch array script: task i of --tasks runs its contiguous slice of --shards "
                    "through `python -m pipeline run`. The script is saved under ROOT/logs and submitted with "
                    "sbatch; each submission gets a folder ROOT/logs/<stage>-<time>/ (or under slurm.log_dir) with its script, its "
                    "record and one log per task; --tasks above the cluster's MaxArraySize are folded into that many. Environment set-up lines come from "
                    "the manifest's slurm.setup.")
    _add_stage_and_shards(submit, chain=True)
    submit.add_argument("--tasks", type=int, default=1,
                        help="number of array tasks of a per-shard stage (capped at the shard count); a whole-run "
                             "stage is always one job")
    _add_config_args(submit)
    _add_resource_args(submit)
    _add_executor_args(submit)
    submit.add_argument("--dry-run", action="store_true", help="print the script; save and submit nothing")

    retry = sub.add_parser(
        "retry", help="list (or submit) the shards of a stage that are not committed yet",
        description="Print the shard spec of the stage's shards that are not committed (never run, failed, or "
                    "held by a dead task) out of the run's shards (run.json num_shards, else every shard "
                    "submitted for the stage). With --submit, submit them as a new array; resources default "
                    "to the stage's last submission. With --failed-only, pick committed shards whose "
                    "manifests contain failed rows and run them with `run --failed-only`.")
    retry.add_argument("--stage", "-s", required=True, help="stage name")
    retry.add_argument("--shards", help="the run's shards (default: run.json or the recorded submissions)")
    retry.add_argument("--failed-only", action="store_true", help="committed shards with failed rows")
    retry.add_argument("--include-running", action="store_true", help="also shards whose task looks alive, and submit even while earlier jobs of the stage are queued")
    retry.add_argument("--submit", action="store_true", help="submit the shards as a new array")
    retry.add_argument("--tasks", type=int, help="array tasks (default: as the last submission, capped)")
    retry.add_argument("--dry-run", action="store_true", help="with --submit: print the script only")
    retry.add_argument("--stale-after", type=float, default=None, metavar="SECONDS",
                       help="a claim without heartbeat for this long belongs to a dead task (default 600)")
    _add_config_args(retry)
    _add_resource_args(retry)
    _add_executor_args(retry)

    status = sub.add_parser(
        "status", help="committed / failed / running shards per stage, read from ROOT alone",
        description="Read ROOT alone: committed, failed, running, stale, pending and outdated units per stage. "
                    "Without --manifest/--set the markers are taken as they record themselves (with the settings "
                    "they were made with); with them, units made with other settings are outdated and the "
                    "differing setting is named. A unit whose recorded inputs were recommitted is outdated either way.")
    _add_config_args(status)
    status.add_argument("--stage", help="only this stage")
    status.add_argument("--stale-after", type=float, default=600.0, metavar="SECONDS",
                        help="a claim without heartbeat for this long belongs to a dead task (default 600)")

    verify = sub.add_parser(
        "verify", help="check every committed output against its marker's sha256 (reads every byte)",
        description="Read every committed output (in parallel, on any root) and compare it with the size and "
                    "sha256 its marker recorded. Exit 1 if any is corrupt. With --repair, corrupt units lose "
                    "their marker (a failure record names the bad file), so the next `run` redoes them.")
    _add_config_args(verify)
    verify.add_argument("--stage", help="only this stage (default: every registered stage)")
    verify.add_argument("--shards", help="only these shards (whole-run units are checked unless --shards is given)")
    verify.add_argument("--repair", action="store_true", help="mark corrupt units FAILED (marker removed, failure recorded) so the next run redoes them")
    verify.add_argument("--workers", type=int, default=8, help="files read in parallel")

    browse = sub.add_parser(
        "browse", help="summarize, query and sample a run's committed manifests (polars, lazily); HTML gallery",
        description="Read the parquet manifests of every committed unit of a stage lazily with polars (local or "
                    "s3 through the manifest's storage_options): a summary (rows by status and failure reason, "
                    "length and quality histograms, models, pipeline versions); --where filters with a polars SQL "
                    "expression; --sample N prints a seeded sample; --show KEY one row whole with its image's place "
                    "in its tar; --html DIR writes a static gallery.")
    _add_root_args(browse)
    browse.add_argument("--stage", default="captions", help="which manifests: captions, images, qa or eval, or the "
                        "stage that writes them (annotate, download, qa, evaluate); default captions")
    browse.add_argument("--where", metavar="EXPR", help="polars SQL filter, e.g. \"quality < 0.5 and caption_tokens > 200\"")
    browse.add_argument("--sample", type=int, metavar="N", help="print N rows chosen with --seed")
    browse.add_argument("--seed", type=int, default=0, help="seed of --sample (default 0)")
    browse.add_argument("--show", metavar="KEY", help="print one row whole, with where its image is")
    browse.add_argument("--html", metavar="DIR", help="write a static gallery (DIR/index.html) of the matching rows "
                        "(the first 1000, or the --sample)")

    export = sub.add_parser(
        "export", help="write the committed captions and images as a loadable dataset (hf, llava, sharegpt, "
                       "webdataset) with a generated dataset card",
        description="Stream every ok row of the committed caption shards (filtered by --where, the expression "
                    "language of browse), with its image, into --out (a local folder or fsspec URL) in one format, "
                    "with README.md (the dataset card) and export.json. Identical images (sha256) are exported once. "
                    "Atomic: a killed export leaves no folder that looks complete; rerun it.")
    _add_root_args(export)
    export.add_argument("--format", "-f", required=True, choices=("hf", "llava", "sharegpt", "webdataset"),
                        help="hf: parquet + card for datasets.load_dataset(DIR); llava / sharegpt: conversation "
                             "JSON + images/; webdataset: re-sharded tars")
    export.add_argument("--out", "-o", required=True, help="output folder: a local path or fsspec URL (s3://...)")
    export.add_argument("--where", metavar="EXPR", help="polars SQL filter, e.g. \"quality >= 0.5 and "
                        "caption_tokens > 20 and source_license = 'cc-by-4.0'\"")
    export.add_argument("--limit", type=int, help="at most N rows")
    export.add_argument("--shards", help="only these caption shards, e.g. '0-9'")
    export.add_argument("--no-dedup", action="store_true", help="keep rows whose image bytes were exported already")
    export.add_argument("--force", action="store_true", help="replace an existing export at --out")
    export.add_argument("--max-file-mb", type=float, default=256, help="hf: roll parquet files at this size (MB)")
    export.add_argument("--samples-per-tar", type=int, default=1000, help="webdataset: samples per tar")

    report = sub.add_parser(
        "report", help="one self-contained HTML page of the run's charts (progress, throughput, failures, "
                       "caption lengths and quality, training curves)",
        description="Read the committed markers and manifests and write one HTML page that needs no network "
                    "(charts are inlined PNGs): ROOT/report/index.html for a local root, else --out.")
    _add_root_args(report)
    report.add_argument("--out", "-o", help="where the page goes (default ROOT/report/index.html)")
    report.add_argument("--watch", type=float, metavar="SECONDS",
                        help="rewrite the page every SECONDS while a run goes on (the page reloads itself)")

    demo = sub.add_parser("demo", help="render the demo world, serve it on 127.0.0.1 and run every stage on CPU")
    demo.add_argument("--root", default=None, help="where the demo run goes (default: the demo manifest's ./demo_run)")
    demo.add_argument("--data-dir", default="demo_data", help="where the demo images and URL list go")
    demo.add_argument("--port", type=int, default=8765, help="HTTP port on 127.0.0.1 for the demo images")
    demo.add_argument("--images", type=int, default=60, help="number of demo scenes")
    demo.add_argument("--manifest", "-m", default=None, help="manifest (default: manifests/demo.yaml)")
    demo.add_argument("--train", action="store_true", help="run RL from an under-trained nano-VL snapshot "
                      "instead of registering the trained nano-VL, and caption with the result")

    export = sub.add_parser(
        "export-qa", help="write the kept questions in the published CapRL-QA layout (one parquet)",
        description="Write every committed qa shard's kept questions, with their images, as one parquet in the "
                    "CapRL-QA-75K layout: id, image {bytes, path}, prompt, data_source, "
                    "reward_model {ground_truth: [{question, choices, answer}], style}.")
    _add_config_args(export)
    export.add_argument("--out", required=True, help="output parquet: a local path or fsspec URL")
    export.add_argument("--data-source", default=None, help="the rows' data_source (default: caprl-pipeline)")
    export.add_argument("--style", choices=["paren", "dot"], default="paren",
                        help='how choices are lettered: paren "A) text" (CapRL-QA-75K, default) or dot "A. text" '
                             "(CapRL++'s question sets); import-qa reads either")

    imp = sub.add_parser(
        "import-qa", help="cut a published CapRL-QA parquet into committed image and qa shards",
        description="Read a parquet in the CapRL-QA layout (local or fsspec URL) and commit ROOT/images/<shard> "
                    "(download layout, questions in each sample's json) and ROOT/qa/<shard> (the questions, kept) "
                    "in shards of shard_size rows. `run --stage qa --set qa.generate=false` then re-gates them.")
    imp.add_argument("source", help="the published parquet: a local path or fsspec URL")
    _add_config_args(imp)
    return parser


def _publish_source(args: argparse.Namespace, view: str = "captions"):
    """The committed source of a publish command (browse, export, report) from its root / manifest arguments."""
    from pipeline.publish.source import CommittedSource
    from pipeline.storage import Storage

    config = load_config(args.manifest, args.overrides, root=args.root)
    storage = Storage(config.root, config.storage_options, config.work_dir)
    return CommittedSource(storage, view), config


def _browse(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline.publish.browse import browse
    from pipeline.publish.gallery import write_gallery
    from pipeline.publish.report import report_link

    source, _ = _publish_source(args, args.stage)
    code = browse(source, where=args.where, sample=args.sample, seed=args.seed, show=args.show)
    if args.html and args.show is None:
        folder = write_gallery(source, Path(args.html), where=args.where, sample=args.sample, seed=args.seed,
                               report=report_link(source.storage, Path(args.html)))
        print(f"\ngallery: {folder / 'index.html'}")
    return code


def _export(args: argparse.Namespace) -> int:
    from pipeline.publish.export import export
    from pipeline.publish.rows import Selection

    source, _ = _publish_source(args)
    if args.limit is not None and args.limit < 1:
        raise PipelineError("--limit must be at least 1")
    sel = Selection(where=args.where, limit=args.limit, dedup=not args.no_dedup,
                    shards=parse_shard_spec(args.shards) if args.shards else None)
    marker = export(source, args.format, args.out, sel, force=args.force,
                    options={"max_file_mb": args.max_file_mb, "samples_per_tar": args.samples_per_tar})
    print(f"export: {marker['rows']} rows ({args.format}) -> {args.out} ({marker['matched']} matched, "
          f"{marker['duplicates']} duplicate images dropped)")
    return 0


def _report(args: argparse.Namespace) -> int:
    from pipeline.publish.report import watch, write_report

    source, _ = _publish_source(args)
    if args.watch:
        return watch(lambda: _publish_source(args)[0], args.out, args.watch, sys.stdout)
    print(f"report: {write_report(source, args.out)}")
    return 0


def _qa_exchange(args: argparse.Namespace) -> int:
    """export-qa / import-qa (the logic lives in the qa stage's published module)."""
    import importlib

    from pipeline.storage import Storage

    published = importlib.import_module("stages.qa.published")
    config = _config(args)
    storage = Storage(config.root, config.storage_options, config.work_dir)
    if args.command == "export-qa":
        storage.check_reachable(create=False)
        n = published.export_qa(config, storage, args.out, args.data_source or published.DATA_SOURCE,
                                config.storage_options if "://" in args.out else None, style=args.style)
        print(f"export-qa: {n} images with kept questions -> {args.out}")
        return 0
    shards = published.import_qa(config, storage, args.source,
                                 config.storage_options if "://" in args.source else None, out=sys.stdout)
    print(f"import-qa: {len(shards)} shard(s) [{format_shard_spec(shards) if shards else ''}] under {config.root}")
    return 0


def _resolve_names(args: argparse.Namespace) -> None:
    """Stage and table names as the user gave them -> the registered ones (`status --stage captions` means
    annotate, `browse --stage annotate` means its captions table); one error line listing the valid names."""
    stage = getattr(args, "stage", None)
    if stage is None or args.command == "demo":
        return
    config = load_config(args.manifest, args.overrides, root=getattr(args, "root", None))
    if args.command == "browse":
        from pipeline.publish.source import VIEWS

        def stage_choices() -> tuple[str, ...]:
            return tuple(VIEWS)

        if stage not in stage_choices():
            folder = stage_folders(config).get(resolve_stage_name(stage, config))
            if folder not in stage_choices():
                raise UnknownStageError(f"browse has no table for {stage!r}; tables: {', '.join(stage_choices())} "
                                        "(or the stage that writes one: download, qa, annotate, evaluate)")
            args.stage = folder
        return
    args.stage = ",".join(resolve_stage_name(s.strip(), config) for s in stage.split(",") if s.strip())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command is None:
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        _resolve_names(args)
        if args.command == "run":
            from pipeline.runner import run_stage

            shards = parse_shard_spec(args.shards) if args.shards else None
            if args.load is not None:
                if args.stage != "train":
                    raise PipelineError("--load belongs to the train stage (it registers a trained checkpoint)")
                args.overrides = [*args.overrides, f"train.load={args.load}"]
            report = run_stage(_config(args), args.stage, shards, force=args.force,
                               failed_only=args.failed_only, progress=not args.no_progress)
            return report.exit_code
        if args.command == "submit":
            return _submit(args)
        if args.command == "retry":
            return _retry(args)
        if args.command == "status":
            from pipeline.status import print_status

            compare = args.manifest is not None or bool(args.overrides)
            return print_status(_config(args), args.stage, stale_after=args.stale_after, compare=compare)
        if args.command == "verify":
            from pipeline.shards import shard_name
            from pipeline.verify import print_report, verify

            units = {shard_name(s) for s in parse_shard_spec(args.shards)} if args.shards else None
            report = verify(_config(args), [args.stage] if args.stage else None, units, args.repair, args.workers)
            return print_report(report, args.repair)
        if args.command == "browse":
            return _browse(args)
        if args.command == "export":
            return _export(args)
        if args.command == "report":
            return _report(args)
        if args.command in ("export-qa", "import-qa"):
            return _qa_exchange(args)
        if args.command == "demo":
            from pipeline.demo import run_demo

            return run_demo(args.root, args.data_dir, args.port, args.images, args.manifest, train=args.train)
    except PipelineError as exc:
        print(f"error: {redact_text(str(exc))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command}")
    return EXIT_USER_ERROR


def _job_spec(args: argparse.Namespace, executor, stage: str, shards: list[int], tasks: int, defaults: dict,
              failed_only: bool = False, whole_run: bool = False):
    """The executor's spec of one stage: resources and the executor's own options from the command line, else
    `defaults` (the last submission's, or the stage's declared ones)."""
    from pipeline.executors.base import executor_options

    own = executor_options(executor.spec_type)
    unsupported = [f"--{k}" for k in ("time", "partition", "account", "requeue") if getattr(args, k) and k not in own]
    if unsupported:
        raise PipelineError(f"{', '.join(unsupported)}: SLURM only; the {executor.name} executor has no such "
                            "setting (Ray reruns a task whose worker died: ray.max_retries)")
    keys = ("parallel", "cpus", "gpus", "mem", *own)
    res = {k: getattr(args, k, None) if getattr(args, k, None) is not None else defaults.get(k) for k in keys}
    return executor.spec_type(stage=stage, shards=shards, tasks=tasks, manifest=args.manifest,
                              overrides=list(args.overrides), failed_only=failed_only, whole_run=whole_run,
                              **{k: v for k, v in res.items() if v is not None and k != "dependency"})


def _executor(args: argparse.Namespace, config: RunConfig):
    from pipeline.executors import DEFAULT, get_executor

    return get_executor(args.executor or DEFAULT, config, args.address)


def _do_submit(args: argparse.Namespace, specs: list) -> int:
    """Submit one spec, or a chain in order, each after the previous one succeeded; --dry-run prints each plan.
    Every spec is checked against run.json first, so nothing is rendered that the tasks would refuse."""
    from pipeline.executors import check_against_run
    from pipeline.executors.base import JobRef
    from pipeline.storage import Storage

    config = _config(args)
    executor = _executor(args, config)
    storage = Storage(config.root, config.storage_options, config.work_dir)
    previous: JobRef | None = None
    for spec in specs:
        _check_stage(config, spec.stage)
        check_against_run(config, spec, storage)
        for note in executor.fit(spec):
            print(f"note: {note}", file=sys.stderr)
        if args.dry_run:
            if len(specs) > 1:
                print(f"# ---- {spec.stage}" + (f" (after {previous.job_id})" if previous else ""))
            sys.stdout.write(executor.plan(spec, previous))
            previous = JobRef(executor.name, f"<job id of {spec.stage}>", spec.stage)
            continue
        ref = executor.submit(spec, previous)
        for line in ref.lines:
            print(line)
        previous = ref
    if previous is not None and not args.dry_run:
        print(f"the job runs on the {executor.label} cluster: this machine may disconnect; `status` shows its shards")
    return 0


def _check_stage(config: RunConfig, stage: str) -> None:
    """A registered stage name (checked without importing the stage: login nodes stay quick)."""
    if stage not in stage_modules(config):
        raise UnknownStageError(f"unknown stage {stage!r}; known stages: {', '.join(stage_modules(config))}")


def _submit(args: argparse.Namespace) -> int:
    config = _config(args)
    stages = [s.strip() for s in args.stage.split(",") if s.strip()]
    if not stages:
        raise PipelineError("--stage names no stage")
    shards = parse_shard_spec(args.shards) if args.shards else []
    executor = _executor(args, config)
    specs = []
    for stage in stages:
        _check_stage(config, stage)
        declared = load_stage(stage, config)
        if not declared.whole_run and not shards:
            raise PipelineError(f"stage {stage!r} runs per shard: give --shards")
        defaults = executor.stage_resources(declared.needs(config), stage)
        spec = _job_spec(args, executor, stage, shards, 1 if declared.whole_run else args.tasks, defaults,
                         whole_run=declared.whole_run)
        spec.launcher = declared.launcher
        specs.append(spec)
    return _do_submit(args, specs)


def _retry(args: argparse.Namespace) -> int:
    from pipeline.executors import DEFAULT, active_executor_jobs
    from pipeline.executors.records import executor_of, last_submission
    from pipeline.status import retry_shards

    config = _config(args)
    _check_stage(config, args.stage)
    compare = args.manifest is not None or bool(args.overrides)
    if not compare:
        print(f"{args.stage}: no --manifest given: judging units by the settings their markers record "
              f"(under {config.root})", file=sys.stderr)
    universe = parse_shard_spec(args.shards) if args.shards else None
    todo = retry_shards(config, args.stage, failed_only=args.failed_only, shards=universe,
                        include_running=args.include_running, stale_after=args.stale_after, compare=compare)
    declared = load_stage(args.stage, config)
    if not todo:
        what = ("no committed shard has failed rows" if args.failed_only
                else "every unit is committed (or held by a live task)")
        print(f"{args.stage}: {what}; nothing to retry", file=sys.stderr)
        return 0
    if declared.whole_run:
        names = ", ".join(map(str, todo))
        if not args.submit:
            print(names)
            print(f"{args.stage}: whole-run unit(s) {names} not committed; `run --stage {args.stage}` redoes it "
                  "(or retry --submit)", file=sys.stderr)
            return 0
    else:
        spec_text = format_shard_spec(todo)  # type: ignore[arg-type]
        what = "committed with failed rows" if args.failed_only else "not committed"
        if not args.submit:
            print(spec_text)
            print(f"{args.stage}: {len(todo)} shard(s) {what}", file=sys.stderr)
            return 0
    if args.failed_only and declared.retry_shard is None:
        raise PipelineError(f"stage {args.stage!r} cannot redo single rows (it has no retry_shard); "
                            f"resubmit those shards with `run --force` instead")
    last = last_submission(config, args.stage) or {}
    if args.executor is None:
        args.executor = executor_of(last) if last else DEFAULT
    executor = _executor(args, config)
    active = active_executor_jobs(config, args.stage, executor.name, args.address)
    if active and not args.include_running:
        raise PipelineError(f"job(s) {', '.join(active)} of stage {args.stage!r} are still queued or running and "
                            "would run some of these shards too; wait for them (`status` shows them) or cancel "
                            "them, then retry (or pass --include-running)")
    defaults = dict(last.get("spec", {})) if last and executor_of(last) == executor.name else {}
    if args.manifest is None:
        if not defaults.get("manifest"):
            raise PipelineError("retry --submit needs the run's settings: give --manifest (no earlier submission "
                                f"of {args.stage!r} recorded one)")
        args.manifest = defaults["manifest"]
        print(f"{args.stage}: resubmitting with the manifest of the last submission: {args.manifest}",
              file=sys.stderr)
    resources = defaults or executor.stage_resources(declared.needs(config), args.stage)
    if declared.whole_run:
        spec = _job_spec(args, executor, args.stage, [], 1, resources, whole_run=True)
    else:
        tasks = args.tasks or min(int(defaults.get("tasks") or last.get("tasks") or 1), len(todo))
        spec = _job_spec(args, executor, args.stage, todo, tasks, resources,  # type: ignore[arg-type]
                         failed_only=args.failed_only)
    spec.launcher = declared.launcher
    return _do_submit(args, [spec])
