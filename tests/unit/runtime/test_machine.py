"""The container's limits, read from cgroup files (v2 and v1) as Kubernetes sets them."""

import os

from service.runtime.machine import Machine, free_bytes, usable_cpus, usable_memory

GB = 2**30


def test_cgroup_v2_quota_and_memory_limit(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    (tmp_path / "memory.max").write_text(f"{3 * GB}\n")
    assert usable_cpus(tmp_path) == min(1.5, len(os.sched_getaffinity(0)))
    assert usable_memory(tmp_path) == min(3 * GB, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def test_cgroup_v1_quota(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text(f"{GB}\n")
    assert usable_cpus(tmp_path) == 0.5
    assert usable_memory(tmp_path) == GB


def test_no_limit_means_the_machine(tmp_path):
    (tmp_path / "cpu.max").write_text("max 100000\n")
    (tmp_path / "memory.max").write_text("max\n")
    assert usable_cpus(tmp_path) == len(os.sched_getaffinity(0))
    assert usable_memory(tmp_path) == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert usable_cpus(tmp_path / "absent") == len(os.sched_getaffinity(0))


def test_shared_memory_is_the_free_space_of_its_folder(tmp_path):
    stats = os.statvfs(tmp_path)
    assert free_bytes(tmp_path) == stats.f_bavail * stats.f_frsize
    assert free_bytes(tmp_path / "absent") == 0
    assert Machine.current(cgroup=tmp_path, shared_memory=tmp_path).shared_memory > 0
