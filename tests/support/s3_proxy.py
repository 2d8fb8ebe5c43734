"""S3 as it behaves over a network: a reverse proxy in front of the moto server, with latency and injected faults.

Run it as its own process (``python -m tests.support.s3_proxy --upstream URL --port N``) or through :class:`S3Proxy`.
Every request is forwarded as it came (method, raw path and query, headers with the client's Host, which boto
signs, and body) after a uniform random delay, and the answer is streamed back. Rules and statistics live under
``/__proxy__/`` on the same port (no S3 bucket name starts with an underscore):

- ``POST /__proxy__/latency`` ``{"min_ms": 20, "max_ms": 40}``
- ``POST /__proxy__/rules`` ``{"kind": "slowdown", "match": "shard-0001", "method": "GET", "times": 1}``
  (kinds: slowdown, reset, truncate with ``fraction``, slow with ``seconds``; ``"method": null`` is any method,
  ``"times": null`` every matching request); ``DELETE /__proxy__/rules`` removes them all
- ``GET /__proxy__/stats``; ``POST /__proxy__/reset`` (no rules, zero statistics, the starting latency)

A request takes the first rule, in the order added, that matches it and is not spent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from tests.support.s3_server import free_port

PREFIX = "/__proxy__/"
KINDS = ("slowdown", "reset", "truncate", "slow")
# hop-by-hop headers (RFC 9110 7.6.1) belong to one connection and are not forwarded
HOP_BY_HOP = frozenset(h.lower() for h in ("Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization",
                                           "Proxy-Connection", "TE", "Trailer", "Transfer-Encoding", "Upgrade",
                                           "Expect"))  # the proxy answers 100-continue itself
SLOWDOWN_BODY = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                 '<Message>Please reduce your request rate.</Message><RequestId>{}</RequestId></Error>')


@dataclass
class Rule:
    kind: str
    match: str = ""
    method: str | None = "GET"
    times: int | None = 1
    seconds: float = 1.0  # slow: extra delay
    fraction: float = 0.5  # truncate: share of the body sent before the connection is closed

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}, not one of {KINDS}")
        if not 0 <= self.fraction < 1:
            raise ValueError("fraction must be in [0, 1)")

    def take(self, method: str, path: str) -> bool:
        """Whether this rule applies to the request; a match uses up one of its times."""
        if self.times == 0 or self.match not in path or (self.method is not None and self.method != method):
            return False
        if self.times is not None:
            self.times -= 1
        return True


@dataclass
class Stats:
    requests: Counter[str] = field(default_factory=Counter)  # by method
    range_gets: int = 0
    bytes_sent: int = 0  # response bodies written to clients, partial ones included
    faults: Counter[str] = field(default_factory=Counter)  # by kind
    in_flight: int = 0
    max_in_flight: int = 0

    def as_json(self) -> dict[str, Any]:
        return {"requests": dict(self.requests), "range_gets": self.range_gets, "bytes_sent": self.bytes_sent,
                "faults": dict(self.faults), "in_flight": self.in_flight, "max_in_flight": self.max_in_flight}


class ProxyApp:
    def __init__(self, upstream: str, min_ms: float, max_ms: float, seed: int | None = None, memory: bool = False):
        self.upstream = upstream.rstrip("/")
        # memory: object GETs answered from a copy of each object fetched whole from upstream once, so that
        # moto's own request rate (one Python thread, a few hundred requests a second) does not stand in for
        # S3's; writes through the proxy drop the copy
        self.memory = memory
        self.objects: dict[str, tuple[bytes, list[tuple[str, str]]]] = {}
        self.start_latency = (min_ms, max_ms)
        self.latency = self.start_latency
        self.rules: list[Rule] = []
        self.stats = Stats()
        self.random = random.Random(seed)
        self.session: aiohttp.ClientSession | None = None  # made inside the running loop

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path.startswith(PREFIX):
            return await self.control(request)
        stats = self.stats
        stats.requests[request.method] += 1
        stats.range_gets += request.method == "GET" and "Range" in request.headers
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            rule = next((r for r in self.rules if r.take(request.method, request.path)), None)
            if rule is not None:  # counted now: a client that times out during a slow rule cancels this handler
                self.stats.faults[rule.kind] += 1
            delay = self.random.uniform(*self.latency) / 1000 + (rule.seconds if rule and rule.kind == "slow" else 0)
            await asyncio.sleep(delay)
            if rule is not None and rule.kind == "slowdown":
                body = SLOWDOWN_BODY.format(uuid.uuid4().hex).encode()
                self.stats.bytes_sent += len(body) * (request.method != "HEAD")
                response = web.Response(status=503, body=body, content_type="application/xml")
                if request.headers.get("Expect", "").lower() == "100-continue":
                    response.force_close()  # the client holds its body back: what it sends next is not a request
                return response
            if rule is not None and rule.kind == "reset":
                _reset(request.transport)
                return web.Response()  # its write fails on the closed transport, which aiohttp takes quietly
            truncate = rule.fraction if rule and rule.kind == "truncate" else None
            if self.memory and request.method in ("GET", "HEAD") and not request.query_string:
                return await self.from_memory(request, truncate)
            self.objects.pop(request.path, None)
            return await self.forward(request, truncate)
        finally:
            self.stats.in_flight -= 1  # self's: a reset in between carries in_flight over to new statistics

    async def forward(self, request: web.BaseRequest, truncate: float | None) -> web.StreamResponse:
        assert self.session is not None
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        if request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # as aiohttp's router would
        url = URL(self.upstream + request.raw_path, encoded=True)  # encoded: the path and query go as they came
        body = request.content if request.body_exists else None  # streamed, with the client's Content-Length
        try:
            upstream = await self.session.request(request.method, url, headers=headers, data=body,
                                                  allow_redirects=False)
        except aiohttp.ClientError as error:
            return web.Response(status=502, text=f"s3 proxy: upstream failed: {error!r}")
        async with upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in HOP_BY_HOP:
                    response.headers.add(key, value)
            left = None if truncate is None else int((upstream.content_length or 0) * truncate)
            try:
                await response.prepare(request)
                async for chunk in upstream.content.iter_chunked(1 << 16):
                    if left is not None:
                        chunk = chunk[:left]
                        left -= len(chunk)
                    await response.write(chunk)
                    self.stats.bytes_sent += len(chunk)
                    if left == 0:
                        break
            except (ConnectionError, aiohttp.ClientError):  # the client left, or moto did mid-body: end it here too
                truncate = 0
            if truncate is not None and request.transport is not None:
                request.transport.close()  # close, not abort: the part of the body already written is flushed
        return response

    async def from_memory(self, request: web.BaseRequest, truncate: float | None) -> web.StreamResponse:
        """An object GET (ranged or not) or HEAD served from the object's copy, fetched whole on first use."""
        assert self.session is not None
        if request.path not in self.objects:
            headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP | {"range"}]
            async with self.session.get(URL(self.upstream + request.raw_path, encoded=True), headers=headers) as whole:
                if whole.status != 200:  # a missing object, an error: as upstream says
                    return web.Response(status=whole.status, body=await whole.read(), headers={
                        k: v for k, v in whole.headers.items() if k.lower() not in HOP_BY_HOP})
                kept = [(k, v) for k, v in whole.headers.items() if k.lower() in ("content-type", "etag",
                                                                                  "last-modified")]
                self.objects[request.path] = (await whole.read(), kept)
        data, headers = self.objects[request.path]
        status, body = 200, data
        extra = [("Accept-Ranges", "bytes")]
        if match := re.fullmatch(r"bytes=(\d+)-(\d*)", request.headers.get("Range", "")):
            start = int(match[1])
            end = min(int(match[2]) if match[2] else len(data) - 1, len(data) - 1)
            status, body = 206, data[start:end + 1]
            extra.append(("Content-Range", f"bytes {start}-{end}/{len(data)}"))
        response = web.StreamResponse(status=status)
        for key, value in headers + extra:
            response.headers.add(key, value)
        response.content_length = len(body)
        await response.prepare(request)
        if request.method == "GET":
            sent = body if truncate is None else body[:int(len(body) * truncate)]
            await response.write(sent)
            self.stats.bytes_sent += len(sent)
            if truncate is not None and request.transport is not None:
                request.transport.close()
        return response

    async def control(self, request: web.BaseRequest) -> web.StreamResponse:
        action = (request.method, request.path[len(PREFIX):].rstrip("/"))
        try:
            if action == ("GET", "stats"):
                return web.json_response(self.stats.as_json())
            if action == ("GET", "rules"):
                return web.json_response([vars(rule) for rule in self.rules])
            if action == ("POST", "rules"):
                self.rules.append(Rule(**await request.json()))
            elif action == ("DELETE", "rules"):
                self.rules.clear()
            elif action == ("POST", "latency"):
                payload = await request.json()
                self.latency = (float(payload["min_ms"]), float(payload["max_ms"]))
            elif action == ("POST", "reset"):
                self.rules.clear()
                self.stats = Stats(in_flight=self.stats.in_flight)
                self.latency = self.start_latency
            else:
                return web.json_response({"error": f"no control action {action}"}, status=404)
        except (ValueError, TypeError, KeyError) as error:  # bad JSON (JSONDecodeError is a ValueError) or fields
            return web.json_response({"error": repr(error)}, status=400)
        return web.json_response({"ok": True})


