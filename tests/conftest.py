"""Fixtures every kind of test may use: the moto S3 server (one per test session), its credentials, new buckets.

Where a test lives says what it needs (`tests/unit`: one module, in process; `tests/integration`: a module with its
real neighbours, the S3 server or loader processes; `tests/e2e`: what a user types, in subprocesses;
`tests/distributed`: torchrun workers; `tests/container`: the image under podman). The markers say it too, so that
`-m "not container"` and the like select across folders; the S3 marker is set here from the fixtures a test uses.
"""

import itertools
import os
from pathlib import Path

import pytest
import torch
from s3fs import S3FileSystem

from tests.support.container_engine import background_build
from tests.support.runs import cores_per_worker
from tests.support.s3_server import TEST_CREDENTIALS, S3Server

_TESTS = Path(__file__).resolve().parent
_bucket_numbers = itertools.count()
# a folder's tests all need what its markers say; `slow` marks every test that starts a Python process (with torch)
_FOLDER_MARKERS = {"e2e": ("slow",), "distributed": ("slow", "torchrun"), "container": ("slow", "container")}
# the order the folders run in: the quick ones first, so that a broken module fails in seconds; the container tests
# last, so that the image builds in the background meanwhile
_FOLDER_ORDER = ["unit", "integration", "e2e", "distributed", "container"]

# Under pytest-xdist (make test runs `-n auto --dist loadgroup`) each worker is a test session of its own, and a
# session or module fixture is made by every worker that runs a test needing it. So each module is one unit of work
# (its module fixtures made once), the modules that read tests/e2e/conftest.py's shared runs are one unit (each run
# made once), and so are the container tests (one image, one registry). A worker runs one unit at a time.
_SHARED_RUNS = {"tiny_run", "resumed_run", "local_run"}
SHARED_RUNS_GROUP, CONTAINER_GROUP = "shared-runs", "container"
# The longest units start first (the classic longest-first rule: none is left to end the run alone): the demo's
# pretraining (7 min of 2 cores), the shared runs' modules (8 min), the container tests (5 min, the image built
# meanwhile); then the folders, the slow ones first.
_FIRST_UNDER_XDIST = ["e2e/test_demo", SHARED_RUNS_GROUP, CONTAINER_GROUP]
_FOLDER_ORDER_UNDER_XDIST = ["e2e", "distributed", "container", "integration", "unit"]


def _folder(item: pytest.Item) -> str:
    return item.path.relative_to(_TESTS).parts[0] if item.path.is_relative_to(_TESTS) else ""


def _under_xdist() -> bool:
    return "PYTEST_XDIST_WORKER" in os.environ


def _work_units(items: list[pytest.Item]) -> dict[pytest.Item, str]:
    """Each test's unit of work under pytest-xdist (its xdist_group)."""
    modules: dict[Path, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.path, []).append(item)
    units = {}
    for path, module_items in modules.items():
        fixtures = set().union(*(getattr(item, "fixturenames", ()) for item in module_items))
        if _folder(module_items[0]) == "container":
            unit = CONTAINER_GROUP
        elif fixtures & _SHARED_RUNS:
            unit = SHARED_RUNS_GROUP
        else:
            unit = str(path.relative_to(_TESTS).with_suffix("")) if path.is_relative_to(_TESTS) else str(path)
        units.update(dict.fromkeys(module_items, unit))
    return units


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's, which reads the xdist_group markers
def pytest_collection_modifyitems(items):
    for item in items:
        if {"s3_server", "s3_bucket"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.s3)
        for marker in _FOLDER_MARKERS.get(_folder(item), ()):
            item.add_marker(marker)
    if _under_xdist():
        units = _work_units(items)
        for item in items:
            item.add_marker(pytest.mark.xdist_group(units[item]))
        first = {unit: index for index, unit in enumerate(_FIRST_UNDER_XDIST)}
        rank = {folder: len(first) + index for index, folder in enumerate(_FOLDER_ORDER_UNDER_XDIST)}
        items.sort(key=lambda item: first.get(units[item], rank.get(_folder(item), len(first) + len(rank))))
    else:
        rank = {folder: index for index, folder in enumerate(_FOLDER_ORDER)}
        items.sort(key=lambda item: rank.get(_folder(item), len(rank)))


def pytest_configure(config):
    if _under_xdist():  # this worker's own steps, and what its subprocesses inherit, on its share of the cores
        threads = cores_per_worker()
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


def pytest_collection_finish(session):
    # Under pytest-xdist every worker collects every test: the first one starts the build; the one that runs the
    # container tests, if another, waits on the build's lock and finds every layer built.
    first_worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0") == "gw0"
    if (first_worker and not session.config.option.collectonly
            and any(item.get_closest_marker("container") for item in session.items)):
        background_build.start()


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: a run without the plugin ignores it
def pytest_xdist_node_collection_finished(node, ids):
    """pytest-xdist groups by appending "@unit" to each node id, which pytest 9.2 ignores (pytest-xdist#1386): every
    test would be scheduled alone, and each worker would train the demo and the shared runs again."""
    if node.config.getvalue("dist") == "loadgroup" and ids and "@" not in ids[0]:
        pytest.exit("pytest-xdist did not group the tests into their units of work (pytest-xdist#1386: pytest 9.2's "
                    "node ids); install the test extras' pytest (<9.2), or run the suite in one process (XDIST=)",
                    returncode=pytest.ExitCode.USAGE_ERROR)


@pytest.fixture(scope="session")
def s3_server():
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture
def aws_env(monkeypatch):
    """Test credentials in the environment, as the AWS chain reads them; nothing else from the machine.

    fsspec caches filesystems by their options, not by the environment: each test starts without them.
    """
    for key, value in TEST_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    S3FileSystem.clear_instance_cache()
    yield TEST_CREDENTIALS
    S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_bucket(s3_server, aws_env):
    """A new, empty bucket's URL."""
    return s3_server.create_bucket(f"bucket-{next(_bucket_numbers)}")
