"""`barlow data pack` (an ImageFolder or the digits as tar shards at any URL) and `barlow data ls` (a packed data
set's splits)."""

from __future__ import annotations

import argparse
import sys

from service.cli.parser import storage_spec
from service.errors import StorageError
from service.storage.filesystem import filesystem, require_exists


def data_command(args: argparse.Namespace, argv: list[str] | None) -> int:
    return pack_command(args) if args.action == "pack" else list_command(args)


def pack_command(args: argparse.Namespace) -> int:
    from service.data.pack import pack

    reports = pack(args.source, args.dest, storage_spec(args), shard_bytes=int(args.shard_mb * 10**6),
                   processes=args.processes, progress=sys.stderr.isatty())  # no progress bar in a log file
    for report in reports:
        left_out = report.index.meta["left_out"]
        print(f"{args.dest}/{report.split}: {len(report.index)} images, {len(report.index.classes)} classes, "
              f"{len(report.index.shards)} shards ({report.resumed_shards} from an earlier pack), "
              f"{report.index.total_bytes / 1e6:.1f} MB; {len(left_out)} left out"
              + "".join(f"\n  left out {item['name']}: {item['error']}" for item in left_out))
    return 0


def list_command(args: argparse.Namespace) -> int:
    from service.data.pack import PLAN
    from service.data.shard_reader import read_index, split_url
    from service.data.shards import INDEX

    storage = storage_spec(args)
    fs, path = filesystem(args.url, storage)
    splits = [split for split in ("train", "val") if fs.exists(f"{path}/{split}")]
    if not splits:
        require_exists(args.url, storage)  # a missing bucket or URL says so, before "not a packed data set"
        raise StorageError(f"{args.url}: no train/ or val/ split here: is it a packed data set?")
    for split in splits:
        # the pack's plan without its index: a pack that stopped half-way, which the same pack command completes
        if fs.exists(f"{path}/{split}/{PLAN}") and not fs.exists(f"{path}/{split}/{INDEX}"):
            print(f"{split}: packing did not finish (no index yet): run barlow data pack again to complete it")
            continue
        index = read_index(split_url(args.url, split), storage)
        print(f"{split}: {len(index)} images, {len(index.classes)} classes, {len(index.shards)} shards, "
              f"{index.total_bytes / 1e6:.1f} MB, {len(index.meta['left_out'])} left out at packing; classes "
              f"{', '.join(index.classes[:5])}{', ...' if len(index.classes) > 5 else ''}")
    return 0
