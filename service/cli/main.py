"""The `barlow` command line.

    barlow train SPEC [--set section.field=value ...]     one process, or one worker per process under torchrun
    barlow validate SPEC [--set ...] [--world-size N]    check a spec and print it resolved
    barlow schema [-o FILE]                              the spec's JSON Schema, for editors
    barlow checkpoints ls RUN_URL [--verify]             a run's checkpoints, valid, incomplete or corrupt
    barlow export CHECKPOINT_URL OUT                     a checkpoint's backbone as a torchvision state_dict
    barlow submit SPEC --scheduler local_cwd|kubernetes  launch through TorchX (and status / logs / cancel)
    barlow evaluate SPEC [--set ...]                     linear probe, finetune or kNN of a backbone (evaluation spec)
    barlow compare SPEC [--weights W]                    pretrained vs untrained networks vs raw pixels, held out
    barlow data pack SOURCE DEST                         an ImageFolder or the digits as shards at any URL
    barlow data ls URL                                   a packed data set's splits: samples, classes, shards, bytes
    barlow report RUN_URL [-o report.html]               one self-contained HTML page of a run: curves, events, spec
    barlow status JOB|RUN_URL                            a job's state and its run's progress from the run's storage
    barlow runs ls URL                                   the runs under a prefix, with their progress
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys

from service.credentials import redact_arguments

# torch and the training modules are imported where a command needs them: `barlow submit`, `validate` and
# `schema` start in a fraction of the time
from service.errors import SpecError, StorageError, UserError
from service.observe.logs import configure_logging, record_user_error
from service.spec import EvaluateSpec, StorageSpec, json_schema, load_spec, spec_kind, spec_to_yaml
from service.storage.filesystem import explain, require_exists, storage_errors

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

    train = with_spec("train", "Pretrain a backbone as the spec says.")
    evaluate = with_spec("evaluate", "Evaluate a backbone as an evaluation spec says (linear probe, finetune, kNN).")
    for command in (train, evaluate):
        command.add_argument("--force", action="store_true",
                             help="take run.output's lease from the job that holds it, without waiting for its "
                             "heartbeat to go stale (only when you know that job is gone)")
    compare = with_spec("compare", "Pretrained backbone vs the same untrained (two initialisations) vs raw pixels: "
                        "kNN, linear, few-shot.")
    compare.add_argument("--weights", help="backbone weights or checkpoint; default: the training spec's export")
    validate = with_spec("validate", "Validate a spec and print it with every default filled in.")
    validate.add_argument("--world-size", type=int, default=None,
                          help="check that the global batch divides over this many workers")
    schema = commands.add_parser("schema", help="Print the spec's JSON Schema.")
    schema.add_argument("-o", "--output", help="write to this file instead of standard output")
    schema.add_argument("--evaluation", action="store_true", help="the evaluation spec's schema (barlow evaluate)")

    def with_storage(command: argparse.ArgumentParser) -> argparse.ArgumentParser:
        command.add_argument("--endpoint-url", help="S3-compatible endpoint (MinIO, Ceph, R2); default: AWS")
        command.add_argument("--region", help="S3 region")
        command.add_argument("--profile", help="AWS profile")
        return command

    checkpoints = commands.add_parser("checkpoints", help="Inspect a run's checkpoints.")
    listing = with_storage(checkpoints.add_subparsers(dest="action", required=True).add_parser(
        "ls", help="List a run's checkpoints, valid and incomplete.", description="List a run's checkpoints."))
    listing.add_argument("run", help="the run's location (run.output), e.g. s3://bucket/runs/imagenet")
    listing.add_argument("--verify", action="store_true",
                         help="read every object and check its size and CRC32 against the manifest (exit 1 if any "
                         "checkpoint fails); without it, sizes only")
    export = with_storage(commands.add_parser(
        "export", help="Write a checkpoint's backbone as a torchvision state_dict (no fc).",
        description="Write a checkpoint's backbone as a torchvision state_dict (no fc)."))
    export.add_argument("checkpoint", help="a checkpoint, e.g. s3://bucket/runs/x/checkpoints/step-000012500")
    export.add_argument("out", help="where to write the .pth file (path or URL)")

    data = commands.add_parser("data", help="Pack a data set into shards on object storage, list one.")
    data_actions = data.add_subparsers(dest="action", required=True)
    pack = with_storage(data_actions.add_parser(
        "pack", help="Pack an ImageFolder (train/ and val/, or one folder of class folders) or `digits` into tar "
        "shards and an index at DEST (data.dataset: shards).", description="Pack an ImageFolder (train/ and val/, "
        "or one folder of class folders) or `digits` into tar shards and an index at DEST. Every image is decoded "
        "once: corrupt ones are listed and left out. A pack that stopped continues where it was; the index is "
        "written last."))
    pack.add_argument("source", help="an ImageFolder's root, or `digits` (the built-in 8x8 digits)")
    pack.add_argument("dest", help="where the packed data set goes, e.g. s3://bucket/imagenet (a path works too)")
    pack.add_argument("--shard-mb", type=float, default=512, help="shard size in MB (default 512)")
    pack.add_argument("--processes", type=int, default=None, help="packing processes (default: one per core)")
    data_list = with_storage(data_actions.add_parser("ls", help="Print a packed data set's splits.",
                                                     description="Print a packed data set's splits."))
    data_list.add_argument("url", help="a packed data set, e.g. s3://bucket/imagenet")

    submit = commands.add_parser(
        "submit", help="Launch a job through TorchX (local_cwd or Kubernetes), as torchx run would.",
        description="Read, override and validate SPEC here, then launch the barlowtwins.train (or .evaluate) "
        "component through the TorchX Runner with the project's scheduler: the same job as `torchx run -s "
        "SCHEDULER barlowtwins.train ...`, with .torchxconfig applied. The resolved spec travels inside the job.")
    submit.add_argument("spec", help="YAML job spec: a file, an fsspec URL (s3://...), or image:PATH inside the image")
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    submit.add_argument("--scheduler", choices=["local_cwd", "kubernetes"], required=True)
    submit.add_argument("--dryrun", action="store_true", help="print what would be launched, launch nothing")
    submit.add_argument("--workspace", default=None, metavar="DIR",
                        help="layer DIR over the image and push it to image_repo (TorchX workspace; Kubernetes)")
    job = submit.add_argument_group("the component's arguments (torchx run ... barlowtwins.train --help)")
    job.add_argument("--image", help="training image (Kubernetes)")
    job.add_argument("--nnodes", help="N nodes, or MIN:MAX for an elastic job")
    job.add_argument("--nproc-per-node", help="workers per node (default: one per GPU)")
    job.add_argument("--h", dest="named_resource", help="named resource, e.g. gpu_8xh100")
    job.add_argument("--gpu", help="GPUs per node")
    job.add_argument("--cpu", help="CPUs per node")
    job.add_argument("--mem-mb", help="memory per node, MiB")
    job.add_argument("--shm-mb", help="/dev/shm per node, MiB")
    job.add_argument("--max-restarts", help="worker-group restarts after a failure")
    job.add_argument("--max-retries", help="times Volcano recreates the job (or an elastic job's lost pod)")
    job.add_argument("--rdzv-port", help="port of the c10d rendezvous on the first node")
    job.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable")
    job.add_argument("--mount", action="append", default=[],
                     help="volume, e.g. type=volume,src=imagenet,dst=/data/imagenet,readonly")
    job.add_argument("--name", help="job name")
    k8s = submit.add_argument_group("Kubernetes run options (default: .torchxconfig, then the scheduler's)")
    k8s.add_argument("--queue", help="Volcano queue")
    k8s.add_argument("--namespace")
    k8s.add_argument("--service-account", help="pods' service account (IRSA)")
    k8s.add_argument("--priority-class")
    k8s.add_argument("--toleration", action="append", default=[], metavar="KEY[=VALUE]:EFFECT")
    k8s.add_argument("--node-selector", action="append", default=[], metavar="LABEL=VALUE")
    k8s.add_argument("--image-pull-secret", action="append", default=[], metavar="SECRET")
    k8s.add_argument("--credentials-secret", "--s3-secret", dest="credentials_secret", metavar="SECRET",
                     help="Secret whose keys (AWS_ACCESS_KEY_ID, ...) become the workers' environment")
    for name, help_text in (("logs", "Print a job's logs (first worker node)."), ("cancel", "Stop a job.")):
        command = commands.add_parser(name, help=help_text, description=help_text)
        command.add_argument("handle", help="the handle printed by submit, e.g. kubernetes://torchx/barlow:barlowtwins-x1")
    status = with_storage(commands.add_parser(
        "status", help="A job's state and its run's progress (step of total, loss, kNN, images/s, ETA, checkpoint).",
        description="A job's state (a TorchX handle) and its run's progress read from the run's storage, or the "
        "progress of a run given by its URL."))
    status.add_argument("target", help="the handle printed by submit (kubernetes://torchx/barlow:barlowtwins-x1), or "
                        "a run's location (run.output, e.g. s3://bucket/runs/bt)")
    runs = commands.add_parser("runs", help="List runs.")
    runs_list = with_storage(runs.add_subparsers(dest="action", required=True).add_parser(
        "ls", help="The runs under a prefix, one line each with its progress.",
        description="The runs under a prefix (folders holding a stats.txt or spec.yaml), one line each: state, step "
        "of total, last loss, kNN, images/s, ETA, newest checkpoint."))
    runs_list.add_argument("url", help="a folder or prefix of runs, e.g. s3://bucket/runs")
    report = with_storage(commands.add_parser(
        "report", help="Write one self-contained HTML report of a run (finished, running or resumed).",
        description="Write one self-contained HTML page (no network needed to view it) of a run: the loss and its "
        "two terms, the learning rates, the kNN curve, throughput and data wait, memory, the collapse signal, "
        "checkpoints, resumes and pre-emptions, the spec, and the newest cross-correlation heatmap."))
    report.add_argument("run", help="the run's location (run.output), e.g. s3://bucket/runs/bt or runs/digits")
    report.add_argument("-o", "--output", default="report.html", help="the HTML file to write (default report.html)")
    return parser


def _key_values(items: list[str], what: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError(f"{what} {item!r} is not KEY=VALUE")
        pairs[key] = value
    return pairs


# the components' arguments (barlowtwins.train / .evaluate) but the spec and its overrides, and the barlow submit
# options that give them
COMPONENT_ARGUMENTS = {"image": "image", "nnodes": "nnodes", "nproc_per_node": "nproc_per_node",
                       "h": "named_resource", "gpu": "gpu", "cpu": "cpu", "memMB": "mem_mb", "shmMB": "shm_mb",
                       "max_restarts": "max_restarts", "max_retries": "max_retries", "rdzv_port": "rdzv_port",
                       "env": "env", "mounts": "mount", "name": "name"}


def _run_options(args: argparse.Namespace) -> dict:
    if args.scheduler != "kubernetes":
        return {}
    options = {"queue": args.queue, "namespace": args.namespace, "service_account": args.service_account,
               "priority_class": args.priority_class, "tolerations": args.toleration or None,
               "node_selector": _key_values(args.node_selector, "--node-selector") or None,
               "image_pull_secrets": args.image_pull_secret or None, "credentials_secret": args.credentials_secret}
    return {key: value for key, value in options.items() if value is not None}


def _submit(args: argparse.Namespace) -> int:
    from service.launch.submit import Submission

    arguments = {parameter: getattr(args, option) for parameter, option in COMPONENT_ARGUMENTS.items()}
    submission = Submission.prepare(args.spec, arguments, args.overrides, args.scheduler, _run_options(args),
                                    workspace=args.workspace)
    if args.dryrun:
        print(submission.describe(), end="")
        return 0
    handle = submission.create()
    print(handle, flush=True)
    if args.scheduler == "kubernetes":
        return 0
    state = submission.follow(handle)
    print(f"{handle}: {state}")
    return 0 if state == "SUCCEEDED" else 1


def _manage(args: argparse.Namespace) -> int:
    from torchx.runner import get_runner

    from service.launch.submit import stream_logs

    runner = get_runner()
    if args.command == "logs":
        stream_logs(runner, args.handle)
    else:
        runner.cancel(args.handle)
        print(f"{args.handle}: cancelled")
    return 0


def _storage(args: argparse.Namespace) -> StorageSpec:
    return StorageSpec(endpoint_url=args.endpoint_url, region=args.region, profile=args.profile)


def _print_checkpoints(run: str, storage: StorageSpec, verify: bool) -> int:
    """The run's checkpoints, one row each; with `verify`, every byte checked. 1 when a checkpoint fails it."""
    from service.checkpoint.catalog import list_checkpoints, verify_checkpoint

    rows = [("STEP", "EPOCH", "BATCH", "SIZE", "CREATED", "RUN", "STATUS")]
    corrupt = False
    for checkpoint in list_checkpoints(run, storage):
        if verify and checkpoint.valid:
            checkpoint = verify_checkpoint(checkpoint.url, storage)
            corrupt |= not checkpoint.valid
        manifest = checkpoint.manifest or {}
        status = ("verified" if verify else "valid") if checkpoint.valid else (
            f"{'CORRUPT' if checkpoint.manifest else 'INVALID'}: {checkpoint.problem}")
        rows.append((
            str(checkpoint.step), str(manifest.get("epoch", "-")), str(manifest.get("batch_in_epoch", "-")),
            f"{checkpoint.size / 2**20:.1f} MiB" if checkpoint.manifest else "-", manifest.get("created", "-"),
            checkpoint.run_id or "-", status,
        ))
    if len(rows) == 1:
        require_exists(run, storage)  # a missing bucket, or no such run, is an error, not an empty listing
        print(f"no checkpoints under {run}")
        return 0
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    return 1 if corrupt else 0