def _reset(transport: asyncio.Transport | None) -> None:
    """Drop the connection with a TCP RST (linger 0), as a peer or a load balancer that gives up does."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def serve(app: ProxyApp, host: str, port: int) -> None:
    # no pool limit (aiohttp's default is 100), no decompression: bytes pass through as moto sent them
    app.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False,
                                        timeout=aiohttp.ClientTimeout(total=None),
                                        skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"))
    server = web.Server(app.handle, access_log=None)
    runner = web.ServerRunner(server)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=1024).start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        await app.session.close()


class S3Proxy:
    """Start and stop a proxy process in front of ``upstream_url``, and set its latency, faults and read its stats."""

    def __init__(self, upstream_url: str, port: int | None = None, min_ms: float = 20, max_ms: float = 40,
                 host: str = "127.0.0.1", seed: int | None = None, memory: bool = False):
        self.upstream_url = upstream_url
        self.memory = memory
        self.port = port or free_port()
        self.host = host
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.latency = (min_ms, max_ms)
        self.seed = seed
        self.process: subprocess.Popen | None = None

    def start(self) -> S3Proxy:
        command = [sys.executable, "-m", "tests.support.s3_proxy", "--upstream", self.upstream_url, "--host", self.host,
                   "--port", str(self.port), "--min-ms", str(self.latency[0]), "--max-ms", str(self.latency[1])]
        if self.seed is not None:
            command += ["--seed", str(self.seed)]
        if self.memory:
            command.append("--memory")
        # stderr is inherited: a traceback in the proxy shows in the test's captured output
        self.process = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[2], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                self.stats()
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"s3 proxy did not start on port {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def __enter__(self) -> S3Proxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _control(self, method: str, action: str, payload: dict | None = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.endpoint_url + PREFIX + action, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)

    def set_latency(self, min_ms: float, max_ms: float) -> None:
        self._control("POST", "latency", {"min_ms": min_ms, "max_ms": max_ms})

    def add_fault(self, kind: str, match: str = "", method: str | None = "GET", times: int | None = 1,
                  seconds: float = 1.0, fraction: float = 0.5) -> None:
        """Apply ``kind`` to the next ``times`` requests (None: all) whose path contains ``match`` and whose method
        is ``method`` (None: any). ``seconds`` is the extra delay of ``slow``, ``fraction`` the share of the body
        that ``truncate`` sends."""
        Rule(kind, match, method, times, seconds, fraction)  # refuse bad rules here, not as an HTTP 400
        self._control("POST", "rules", dict(kind=kind, match=match, method=method, times=times, seconds=seconds,
                                            fraction=fraction))

    def rules(self) -> list[dict[str, Any]]:
        """The rules with the times they have left."""
        return self._control("GET", "rules")

    def clear_faults(self) -> None:
        self._control("DELETE", "rules")

    def stats(self) -> dict[str, Any]:
        """requests (by method), range_gets, bytes_sent, faults (by kind), in_flight and max_in_flight."""
        return self._control("GET", "stats")

    def reset(self) -> None:
        """No rules, zero statistics and the latency the proxy started with."""
        self._control("POST", "reset")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="the S3 endpoint, e.g. http://127.0.0.1:5000")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--min-ms", type=float, default=20.0)
    parser.add_argument("--max-ms", type=float, default=40.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--memory", action="store_true", help="answer object GETs from copies of the objects")
    args = parser.parse_args(argv)
    app = ProxyApp(args.upstream, args.min_ms, args.max_ms, args.seed, args.memory)
    try:
        asyncio.run(serve(app, args.host, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
