"""TorchX components of the Barlow Twins service: thin, typed, their docstrings are the CLI help.

    # laptop: 2 workers on the CPU, restarts on failure, resumes from the run's checkpoints
    torchx run -s local_cwd components/barlowtwins.py:train --spec specs/digits.yaml --nproc_per_node 2

    # Kubernetes (Volcano): 2 to 4 nodes of 8 GPUs, elastic
    torchx run -s kubernetes -cfg queue=barlow,namespace=barlow barlowtwins.train \\
        --spec specs/imagenet-1000ep.yaml --image REGISTRY/barlowtwins-service:TAG --nnodes 2:4 --h gpu_8xh100 \\
        run.output=s3://BUCKET/runs/bt checkpoint.every_steps=500

    # the reference's linear probe of that run's backbone, on the same cluster
    torchx run -s kubernetes barlowtwins.evaluate --spec specs/imagenet-linear.yaml --image ... --h gpu_8xh100 \
        backbone.weights=s3://BUCKET/runs/bt run.output=s3://BUCKET/runs/bt-linear

`barlow submit` launches the same AppDef and completes what torchx 0.7.0's Kubernetes scheduler leaves out
(memory in MiB, /dev/shm size, tolerations, pull secrets, security context, storage credentials).
"""


import re
import shlex
from typing import Dict, List, Optional

from torchx import specs
from torchx.specs import macros

from components.resources import SHM_CAPABILITY, WORKERS_METADATA
from service.redaction import credential_key, has_url_userinfo

DEFAULT_IMAGE = "barlowtwins-service:latest"
# Without a named resource, a node's share is sized from its GPUs (torchx's default, 2 CPUs and 1 GiB, is no
# training node: its Kubernetes scheduler turns it into a 0M memory request).
CPU_PER_GPU, MEM_MB_PER_GPU, SHM_MB_PER_GPU = 10, 80 * 1024, 8 * 1024
CPU_PER_CPU_WORKER, MEM_MB_PER_CPU_WORKER, SHM_MB_PER_CPU_WORKER = 2, 4 * 1024, 1024


def parse_nnodes(nnodes: str) -> tuple[int, int]:
    """'N' or 'MIN:MAX' (elastic) to (min, max)."""
    match = re.fullmatch(r"\s*([0-9]+)\s*(?::\s*([0-9]+)\s*)?", nnodes)
    if not match:
        raise ValueError(f"nnodes must be a node count N or an elastic range MIN:MAX (e.g. 2:4), not {nnodes!r}")
    low = int(match.group(1))
    high = int(match.group(2)) if match.group(2) is not None else low
    if not 1 <= low <= high:
        raise ValueError(f"nnodes={nnodes!r}: need 1 <= MIN <= MAX")
    return low, high


def train(
    spec: str,
    *overrides: str,
    image: str = DEFAULT_IMAGE,
    nnodes: str = "1",
    nproc_per_node: Optional[int] = None,
    h: Optional[str] = None,
    gpu: int = 0,
    cpu: Optional[int] = None,
    memMB: Optional[int] = None,
    shmMB: Optional[int] = None,
    max_restarts: int = 3,
    rdzv_port: int = 29500,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
    name: str = "barlowtwins",
) -> specs.AppDef:
    """Barlow Twins pretraining as an elastic torchrun job: one worker per GPU (or nproc_per_node CPU workers).

    Args:
        spec: the job spec's path inside the image (or the working directory for local_cwd), e.g. specs/digits.yaml
        overrides: spec overrides, section.field=value (e.g. run.output=s3://bucket/runs/x optim.epochs=100)
        image: the training image (ignored by local_cwd)
        nnodes: number of nodes N, or MIN:MAX for an elastic job that continues on fewer nodes
        nproc_per_node: workers per node; default: one per GPU, or 1 without GPUs
        h: a named resource (gpu_8xh100, gpu_8xa100); takes precedence over gpu, cpu, memMB and shmMB
        gpu: GPUs per node
        cpu: CPUs per node; default: 10 per GPU, or 2 per CPU worker
        memMB: memory per node in MiB; default: 80 GiB per GPU, or 4 GiB per CPU worker
        shmMB: /dev/shm size per node in MiB (applied by barlow submit); default: 8 GiB per GPU, or 1 GiB per CPU worker
        max_restarts: times torchrun restarts the worker group after a failure; each restart resumes from the last checkpoint
        rdzv_port: port of the c10d rendezvous on the first node
        env: extra environment variables, e.g. AWS_REGION=us-east-1
        mounts: volumes, e.g. type=volume,src=imagenet,dst=/data/imagenet,readonly
        name: job name
    """
    return _torchrun_job("train", spec, overrides, image, nnodes, nproc_per_node, h, gpu, cpu, memMB, shmMB,
                         max_restarts, rdzv_port, env, mounts, name, role="trainer")


