"""The S3 proxy (tests/support/s3_proxy.py) as plain clients see it: S3 through it, its latency, each fault, its
stats."""

import http.client
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import boto3
import fsspec
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, ConnectionClosedError

from tests.support.s3_proxy import S3Proxy

DATA = bytes(range(256)) * 64  # 16 KiB, every offset's byte known


@pytest.fixture(scope="module")
def proxy(s3_server):
    with S3Proxy(s3_server.endpoint_url, min_ms=20, max_ms=40) as started:
        yield started


@pytest.fixture
def obj(proxy, s3_server, s3_bucket):
    """(bucket, key) of DATA, written behind the proxy's back; the proxy's rules and stats start from nothing."""
    bucket, key = s3_bucket.removeprefix("s3://"), "shards/shard-0001.tar"
    boto3.client("s3", endpoint_url=s3_server.endpoint_url).put_object(Bucket=bucket, Key=key, Body=DATA)
    proxy.reset()
    return bucket, key


def client(proxy, **config):
    """boto3 through the proxy, without retries: each call is one request."""
    return boto3.client("s3", endpoint_url=proxy.endpoint_url,
                        config=Config(retries={"mode": "standard", "total_max_attempts": 1}, **config))


def presigned(proxy, bucket, key):
    """A GET URL a plain HTTP client can use (moto refuses anonymous reads of a private object)."""
    return client(proxy).generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key})


def plain_get(proxy, bucket, key, headers=None):
    """A GET with urllib: the response, its body not read."""
    return urllib.request.urlopen(urllib.request.Request(presigned(proxy, bucket, key), headers=headers or {}),
                                  timeout=10)