def _data(args: argparse.Namespace) -> int:
    from service.data.pack import pack
    from service.data.shard_reader import read_index, split_url

    storage = _storage(args)
    if args.action == "pack":
        reports = pack(args.source, args.dest, storage, shard_bytes=int(args.shard_mb * 10**6),
                       processes=args.processes, progress=sys.stderr.isatty())
        for report in reports:
            left_out = report.index.meta["left_out"]
            print(f"{args.dest}/{report.split}: {len(report.index)} images, {len(report.index.classes)} classes, "
                  f"{len(report.index.shards)} shards ({report.resumed_shards} from an earlier pack), "
                  f"{report.index.total_bytes / 1e6:.1f} MB; {len(left_out)} left out"
                  + "".join(f"\n  left out {item['name']}: {item['error']}" for item in left_out))
        return 0
    from service.data.pack import PLAN
    from service.data.shards import INDEX
    from service.storage.filesystem import filesystem

    fs, path = filesystem(args.url, storage)
    splits = [split for split in ("train", "val") if fs.exists(f"{path}/{split}")]
    if not splits:
        require_exists(args.url, storage)
        raise StorageError(f"{args.url}: no train/ or val/ split here: is it a packed data set?")
    for split in splits:
        if fs.exists(f"{path}/{split}/{PLAN}") and not fs.exists(f"{path}/{split}/{INDEX}"):
            print(f"{split}: packing did not finish (no index yet): run barlow data pack again to complete it")
            continue
        index = read_index(split_url(args.url, split), storage)
        print(f"{split}: {len(index)} images, {len(index.classes)} classes, {len(index.shards)} shards, "
              f"{index.total_bytes / 1e6:.1f} MB, {len(index.meta['left_out'])} left out at packing; classes "
              f"{', '.join(index.classes[:5])}{', ...' if len(index.classes) > 5 else ''}")
    return 0


