"""`barlow`'s arguments: every command, its options, help texts and defaults (`build_parser`), and the storage
options several commands share (`with_storage` adds them, `storage_spec` reads them back)."""

from __future__ import annotations

import argparse

from service.spec import StorageSpec


def with_storage(command: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of a command that reads a URL: the spec's `storage` section for a command that has no spec."""
    command.add_argument("--endpoint-url", help="S3-compatible endpoint (MinIO, Ceph, R2); default: AWS")
    command.add_argument("--region", help="S3 region")
    command.add_argument("--profile", help="AWS profile")
    return command


def storage_spec(args: argparse.Namespace) -> StorageSpec:
    return StorageSpec(endpoint_url=args.endpoint_url, region=args.region, profile=args.profile)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; each command's handler is `service.cli.main.COMMANDS[command]`."""
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

    checkpoints = commands.add_parser("checkpoints", help="Inspect a run's checkpoints.")
    listing = with_storage(checkpoints.add_subparsers(dest="action", required=True).add_parser(
        "ls", help="List a run's checkpoints, valid and incomplete.", description="List a run's checkpoints."))
    listing.add_argument("run", help="the run's location (run.output), e.g. s3://bucket/runs/imagenet")
    listing.add_argument("--verify", action="store_true",
                         help="read every object and check its size and CRC32 against the manifest (exit 1 if any "
                         "checkpoint fails); without it, sizes only")
    export = with_storage(commands.add_parser(
        "export", help="Write a run's backbone as a model folder: weights, config.json and a model card.",
        description="Write the backbone of a run's newest valid checkpoint (or of the checkpoint named) as a model "
        "folder: model.safetensors (torchvision key names, no fc), config.json and README.md (the model card), "
        "written whole or not at all. A DEST ending in .pth or .safetensors writes that one file instead."))
    export.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                        help="a run's output (run.output) or one of its checkpoints, e.g. runs/digits or "
                        "s3://bucket/runs/x/checkpoints/step-000012500")
    export.add_argument("dest", metavar="DEST", help="a new folder (path or URL), or a .pth / .safetensors file")
    export.add_argument("--format", dest="formats", action="append", choices=["safetensors", "pth", "onnx"],
                        help="safetensors (the default), pth (<backbone>.pth, torch.save as the reference's "
                        "resnet50.pth) or onnx (model.onnx beside the safetensors weights, checked in onnxruntime; "
                        "needs the extra [onnx]); repeat for several")
    export.add_argument("--with-projector", action="store_true",
                        help="also write the projector's weights (projector.safetensors or projector.pth)")

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
        "submit", help="Launch a job through TorchX (local_cwd, Kubernetes with Volcano, or a JobSet for Kueue), as "
        "torchx run would.",
        description="Read, override and validate SPEC here, then launch the barlowtwins.train (or .evaluate) "
        "component through the TorchX Runner with the project's scheduler: the same job as `torchx run -s "
        "SCHEDULER barlowtwins.train ...`, with .torchxconfig applied. The resolved spec travels inside the job.")
    submit.add_argument("spec", help="YAML job spec: a file, an fsspec URL (s3://...), or image:PATH inside the image")
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    submit.add_argument("--scheduler", choices=["local_cwd", "kubernetes", "jobset"], required=True,
                        help="local_cwd: this machine; kubernetes: a Volcano Job; jobset: a JobSet (Kueue)")
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
    job.add_argument("--max-retries", help="times the cluster recreates the job after a failure (Volcano: an elastic "
                     "job's lost pod alone)")
    job.add_argument("--rdzv-port", help="port of the c10d rendezvous on the first node")
    job.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable")
    job.add_argument("--mount", action="append", default=[],
                     help="volume, e.g. type=volume,src=imagenet,dst=/data/imagenet,readonly")
    job.add_argument("--name", help="job name")
    k8s = submit.add_argument_group("Kubernetes run options (default: .torchxconfig, then the scheduler's)")
    k8s.add_argument("--queue", help="Volcano queue (kubernetes) or Kueue LocalQueue (jobset; none: no Kueue)")
    k8s.add_argument("--namespace")
    k8s.add_argument("--service-account", help="pods' service account (IRSA)")
    k8s.add_argument("--priority-class", help="the pods' PriorityClass (kubernetes) or Kueue WorkloadPriorityClass "
                     "(jobset)")
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
    status.add_argument("target", help="the handle printed by submit (kubernetes://torchx/barlow:barlowtwins-x1, "
                        "jobset://...), or a run's location (run.output, e.g. s3://bucket/runs/bt)")
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
