"""`barlow checkpoints ls` (a run's checkpoints as a table) and `barlow export` (a run's backbone as a model folder,
or as one weights file)."""

from __future__ import annotations

import argparse

from service.cli.parser import storage_spec
from service.errors import UserError
from service.spec import StorageSpec
from service.storage.filesystem import require_exists

HEADER = ("STEP", "EPOCH", "BATCH", "SIZE", "CREATED", "RUN", "STATUS")


def checkpoints_command(args: argparse.Namespace, argv: list[str] | None) -> int:
    return print_checkpoints(args.run, storage_spec(args), args.verify)


def print_checkpoints(run: str, storage: StorageSpec, verify: bool) -> int:
    """The run's checkpoints, one row each; with `verify`, every byte checked. 1 when a checkpoint fails it."""
    from service.checkpoint.catalog import list_checkpoints, verify_checkpoint

    rows: list[tuple[str, ...]] = [HEADER]
    corrupt = False
    for checkpoint in list_checkpoints(run, storage):
        if verify and checkpoint.valid:  # an invalid one already says why: reading its bytes would add nothing
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
    print(format_table(rows))
    return 1 if corrupt else 0


def format_table(rows: list[tuple[str, ...]]) -> str:
    """Columns aligned; the last one (a problem can be long) is not padded."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1]
                     for row in rows)


def export_command(args: argparse.Namespace, argv: list[str] | None) -> int:
    from service.checkpoint.export import WEIGHT_SUFFIXES, export_checkpoint
    from service.export.folder import checkpoint_to_export, export_folder

    storage = storage_spec(args)
    if args.dest.endswith(WEIGHT_SUFFIXES):  # one file, the form its suffix names
        if args.formats or args.with_projector:
            raise UserError(f"{args.dest} names one weights file: --format and --with-projector are for a folder")
        backbone = export_checkpoint(checkpoint_to_export(args.source, storage), args.dest, storage)
        print(f"wrote {args.dest}: {len(backbone)} tensors of the backbone, torchvision key names, no fc")
        return 0
    exported = export_folder(args.source, args.dest, storage, tuple(dict.fromkeys(args.formats or ["safetensors"])),
                             args.with_projector)
    difference = exported.onnx_max_difference
    checked = "" if difference is None else (
        f"; model.onnx checked in onnxruntime: largest difference from PyTorch {difference:.3g}")
    print(f"wrote {exported.dest} from {exported.checkpoint}: {', '.join(exported.files)}{checked}")
    return 0
