"""The command line: run | status | demo (submit, retry and browse arrive with their stages)."""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.config import RunConfig, load_config
from pipeline.errors import PipelineError
from pipeline.runner import EXIT_USER_ERROR
from pipeline.shards import parse_shard_spec


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", "-m", help="run manifest YAML (e.g. manifests/demo.yaml); defaults apply without one")
    p.add_argument("--root", help="storage root: a local path or fsspec URL such as s3://bucket/run (overrides the manifest)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a manifest field, e.g. --set annotate.captioner.batch_size=16 (repeatable)")


def _config(args: argparse.Namespace) -> RunConfig:
    return load_config(args.manifest, args.overrides, root=args.root)


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
    run.add_argument("--stage", "-s", required=True, help="stage name: download, qa, train, annotate, evaluate")
    run.add_argument("--shards", required=True, help="shard spec: '0-999', '3,7,10-12' or '5'")
    _add_config_args(run)
    run.add_argument("--force", action="store_true", help="redo shards even if committed")
    run.add_argument("--failed-only", action="store_true",
                     help="for committed shards with failed rows, redo only those rows (stages with retry_shard, "
                          "e.g. download); uncommitted shards run as usual")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    status = sub.add_parser("status", help="committed / failed / running shards per stage, read from ROOT alone")
    _add_config_args(status)
    status.add_argument("--stage", help="only this stage")

    demo = sub.add_parser("demo", help="render the demo world, serve it on 127.0.0.1 and run every stage on CPU")
    demo.add_argument("--root", default=None, help="where the demo run goes (default: the demo manifest's ./demo_run)")
    demo.add_argument("--data-dir", default="demo_data", help="where the demo images and URL list go")
    demo.add_argument("--port", type=int, default=8765, help="HTTP port on 127.0.0.1 for the demo images")
    demo.add_argument("--images", type=int, default=60, help="number of demo scenes")
    demo.add_argument("--manifest", "-m", default=None, help="manifest (default: manifests/demo.yaml)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command is None:
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        if args.command == "run":
            from pipeline.runner import run_stage

            shards = parse_shard_spec(args.shards)
            report = run_stage(_config(args), args.stage, shards, force=args.force,
                               failed_only=args.failed_only, progress=not args.no_progress)
            return report.exit_code
        if args.command == "status":
            from pipeline.status import print_status

            return print_status(_config(args), args.stage)
        if args.command == "demo":
            from pipeline.demo import run_demo

            return run_demo(args.root, args.data_dir, args.port, args.images, args.manifest)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command}")
    return EXIT_USER_ERROR
