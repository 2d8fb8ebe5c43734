"""Data-loading benchmark: packed shards read by index from S3 (ours) against webdataset's streaming reader of the
same tar shards, in one run, behind a proxy that gives every S3 request 20-40 ms of latency.

    .venv/bin/python bench/data_loading.py                 # 1,200 JPEGs of 400x350, 2 loader processes
    .venv/bin/python bench/data_loading.py --images 200    # quick (CI proves the script works)

S3 is the moto server behind tests/s3_proxy.py: moto on loopback answers in about a millisecond, which would hide
a reader that waits for one request at a time. Our shards are plain tars (`<key>.jpeg`, `<key>.cls`), so webdataset
reads the very same objects, each streamed whole through curl (`pipe:curl`, its documented way for HTTP/S3).
Rows: fetch only (bytes, no decoding), then end to end (decoding and the reference's two 224 px views per image),
cold, and for ours with the node-local shard cache warm; each the second pass of its loader (the first starts its
processes and connections), so nothing but the node-local cache is warm; the local folder (torchvision
ImageFolder on this disk) is the baseline the warm cache is held to. Batch wait is the time the consumer blocks in
next(loader).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.data.datasets import ImageFolder  # noqa: E402
from service.data.loader import GlobalBatchSampler, LoaderSettings, two_view_loader  # noqa: E402
from service.data.pack import pack  # noqa: E402
from service.data.shard_cache import ShardCache  # noqa: E402
from service.data.shard_reader import ShardedImages  # noqa: E402
from service.method.transforms import two_view_pipelines  # noqa: E402
from service.spec import AugmentSpec, StorageSpec  # noqa: E402
from service.storage.filesystem import fsspec_options  # noqa: E402
from tests.support.s3_proxy import S3Proxy  # noqa: E402
from tests.support.s3_server import TEST_CREDENTIALS, S3Server  # noqa: E402

BUCKET = "bench"


def make_jpegs(root: Path, count: int, classes: int = 10) -> int:
    """Photographs stand-ins: smooth colour fields with texture, 400x350 at quality 90 (~40-60 KB, ImageNet's
    ~110 KB at 500x375 scaled by area). Returns the bytes written."""
    rng = np.random.default_rng(0)
    total = 0
    for i in range(count):
        folder = root / "train" / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        y, x = np.mgrid[0:350, 0:400] / 60.0
        phase = rng.uniform(0, 6.3, size=3)
        field = np.stack([np.sin(x * (1 + c) + y + phase[c]) for c in range(3)], axis=-1) * 90 + 128
        pixels = np.clip(field + rng.normal(0, 18, field.shape), 0, 255).astype(np.uint8)
        path = folder / f"{i:05d}.jpg"
        PIL.Image.fromarray(pixels).save(path, quality=90)
        total += path.stat().st_size
    return total


class FetchOnly(Dataset):
    """Our reader's bytes without decoding: the batch's samples fetched concurrently, their sizes returned."""

    def __init__(self, images: ShardedImages):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[int]:
        return [len(data) for data in self.images.fetch([index for _, index in keys])]  # type: ignore[arg-type]


def measure(batches: Iterable, images_of) -> dict:
    """Images/s over the whole pass, and every wait for the next batch."""
    waits, images = [], 0
    start = last = time.perf_counter()
    for batch in batches:
        now = time.perf_counter()
        waits.append(now - last)
        images += images_of(batch)
        last = time.perf_counter()
    elapsed = time.perf_counter() - start
    waits.sort()
    return dict(images=images, seconds=elapsed, rate=images / elapsed, p50=statistics.median(waits),
                p99=waits[min(len(waits) - 1, int(0.99 * len(waits)))])


def our_fetch(shards: ShardedImages, batch: int, workers: int):
    sampler = GlobalBatchSampler(len(shards), batch, 0, 1, seed=0)
    return DataLoader(FetchOnly(shards), batch_sampler=sampler, num_workers=workers, collate_fn=list,
                      persistent_workers=workers > 0)


def our_views(images, batch: int, workers: int):
    loader, _ = two_view_loader(images, two_view_pipelines(AugmentSpec(), 224), global_batch=batch, rank=0,
                                world_size=1, seed=0, settings=LoaderSettings(workers, 2 if workers else None, False))
    return loader


def webdataset_urls(proxy: S3Proxy, shards: ShardedImages, prefix: str) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=proxy.endpoint_url)
    return [f"pipe:curl -s -f '{s3.generate_presigned_url('get_object', Params=dict(Bucket=BUCKET, Key=f'{prefix}/{key}'), ExpiresIn=3600)}'"  # noqa: E501
            for key in shards.index.shards]


def webdataset_loader(urls: list[str], batch: int, workers: int, decode: bool):
    import webdataset as wds

    views = two_view_pipelines(AugmentSpec(), 224)

    def two_views(sample):
        image = torch.from_numpy(np.asarray(sample[0], dtype=np.uint8)).permute(2, 0, 1)
        return views[0](image), views[1](image)

    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).shuffle(1000, initial=1000)
    if decode:
        dataset = dataset.decode("pil").to_tuple("jpg;jpeg", "cls").map(two_views)
    else:
        dataset = dataset.to_tuple("jpg;jpeg", "cls").map(lambda sample: len(sample[0]))
    dataset = dataset.batched(batch, partial=False, **({} if decode else dict(collation_fn=list)))
    return wds.WebLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=workers > 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="loader processes (each reader)")
    parser.add_argument("--shard-mb", type=float, default=4.0)
    parser.add_argument("--latency-ms", type=float, nargs=2, default=(20.0, 40.0))
    args = parser.parse_args()
    os.environ.update(TEST_CREDENTIALS)
    server = S3Server().start()
    work = tempfile.TemporaryDirectory()
    try:
        root = Path(work.name)
        source_bytes = make_jpegs(root / "folder", args.images)
        server.create_bucket(BUCKET)
        pack(str(root / "folder"), f"s3://{BUCKET}/data", StorageSpec(endpoint_url=server.endpoint_url),
             shard_bytes=int(args.shard_mb * 1e6), progress=False)
        # memory: the proxy answers from copies of the objects, so that moto's request rate does not stand in for S3's
        with S3Proxy(server.endpoint_url, min_ms=args.latency_ms[0], max_ms=args.latency_ms[1], memory=True) \
                as proxy:
            storage = StorageSpec(endpoint_url=proxy.endpoint_url)
            url = f"s3://{BUCKET}/data/train"
            shards = ShardedImages(url, storage)
            urls = webdataset_urls(proxy, shards, "data/train")
            mb = source_bytes / args.images / 1e6
            rows = []

            def run(name: str, batches, images_of, requests: bool = True) -> dict:
                for _ in batches:  # a first pass starts the loader processes and their connections: not measured
                    pass
                proxy.reset()
                result = measure(batches, images_of)  # the second pass: steady state, every byte read again
                result["requests"] = proxy.stats()["requests"].get("GET", 0) if requests else "-"
                rows.append((name, result))
                return result

            count = len  # a batch of sizes, or a (views, views, replaced) batch: its length is images
            ours_fetch = run("ours, fetch only", our_fetch(shards, args.batch, args.workers), count)
            wds_fetch = run("webdataset, fetch only", webdataset_loader(urls, args.batch, args.workers, False), count)
            ours_cold = run("ours, end to end, cold", our_views(shards, args.batch, args.workers),
                            lambda b: len(b[0]))
            wds_cold = run("webdataset, end to end", webdataset_loader(urls, args.batch, args.workers, True),
                           lambda b: len(b[0]))
            cached = ShardedImages(url, storage)
            cached.cache = ShardCache(str(root / "cache"), 10**12, url, cached.index, fsspec_options(url, storage))
            cached.fetch(list(range(len(cached))))  # starts the filler; wait until every shard is local
            while not all(cached.cache.local_path(n).exists() for n in range(len(cached.index.shards))):
                time.sleep(0.1)
            ours_warm = run("ours, end to end, shard cache warm", our_views(cached, args.batch, args.workers),
                            lambda b: len(b[0]))
            local = run("local folder (ImageFolder), end to end", our_views(ImageFolder(str(root / "folder")),
                                                                           args.batch, args.workers),
                        lambda b: len(b[0]), requests=False)
    finally:
        server.stop()
        work.cleanup()

    print(f"{args.images} JPEGs ({mb * 1e3:.0f} KB each on average) in {len(shards.index.shards)} shards; "
          f"{args.workers} loader processes, batch {args.batch}, {args.latency_ms[0]:.0f}-{args.latency_ms[1]:.0f} ms "
          f"per S3 request, {os.cpu_count()} cores\n")
    print("| reader | images/s | MB/s | batch wait p50 / p99 (ms) | GET requests per epoch |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in rows:
        print(f"| {name} | {r['rate']:.0f} | {r['rate'] * mb:.1f} | {r['p50'] * 1e3:.0f} / {r['p99'] * 1e3:.0f} | "
              f"{r['requests']} |")
    print(f"\nours / webdataset: fetch only {ours_fetch['rate'] / wds_fetch['rate']:.2f}, end to end cold "
          f"{ours_cold['rate'] / wds_cold['rate']:.2f}; ours with the cache warm / local folder "
          f"{ours_warm['rate'] / local['rate']:.2f}")


if __name__ == "__main__":
    main()