def evaluate(
    spec: str,
    *overrides: str,
    image: str = DEFAULT_IMAGE,
    nnodes: str = "1",
    nproc_per_node: Optional[int] = None,
    h: Optional[str] = None,
    gpu: int = 0,
    cpu: Optional[int] = None,
    memMB: Optional[int] = None,
    shmMB: Optional[int] = None,
    max_restarts: int = 3,
    rdzv_port: int = 29500,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
    name: str = "barlowtwins-eval",
) -> specs.AppDef:
    """Evaluation of a pretrained backbone (linear probe, finetune, kNN) as a torchrun job, like training.

    Args:
        spec: the evaluation spec's path inside the image (or the working directory for local_cwd), e.g. specs/digits-linear.yaml
        overrides: spec overrides, section.field=value (e.g. backbone.weights=s3://bucket/runs/x eval.mode=finetune)
        image: the training image (ignored by local_cwd)
        nnodes: number of nodes N, or MIN:MAX for an elastic job that continues on fewer nodes
        nproc_per_node: workers per node; default: one per GPU, or 1 without GPUs
        h: a named resource (gpu_8xh100, gpu_8xa100); takes precedence over gpu, cpu, memMB and shmMB
        gpu: GPUs per node
        cpu: CPUs per node; default: 10 per GPU, or 2 per CPU worker
        memMB: memory per node in MiB; default: 80 GiB per GPU, or 4 GiB per CPU worker
        shmMB: /dev/shm size per node in MiB (applied by barlow submit); default: 8 GiB per GPU, or 1 GiB per CPU worker
        max_restarts: times torchrun restarts the worker group after a failure; each restart resumes from the last checkpoint
        rdzv_port: port of the c10d rendezvous on the first node
        env: extra environment variables, e.g. AWS_REGION=us-east-1
        mounts: volumes, e.g. type=volume,src=imagenet,dst=/data/imagenet,readonly
        name: job name
    """
    return _torchrun_job("evaluate", spec, overrides, image, nnodes, nproc_per_node, h, gpu, cpu, memMB, shmMB,
                         max_restarts, rdzv_port, env, mounts, name, role="evaluator")


def _refuse_credentials(override: str) -> None:
    """A pod's arguments are visible to anyone who can read the Job: no override may carry a credential. The
    message names the key, never the value."""
    key = override.partition("=")[0]
    secret = credential_key(override)
    if secret or has_url_userinfo(override):
        what = f"sets a credential ({secret!r})" if secret else "holds a URL with user info (user:password@)"
        raise ValueError(
            f"override {key}=... {what}: credentials never go in a job's arguments or spec; use environment "
            "variables (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY), AWS_PROFILE or storage.profile, web identity "
            "(IRSA), or a Kubernetes Secret mounted as environment (barlow submit --s3-secret)"
        )


def _torchrun_job(subcommand: str, spec: str, overrides: tuple, image: str, nnodes: str, nproc_per_node: Optional[int],
                  h: Optional[str], gpu: int, cpu: Optional[int], memMB: Optional[int], shmMB: Optional[int],
                  max_restarts: int, rdzv_port: int, env: Optional[Dict[str, str]], mounts: Optional[List[str]],
                  name: str, role: str) -> specs.AppDef:
    """`barlow <subcommand> <spec>` as an elastic torchrun job: what train and evaluate share."""
    low, high = parse_nnodes(nnodes)
    if max_restarts < 0:
        raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
    if h:
        resource = specs.resource(h=h)
        shm = resource.capabilities.get(SHM_CAPABILITY, SHM_MB_PER_GPU * max(resource.gpu, 1))
    else:
        if gpu < 0:
            raise ValueError(f"gpu must be >= 0, got {gpu}")
        workers = nproc_per_node or max(gpu, 1)
        resource = specs.Resource(
            cpu=cpu or (CPU_PER_GPU * gpu if gpu else CPU_PER_CPU_WORKER * workers),
            gpu=gpu,
            memMB=memMB or (MEM_MB_PER_GPU * gpu if gpu else MEM_MB_PER_CPU_WORKER * workers),
        )
        shm = shmMB or (SHM_MB_PER_GPU * gpu if gpu else SHM_MB_PER_CPU_WORKER * workers)
    nproc = nproc_per_node or max(resource.gpu, 1)
    if resource.gpu and nproc > resource.gpu:
        raise ValueError(f"nproc_per_node={nproc} exceeds the {resource.gpu} GPUs of a node: one worker per GPU")

    if high == 1:
        endpoint = "localhost:0"  # one agent: torchrun picks a free port
    else:
        endpoint = f"$${{{macros.rank0_env}:=localhost}}:{rdzv_port}"
    command = [
        "torchrun",
        "--rdzv_backend", "c10d",
        "--rdzv_endpoint", endpoint,
        "--rdzv_id", macros.app_id,  # TORCHELASTIC_RUN_ID: the job's restarts keep run.output's lease
        "--nnodes", f"{low}:{high}" if low != high else str(low),
        "--nproc_per_node", str(nproc),
        "--max_restarts", str(max_restarts),
        "-m", "service", subcommand, spec,
    ]
    for override in overrides:
        _refuse_credentials(override)
        command += ["--set", override]
    return specs.AppDef(
        name=name,
        roles=[
            specs.Role(
                name=role,
                image=image,
                entrypoint="bash",
                # the endpoint stays unquoted so that bash expands the first node's address
                args=["-c", " ".join(arg if arg == endpoint else shlex.quote(arg) for arg in command)],
                num_replicas=high,
                min_replicas=low,
                resource=resource,
                env={"PYTHONUNBUFFERED": "1", "LOGLEVEL": "WARNING", **(env or {})},
                port_map={"c10d": rdzv_port},
                mounts=specs.parse_mounts(mounts) if mounts else [],
                metadata={SHM_CAPABILITY: shm, WORKERS_METADATA: nproc},
            )
        ],
    )