def test_boto3_put_get_list_and_ranges(proxy, obj):
    bucket, _ = obj
    s3, big = client(proxy), DATA * 160  # 2.5 MiB: more than aiohttp reads into memory by default
    s3.put_object(Bucket=bucket, Key="through/proxy.bin", Body=big)
    assert s3.head_object(Bucket=bucket, Key="through/proxy.bin")["ContentLength"] == len(big)
    assert s3.get_object(Bucket=bucket, Key="through/proxy.bin")["Body"].read() == big
    listed = s3.list_objects_v2(Bucket=bucket)["Contents"]
    assert sorted(o["Key"] for o in listed) == ["shards/shard-0001.tar", "through/proxy.bin"]
    ranged = s3.get_object(Bucket=bucket, Key="through/proxy.bin", Range="bytes=1000-4999")
    assert ranged["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert ranged["Body"].read() == big[1000:5000]
    stats = proxy.stats()
    assert stats["requests"] == {"PUT": 1, "HEAD": 1, "GET": 3}
    assert stats["range_gets"] == 1
    assert stats["bytes_sent"] > len(big) + 4000  # the two bodies and the listing


def test_fsspec_through_the_proxy(proxy, obj, aws_env):
    bucket, key = obj
    fs = fsspec.filesystem("s3", endpoint_url=proxy.endpoint_url)
    fs.pipe(f"{bucket}/fs/a.bin", DATA[:100])
    assert fs.cat(f"{bucket}/{key}") == DATA
    assert fs.ls(f"{bucket}/fs", detail=False) == [f"{bucket}/fs/a.bin"]
    assert fs.cat_file(f"{bucket}/{key}", start=300, end=7000) == DATA[300:7000]
    with fs.open(f"{bucket}/{key}", block_size=1024) as f:
        f.seek(9000)
        assert f.read(500) == DATA[9000:9500]
    assert proxy.stats()["range_gets"] >= 2


def test_keep_alive(proxy, obj):
    bucket, key = obj
    url = urlsplit(presigned(proxy, bucket, key))
    connection = http.client.HTTPConnection(url.netloc, timeout=10)
    sockets = []
    for _ in range(3):
        connection.request("GET", f"{url.path}?{url.query}")
        assert connection.getresponse().read() == DATA
        sockets.append(connection.sock)
    connection.close()
    assert sockets[0] is not None and sockets.count(sockets[0]) == 3  # one connection carried every request


def test_latency_is_added(proxy, obj):
    bucket, key = obj
    proxy.set_latency(50, 60)
    s3 = client(proxy)
    s3.head_object(Bucket=bucket, Key=key)  # the connection is made outside the measurement
    n = 8
    start = time.perf_counter()
    for _ in range(n):
        s3.head_object(Bucket=bucket, Key=key)
    assert time.perf_counter() - start >= n * 0.050


def test_slowdown_answers_503_without_forwarding(proxy, obj):
    bucket, key = obj
    s3 = client(proxy)
    proxy.add_fault("slowdown", match="shard-0001", times=2)
    s3.head_object(Bucket=bucket, Key=key)  # GET only by default
    for _ in range(2):
        with pytest.raises(ClientError) as raised:
            s3.get_object(Bucket=bucket, Key=key)
        assert raised.value.response["Error"]["Code"] == "SlowDown"
        assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == DATA  # the rule is spent

    proxy.add_fault("slowdown", match="never-written", method="PUT")
    with pytest.raises(ClientError, match="SlowDown"):
        s3.put_object(Bucket=bucket, Key="never-written", Body=b"x")
    with pytest.raises(ClientError, match="404"):
        s3.head_object(Bucket=bucket, Key="never-written")  # the PUT never reached S3
    assert proxy.stats()["faults"] == {"slowdown": 3}


def test_every_time_until_cleared(proxy, obj):
    bucket, key = obj
    s3 = client(proxy)
    proxy.add_fault("slowdown", match=key, times=None)
    for _ in range(3):
        with pytest.raises(ClientError, match="SlowDown"):
            s3.get_object(Bucket=bucket, Key=key)
    proxy.clear_faults()
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == DATA


def test_reset_drops_the_connection(proxy, obj):
    bucket, key = obj
    s3 = client(proxy)
    proxy.add_fault("reset", match=key, times=2)
    with pytest.raises(ConnectionClosedError):
        s3.get_object(Bucket=bucket, Key=key)
    with pytest.raises(ConnectionError):  # http.client's RemoteDisconnected or ConnectionResetError
        plain_get(proxy, bucket, key)
    assert plain_get(proxy, bucket, key).read() == DATA
    assert proxy.stats()["faults"] == {"reset": 2}


def test_truncate_sends_less_than_content_length(proxy, obj):
    bucket, key = obj
    proxy.add_fault("truncate", match=key, times=2, fraction=0.25)
    with plain_get(proxy, bucket, key) as response:
        assert int(response.headers["Content-Length"]) == len(DATA)
        with pytest.raises(http.client.IncompleteRead) as raised:
            response.read()
    assert raised.value.partial == DATA[:len(DATA) // 4]

    with plain_get(proxy, bucket, key, {"Range": "bytes=1000-2999"}) as response:
        assert response.status == 206 and int(response.headers["Content-Length"]) == 2000
        with pytest.raises(http.client.IncompleteRead) as raised:
            response.read()
    assert raised.value.partial == DATA[1000:1500]

    assert plain_get(proxy, bucket, key).read() == DATA  # spent
    stats = proxy.stats()
    assert stats["faults"] == {"truncate": 2} and stats["range_gets"] == 1
    assert stats["bytes_sent"] == len(DATA) // 4 + 500 + len(DATA)


def test_slow_adds_its_seconds(proxy, obj):
    bucket, key = obj
    s3 = client(proxy)
    proxy.add_fault("slow", match=key, seconds=0.5)
    start = time.perf_counter()
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == DATA
    assert time.perf_counter() - start >= 0.5
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == DATA
    assert proxy.stats()["faults"] == {"slow": 1}
    assert proxy.rules()[0]["times"] == 0


def test_stats_count_concurrent_requests(proxy, obj):
    bucket, key = obj
    s3 = client(proxy, max_pool_connections=20)
    barrier = threading.Barrier(20)

    def head() -> None:
        barrier.wait()
        s3.head_object(Bucket=bucket, Key=key)

    threads = [threading.Thread(target=head) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = proxy.stats()
    assert stats["requests"] == {"HEAD": 20}
    assert 1 < stats["max_in_flight"] <= 20 and stats["in_flight"] == 0
    assert stats["range_gets"] == 0 and stats["bytes_sent"] == 0


def test_bad_rules_are_refused(proxy):
    with pytest.raises(ValueError, match="unknown fault kind"):
        proxy.add_fault("explode")
    with pytest.raises(urllib.error.HTTPError, match="400"):
        proxy._control("POST", "rules", {"kind": "explode"})


def test_memory_mode_answers_gets_from_a_copy_and_drops_it_on_a_write(s3_server, obj):
    bucket, key = obj
    with S3Proxy(s3_server.endpoint_url, min_ms=0, max_ms=0, memory=True) as memory:
        s3 = client(memory)
        assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == DATA
        ranged = s3.get_object(Bucket=bucket, Key=key, Range="bytes=100-299")
        assert ranged["Body"].read() == DATA[100:300] and ranged["ContentRange"] == f"bytes 100-299/{len(DATA)}"
        assert s3.head_object(Bucket=bucket, Key=key)["ContentLength"] == len(DATA)
        fs = fsspec.filesystem("s3", endpoint_url=memory.endpoint_url, skip_instance_cache=True)
        assert fs.cat_ranges([f"{bucket}/{key}"] * 2, [0, 5000], [10, 5100]) == [DATA[:10], DATA[5000:5100]]
        s3.put_object(Bucket=bucket, Key=key, Body=b"new")  # through the proxy: the copy goes
        assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == b"new"
        with pytest.raises(ClientError, match="NoSuchKey"):
            s3.get_object(Bucket=bucket, Key="absent")
