"""The `barlow` command line.

    barlow train SPEC [--set section.field=value ...]     one process, or one worker per process under torchrun
    barlow validate SPEC [--set ...] [--world-size N]    check a spec and print it resolved
    barlow schema [-o FILE]                              the spec's JSON Schema, for editors
    barlow checkpoints ls RUN_URL                        a run's checkpoints, valid and incomplete
    barlow export CHECKPOINT_URL OUT                     a checkpoint's backbone as a torchvision state_dict
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys

from service import distributed
from service.checkpoint import CheckpointError, list_checkpoints
from service.data import DataError
from service.metrics import NonFiniteLoss
from service.export import export_checkpoint
from service.spec import SpecError, StorageSpec, json_schema, load_spec, spec_to_yaml
from service.storage import StorageError

log = logging.getLogger("barlow")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="barlow", description="Barlow Twins pretraining service.")
    commands = parser.add_subparsers(dest="command", required=True)

    def with_spec(name: str, help: str) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=help, description=help)
        command.add_argument("spec", help="YAML job spec, e.g. specs/digits.yaml")
        command.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                             help="override one field, e.g. --set optim.lr_weights=0.3 (repeatable; YAML values)")
        return command

    with_spec("train", "Pretrain a backbone as the spec says.")
    validate = with_spec("validate", "Validate a spec and print it with every default filled in.")
    validate.add_argument("--world-size", type=int, default=None,
                          help="check that the global batch divides over this many workers")
    schema = commands.add_parser("schema", help="Print the spec's JSON Schema.")
    schema.add_argument("-o", "--output", help="write to this file instead of standard output")

    def with_storage(command: argparse.ArgumentParser) -> argparse.ArgumentParser:
        command.add_argument("--endpoint-url", help="S3-compatible endpoint (MinIO, Ceph, R2); default: AWS")
        command.add_argument("--region", help="S3 region")
        command.add_argument("--profile", help="AWS profile")
        return command

    checkpoints = commands.add_parser("checkpoints", help="Inspect a run's checkpoints.")
    listing = with_storage(checkpoints.add_subparsers(dest="action", required=True).add_parser(
        "ls", help="List a run's checkpoints, valid and incomplete.", description="List a run's checkpoints."))
    listing.add_argument("run", help="the run's location (run.output), e.g. s3://bucket/runs/imagenet")
    export = with_storage(commands.add_parser(
        "export", help="Write a checkpoint's backbone as a torchvision state_dict (no fc).",
        description="Write a checkpoint's backbone as a torchvision state_dict (no fc)."))
    export.add_argument("checkpoint", help="a checkpoint, e.g. s3://bucket/runs/x/checkpoints/step-000012500")
    export.add_argument("out", help="where to write the .pth file (path or URL)")
    return parser


def _storage(args: argparse.Namespace) -> StorageSpec:
    return StorageSpec(endpoint_url=args.endpoint_url, region=args.region, profile=args.profile)


def _print_checkpoints(run: str, storage: StorageSpec) -> None:
    rows = [("STEP", "EPOCH", "BATCH", "SIZE", "CREATED", "STATUS")]
    for checkpoint in list_checkpoints(run, storage):
        manifest = checkpoint.manifest or {}
        rows.append((
            str(checkpoint.step), str(manifest.get("epoch", "-")), str(manifest.get("batch_in_epoch", "-")),
            f"{checkpoint.size / 2**20:.1f} MiB" if checkpoint.manifest else "-", manifest.get("created", "-"),
            "valid" if checkpoint.valid else f"INVALID: {checkpoint.problem}",
        ))
    if len(rows) == 1:
        print(f"no checkpoints under {run}")
        return
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])


def _configure_logging() -> None:
    """The service's own log lines only (rank 0 at INFO), not those of the libraries it uses."""
    rank = os.environ.get("RANK", "0")
    handler = logging.StreamHandler()
    prefix = f"[rank {rank}] " if "RANK" in os.environ else ""
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(message)s", datefmt="%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO if rank == "0" else logging.WARNING)
    log.propagate = False


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _configure_logging()
    try:
        if args.command == "schema":
            text = json.dumps(json_schema(), indent=2)
            if args.output:
                with open(args.output, "w") as file:
                    file.write(text + "\n")
            else:
                print(text)
            return 0
        if args.command == "checkpoints":
            _print_checkpoints(args.run, _storage(args))
            return 0
        if args.command == "export":
            backbone = export_checkpoint(args.checkpoint, args.out, _storage(args))
            print(f"wrote {args.out}: {len(backbone)} tensors of the backbone, torchvision key names, no fc")
            return 0
        if args.command == "validate":
            spec = load_spec(args.spec, args.overrides, world_size=args.world_size)
            print(spec_to_yaml(spec), end="")
            return 0
        from service.trainer import train

        spec = load_spec(args.spec, args.overrides, world_size=distributed.launched_world_size())
        result = train(spec, command=shlex.join(["barlow", *sys.argv[1:]] if argv is None else ["barlow", *argv]))
        if os.environ.get("RANK", "0") == "0":
            if result.preempted:
                print(f"stopped by SIGTERM after {result.steps} steps; checkpoint under {result.output}/checkpoints; "
                      "run the same command to resume")
            else:
                print(f"done: {result.steps} steps; stats {result.output}/stats.txt; backbone {result.weights}; "
                      f"spec {result.output}/spec.yaml; checkpoints {result.output}/checkpoints")
        return 0
    except (SpecError, DataError, NonFiniteLoss, StorageError, CheckpointError) as error:
        print(f"barlow: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
