"""Named resources for common 8-GPU nodes (registered under `torchx.named_resources`).

Sizes leave room for the kubelet, system daemons and DaemonSets of the usual cloud nodes:
8xH100: AWS p5.48xlarge (192 vCPU, 2 TiB), GCP a3-highgpu-8g (208 vCPU, 1,872 GB), Azure ND H100 v5 (96 vCPU, 1.9 TiB
  is the exception: use explicit cpu= there);
8xA100: AWS p4d.24xlarge (96 vCPU, 1,152 GiB), GCP a2-highgpu-8g (96 vCPU, 680 GB), Azure ND96asr v4 (96 vCPU, 900 GiB).
Shared memory (/dev/shm, for the data loader processes) is part of the memory request.
"""

from torchx.specs import Resource

GiB = 1024  # memMB is in MiB
SHM_CAPABILITY = "barlow/shmMB"
WORKERS_METADATA = "barlow/nproc_per_node"
# what the Kubernetes scheduler checks before it creates a job: where the run writes, where volumes are mounted
RUN_OUTPUT_METADATA = "barlow/run.output"
MOUNTS_METADATA = "barlow/mounts"


def gpu_8xh100() -> Resource:
    return Resource(cpu=176, gpu=8, memMB=1_536 * GiB, capabilities={SHM_CAPABILITY: 128 * GiB})


def gpu_8xa100() -> Resource:
    return Resource(cpu=88, gpu=8, memMB=600 * GiB, capabilities={SHM_CAPABILITY: 96 * GiB})
