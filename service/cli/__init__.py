"""The `barlow` command line: `main` is its entry point (pyproject's `barlow` script and `python -m service`).

    barlow train SPEC [--set section.field=value ...]     one process, or one worker per process under torchrun
    barlow validate SPEC [--set ...] [--world-size N]    check a spec and print it resolved
    barlow schema [-o FILE]                              the spec's JSON Schema, for editors
    barlow checkpoints ls RUN_URL [--verify]             a run's checkpoints, valid, incomplete or corrupt
    barlow export RUN_OR_CHECKPOINT DEST [--format F]    a model folder: safetensors, config.json, model card, ONNX
    barlow submit SPEC --scheduler local_cwd|kubernetes|jobset  launch through TorchX (and status / logs / cancel)
    barlow evaluate SPEC [--set ...]                     linear probe, finetune or kNN of a backbone (evaluation spec)
    barlow compare SPEC [--weights W]                    pretrained vs untrained networks vs raw pixels, held out
    barlow data pack SOURCE DEST                         an ImageFolder or the digits as shards at any URL
    barlow data ls URL                                   a packed data set's splits: samples, classes, shards, bytes
    barlow report RUN_URL [-o report.html]               one self-contained HTML page of a run: curves, events, spec
    barlow status JOB|RUN_URL                            a job's state and its run's progress from the run's storage
    barlow runs ls URL                                   the runs under a prefix, with their progress

parser.py holds every command's arguments; main.py dispatches to the handlers: training.py (train, evaluate,
compare), specs.py (validate, schema), checkpoints.py (checkpoints ls, export), data.py (data pack, data ls),
jobs.py (submit, logs, cancel), runs.py (status, runs ls, report).
"""

from service.cli.main import main

__all__ = ["main"]