def _evaluate(args: argparse.Namespace, argv: list[str] | None) -> int:
    from service.evaluation.evaluate import evaluate

    spec = load_spec(args.spec, args.overrides, kind=EvaluateSpec)
    configure_logging(spec.run.log_format)
    result = evaluate(spec, command=shlex.join(["barlow", *redact_arguments(sys.argv[1:] if argv is None else argv)]),
                      force=args.force)
    if os.environ.get("RANK", "0") == "0":
        print(f"{result.mode}: top-1 {result.acc1:.2f} top-5 {result.acc5:.2f} (best {result.best_acc1:.2f} / "
              f"{result.best_acc5:.2f}) on {result.train_images} training images; {result.output}/results.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging()
    try:
        if args.command == "schema":
            text = json.dumps(json_schema(EvaluateSpec if args.evaluation else None), indent=2)
            if args.output:
                with open(args.output, "w") as file:
                    file.write(text + "\n")
            else:
                print(text)
            return 0
        if args.command == "submit":
            return _submit(args)
        if args.command in ("logs", "cancel"):
            return _manage(args)
        if args.command == "status":
            from service.reports.progress import print_status

            return print_status(args.target, _storage(args))
        if args.command == "runs":
            from service.reports.progress import print_runs

            return print_runs(args.url, _storage(args))
        if args.command == "report":
            from service.reports.report import write_report

            print(write_report(args.run, args.output, _storage(args)))
            return 0
        if args.command == "data":
            return _data(args)
        if args.command == "checkpoints":
            return _print_checkpoints(args.run, _storage(args), args.verify)
        if args.command == "export":
            from service.checkpoint.export import export_checkpoint

            backbone = export_checkpoint(args.checkpoint, args.out, _storage(args))
            print(f"wrote {args.out}: {len(backbone)} tensors of the backbone, torchvision key names, no fc")
            return 0
        if args.command == "validate":
            spec = load_spec(args.spec, args.overrides, world_size=args.world_size, kind=spec_kind(args.spec))
            print(spec_to_yaml(spec), end="")
            return 0
        if args.command == "evaluate":
            return _evaluate(args, argv)
        if args.command == "compare":
            from service.checkpoint.export import exported_weights_url
            from service.evaluation.compare import compare, format_table

            spec = load_spec(args.spec, args.overrides)
            weights = args.weights or exported_weights_url(spec)
            print(f"{spec.model.backbone} pretrained ({weights}) vs the same untrained (torchvision's default init; "
                  "the pretraining's zero-init residual) vs raw pixels, frozen, on the held-out split")
            print(format_table(compare(spec, weights)))
            return 0
        from service.runtime import distributed
        from service.train.trainer import train

        spec = load_spec(args.spec, args.overrides, world_size=distributed.launched_world_size())
        configure_logging(spec.run.log_format)
        result = train(spec, command=shlex.join(["barlow", *redact_arguments(sys.argv[1:] if argv is None else argv)]),
                       force=args.force)
        if not result.last_checkpoint_committed:
            print(f"barlow: the checkpoint of step {result.steps} was not committed (steps {result.failed_checkpoints} "
                  f"failed; see the log above), so the run's end is not saved and nothing was exported: run the same "
                  "command again to resume from the newest committed checkpoint", file=sys.stderr)
            return 3
        if os.environ.get("RANK", "0") == "0":
            if result.preempted:
                print(f"stopped by SIGTERM after {result.steps} steps; checkpoint under {result.output}/checkpoints; "
                      "run the same command to resume")
            else:
                print(f"done: {result.steps} steps; stats {result.output}/stats.txt; backbone {result.weights}; "
                      f"spec {result.output}/spec.yaml; checkpoints {result.output}/checkpoints")
        return 0
    except UserError as error:
        print(f"barlow: {error}", file=sys.stderr)
        record_user_error(f"barlow: {error}")
        return 2
    except storage_errors() as error:  # reading a run or a checkpoint: bad credentials, endpoint, bucket
        where = {"checkpoints": "run", "export": "checkpoint", "report": "run", "runs": "url",
                 "status": "target"}.get(args.command)
        if args.command == "data":
            where = "url" if args.action == "ls" else "dest"
        if where is None:
            raise
        print(f"barlow: {explain(getattr(args, where), error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
