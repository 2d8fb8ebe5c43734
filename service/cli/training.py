"""`barlow train`, `barlow evaluate` and `barlow compare`: the commands that run a network.

torch and the training modules are imported inside the handlers, so that the commands that need none of them
(`submit`, `validate`, `schema`) start fast.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from service.credentials import redact_arguments
from service.observe.logs import configure_logging
from service.run.layout import RESULTS, SPEC, STATS, checkpoints_url, under
from service.spec import EvaluateSpec, load_spec


def _command_line(argv: list[str] | None) -> str:
    """The command as the run records it (stats.txt's first line), with any credential redacted."""
    return shlex.join(["barlow", *redact_arguments(sys.argv[1:] if argv is None else argv)])


def train_command(args: argparse.Namespace, argv: list[str] | None) -> int:
    from service.runtime import distributed
    from service.train.trainer import train

    spec = load_spec(args.spec, args.overrides, world_size=distributed.launched_world_size())
    configure_logging(spec.run.log_format)
    result = train(spec, command=_command_line(argv), force=args.force)
    if not result.last_checkpoint_committed:
        print(f"barlow: the checkpoint of step {result.steps} was not committed (steps {result.failed_checkpoints} "
              f"failed; see the log above), so the run's end is not saved and nothing was exported: run the same "
              "command again to resume from the newest committed checkpoint", file=sys.stderr)
        return 3
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary for the job, not one per worker
        if result.preempted:
            print(f"stopped by SIGTERM after {result.steps} steps; checkpoint under {checkpoints_url(result.output)}; "
                  "run the same command to resume")
        else:
            print(f"done: {result.steps} steps; stats {under(result.output, STATS)}; backbone {result.weights}; "
                  f"spec {under(result.output, SPEC)}; checkpoints {checkpoints_url(result.output)}")
    return 0


def evaluate_command(args: argparse.Namespace, argv: list[str] | None) -> int:
    from service.evaluation.evaluate import evaluate

    spec = load_spec(args.spec, args.overrides, kind=EvaluateSpec)
    configure_logging(spec.run.log_format)
    result = evaluate(spec, command=_command_line(argv), force=args.force)
    if os.environ.get("RANK", "0") == "0":
        print(f"{result.mode}: top-1 {result.acc1:.2f} top-5 {result.acc5:.2f} (best {result.best_acc1:.2f} / "
              f"{result.best_acc5:.2f}) on {result.train_images} training images; {under(result.output, RESULTS)}")
    return 0


def compare_command(args: argparse.Namespace, argv: list[str] | None) -> int:
    from service.checkpoint.export import exported_weights_url
    from service.evaluation.compare import compare, format_table

    spec = load_spec(args.spec, args.overrides)
    weights = args.weights or exported_weights_url(spec)
    print(f"{spec.model.backbone} pretrained ({weights}) vs the same untrained (torchvision's default init; "
          "the pretraining's zero-init residual) vs raw pixels, frozen, on the held-out split")
    print(format_table(compare(spec, weights)))
    return 0
