"""What this process may use of its machine: cores, memory and shared memory, as its container's limits say.

In a Kubernetes pod the node's core and memory counts are not the pod's: the cgroup's CPU quota and memory limit
are. Both cgroup v2 (`cpu.max`, `memory.max`) and v1 (`cpu.cfs_quota_us`, `memory.limit_in_bytes`) are read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")
SHARED_MEMORY = Path("/dev/shm")


@dataclass(frozen=True)
class Machine:
    cpus: float            # cores this process may run on, under the CPU quota
    memory: int            # bytes: the container's memory limit, or the machine's memory
    shared_memory: int     # free bytes in /dev/shm, where loader processes hand their batches over

    @classmethod
    def current(cls, cgroup: Path = CGROUP, shared_memory: Path = SHARED_MEMORY) -> Machine:
        return cls(cpus=usable_cpus(cgroup), memory=usable_memory(cgroup), shared_memory=free_bytes(shared_memory))


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def usable_cpus(cgroup: Path = CGROUP) -> float:
    cpus = float(len(os.sched_getaffinity(0)))
    v2 = _read(cgroup / "cpu.max")  # "<quota> <period>" or "max <period>"
    quota: str | None
    period: str | None
    if v2:
        quota, _, period = v2.partition(" ")
    else:
        quota, period = _read(cgroup / "cpu" / "cpu.cfs_quota_us"), _read(cgroup / "cpu" / "cpu.cfs_period_us")
    if quota and period and quota not in ("max", "-1"):
        cpus = min(cpus, int(quota) / int(period))
    return cpus


def usable_memory(cgroup: Path = CGROUP) -> int:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = _read(cgroup / "memory.max") or _read(cgroup / "memory" / "memory.limit_in_bytes")
    if limit and limit != "max":
        memory = min(memory, int(limit))  # v1 reports "no limit" as a huge number, which min() ignores
    return memory


def free_bytes(folder: Path) -> int:
    try:
        stats = os.statvfs(folder)
    except OSError:
        return 0
    return stats.f_bavail * stats.f_frsize
