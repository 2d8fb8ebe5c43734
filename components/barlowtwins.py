"""TorchX components of the Barlow Twins service: thin, typed, their docstrings are the CLI help.

    # laptop: 2 workers on the CPU, restarts on failure, resumes from the run's checkpoints
    torchx run -s local_cwd components/barlowtwins.py:train --spec specs/digits.yaml --nproc_per_node 2

    # Kubernetes (Volcano): 2 to 4 nodes of 8 GPUs, elastic; the spec is read and validated here, then shipped
    torchx run -s kubernetes barlowtwins.train --spec my-imagenet.yaml --image REGISTRY/barlowtwins-service:TAG \
        --nnodes 2:4 --h gpu_8xh100 run.output=s3://BUCKET/runs/bt checkpoint.every_steps=500

    # Kubernetes with Kueue: a JobSet of 4 nodes in the LocalQueue `barlow`, started when the queue admits it
    torchx run -s jobset -cfg queue=barlow barlowtwins.train --spec my-imagenet.yaml --image ... --nnodes 4 \
        --h gpu_8xh100 run.output=s3://BUCKET/runs/bt

    # the reference's linear probe of that run's backbone, on the same cluster
    torchx run -s kubernetes barlowtwins.evaluate --spec s3://BUCKET/specs/linear.yaml --image ... --h gpu_8xh100 \
        backbone.weights=s3://BUCKET/runs/bt run.output=s3://BUCKET/runs/bt-linear

The spec is resolved where the job is submitted (service/launch/job_spec.py) and travels inside the job. The
project's `kubernetes` scheduler (service/launch/volcano.py) completes the Volcano Job TorchX renders; its `jobset`
scheduler (service/launch/jobset.py) renders the same pods as a JobSet for Kueue; `barlow submit` runs these
components through the same TorchX Runner.
"""

import re
import shlex
from typing import Dict, List, Optional, Union

from torchx import specs
from torchx.specs import macros

from service.credentials import credential_key, has_url_userinfo, is_credential_key
from service.errors import SpecError
from service.launch.job_spec import resolve_job_spec
from service.launch.resources import MOUNTS_METADATA, RUN_OUTPUT_METADATA, SHM_CAPABILITY, WORKERS_METADATA
from service.launch.torchx_api import SubmissionError
from service.spec import EvaluateSpec, TrainSpec

DEFAULT_IMAGE = "barlowtwins-service:latest"
# Without a named resource, a node's share is sized from its GPUs (torchx's default, 2 CPUs and 1 GiB, is no
# training node: its Kubernetes scheduler turns it into a 0M memory request).
CPU_PER_GPU, MEM_MB_PER_GPU, SHM_MB_PER_GPU = 10, 80 * 1024, 8 * 1024
CPU_PER_CPU_WORKER, MEM_MB_PER_CPU_WORKER, SHM_MB_PER_CPU_WORKER = 2, 4 * 1024, 1024
# An image reference as Docker's distribution/reference grammar has it: [host[:port]/]path[:tag][@digest]
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_HOST = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?"
IMAGE_REFERENCE = re.compile(rf"(?:{_HOST}/)?{_COMPONENT}(?:/{_COMPONENT})*(?::[\w][\w.-]{{0,127}})?"
                             r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?")


def parse_nnodes(nnodes: str) -> tuple[int, int]:
    """'N' or 'MIN:MAX' (elastic) to (min, max)."""
    match = re.fullmatch(r"\s*([0-9]+)\s*(?::\s*([0-9]+)\s*)?", str(nnodes))
    if not match:
        raise SubmissionError(f"nnodes must be a node count N or an elastic range MIN:MAX (e.g. 2:4), not {nnodes!r}")
    low = int(match.group(1))
    high = int(match.group(2)) if match.group(2) is not None else low
    if not 1 <= low <= high:
        raise SubmissionError(f"nnodes={nnodes!r}: need 1 <= MIN <= MAX")
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
    max_retries: int = 3,
    rdzv_port: int = 29500,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
    name: str = "barlowtwins",
) -> specs.AppDef:
    """Barlow Twins pretraining as an elastic torchrun job: one worker per GPU (or nproc_per_node CPU workers).

    Args:
        spec: the job spec: a file here or an fsspec URL (s3://bucket/specs/x.yaml), read, overridden
            and validated at submission and shipped inside the job; or image:PATH, a spec inside the image
        overrides: spec overrides, section.field=value (e.g. run.output=s3://bucket/runs/x optim.epochs=100)
        image: the training image (ignored by local_cwd)
        nnodes: number of nodes N, or MIN:MAX for an elastic job that continues on fewer nodes
        nproc_per_node: workers per node; default: one per GPU, or 1 without GPUs
        h: a named resource (gpu_8xh100, gpu_8xa100): its node's size; gpu, cpu, memMB and shmMB may ask for less
        gpu: GPUs per node
        cpu: CPUs per node; default: 10 per GPU, or 2 per CPU worker
        memMB: memory per node in MiB; default: 80 GiB per GPU, or 4 GiB per CPU worker
        shmMB: /dev/shm size per node in MiB (part of memMB); default: 8 GiB per GPU, or 1 GiB per CPU worker
        max_restarts: times torchrun restarts the worker group after a failure; each restart resumes from the
            last checkpoint
        max_retries: times the scheduler recreates the job after a pod fails or its node is lost (Volcano
            RestartJob, or an elastic job's lost pod alone, RestartTask; the JobSet's failurePolicy); each resumes
            from the last checkpoint. A worker's user error (exit 2) fails the job without a retry
        rdzv_port: port of the c10d rendezvous on the first node
        env: extra environment variables, e.g. AWS_REGION=us-east-1 (no credentials: see docs/checkpoints.md)
        mounts: volumes, e.g. type=volume,src=imagenet,dst=/data/imagenet,readonly
        name: job name
    """
    return _torchrun_job("train", spec, overrides, image, nnodes, nproc_per_node, h, gpu, cpu, memMB, shmMB,
                         max_restarts, max_retries, rdzv_port, env, mounts, name, role="trainer")


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
    max_retries: int = 3,
    rdzv_port: int = 29500,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
    name: str = "barlowtwins-eval",
) -> specs.AppDef:
    """Evaluation of a pretrained backbone (linear probe, finetune, kNN) as a torchrun job, like training.

    Args:
        spec: the evaluation spec: a file here or an fsspec URL (s3://bucket/specs/x.yaml), read, overridden
            and validated at submission and shipped inside the job; or image:PATH, a spec inside the image
        overrides: spec overrides, section.field=value (e.g. backbone.weights=s3://bucket/runs/x eval.mode=finetune)
        image: the training image (ignored by local_cwd)
        nnodes: number of nodes N, or MIN:MAX for an elastic job that continues on fewer nodes
        nproc_per_node: workers per node; default: one per GPU, or 1 without GPUs
        h: a named resource (gpu_8xh100, gpu_8xa100): its node's size; gpu, cpu, memMB and shmMB may ask for less
        gpu: GPUs per node
        cpu: CPUs per node; default: 10 per GPU, or 2 per CPU worker
        memMB: memory per node in MiB; default: 80 GiB per GPU, or 4 GiB per CPU worker
        shmMB: /dev/shm size per node in MiB (part of memMB); default: 8 GiB per GPU, or 1 GiB per CPU worker
        max_restarts: times torchrun restarts the worker group after a failure; each restart resumes from the
            last checkpoint
        max_retries: times the scheduler recreates the job after a pod fails or its node is lost (Volcano
            RestartJob, or an elastic job's lost pod alone, RestartTask; the JobSet's failurePolicy); each resumes
            from the last checkpoint. A worker's user error (exit 2) fails the job without a retry
        rdzv_port: port of the c10d rendezvous on the first node
        env: extra environment variables, e.g. AWS_REGION=us-east-1 (no credentials: see docs/checkpoints.md)
        mounts: volumes, e.g. type=volume,src=imagenet,dst=/data/imagenet,readonly
        name: job name
    """
    return _torchrun_job("evaluate", spec, overrides, image, nnodes, nproc_per_node, h, gpu, cpu, memMB, shmMB,
                         max_restarts, max_retries, rdzv_port, env, mounts, name, role="evaluator")


def _refuse_credentials(overrides: tuple, env: Optional[Dict[str, str]]) -> None:
    """A pod's arguments and environment are visible to anyone who can read the Job: neither may carry a
    credential. The message names the key, never the value."""
    advice = ("credentials never go in a job's arguments, environment or spec; use the storage credentials Secret "
              "(run option credentials_secret, barlow submit --credentials-secret), web identity (IRSA) through the "
              "service account, or AWS_PROFILE")
    for override in overrides:
        key = override.partition("=")[0]
        secret = credential_key(override)
        if secret or has_url_userinfo(override):
            what = f"sets a credential ({secret!r})" if secret else "holds a URL with user info (user:password@)"
            raise SubmissionError(f"override {key}=... {what}: {advice}")
    for name, value in (env or {}).items():
        if is_credential_key(name) or has_url_userinfo(value):
            raise SubmissionError(f"env {name}=... would put a credential in the job's definition: {advice}")


def _count(value: Union[int, str, None], name: str, least: int = 0) -> Optional[int]:
    """An integer argument: torchx's CLI hands Optional[int] arguments over as strings ("8"), Python callers ints."""
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise SubmissionError(f"{name} must be a whole number, not {value!r}") from None
    if number < least:
        raise SubmissionError(f"{name} must be >= {least}, got {number}")
    return number


def node_resource(h: Optional[str], gpu: int, cpu: Optional[int], memMB: Optional[int], shmMB: Optional[int],
                  nproc_per_node: Optional[int]) -> tuple[specs.Resource, int, int]:
    """A node's resource, its /dev/shm size (MiB) and its workers. A named resource is the node: explicit values
    may ask for less of it, never more (a request no node can meet stays Pending with the GPUs of the others
    booked)."""
    if h:
        try:
            node = specs.resource(h=h)
        except KeyError as error:  # its message suggests the closest name
            raise SubmissionError(f"h={h!r}: {error.args[0]}") from None
        requested = {"gpu": gpu or None, "cpu": cpu, "memMB": memMB}
        for name, value in requested.items():
            if value is not None and value > getattr(node, name):
                raise SubmissionError(f"{name}={value} does not fit a {h} node ({getattr(node, name)} {name})")
        resource = specs.Resource(cpu=cpu or node.cpu, gpu=gpu or node.gpu, memMB=memMB or node.memMB,
                                  capabilities=dict(node.capabilities), devices=dict(node.devices))
        shm = shmMB or node.capabilities.get(SHM_CAPABILITY, SHM_MB_PER_GPU * max(resource.gpu, 1))
    else:
        workers = nproc_per_node or max(gpu, 1)
        resource = specs.Resource(
            cpu=cpu or (CPU_PER_GPU * gpu if gpu else CPU_PER_CPU_WORKER * workers),
            gpu=gpu,
            memMB=memMB or (MEM_MB_PER_GPU * gpu if gpu else MEM_MB_PER_CPU_WORKER * workers),
        )
        shm = shmMB or (SHM_MB_PER_GPU * gpu if gpu else SHM_MB_PER_CPU_WORKER * workers)
    if shm >= resource.memMB:
        raise SubmissionError(f"shmMB={shm} must be less than the node's memory (memMB={resource.memMB}): /dev/shm "
                              "is memory the pod is charged for")
    nproc = nproc_per_node or max(resource.gpu, 1)
    if resource.gpu and nproc > resource.gpu:
        raise SubmissionError(f"nproc_per_node={nproc} exceeds the {resource.gpu} GPUs of a node: one worker per GPU")
    return resource, shm, nproc


def _torchrun_job(subcommand: str, spec: str, overrides: tuple, image: str, nnodes: str,
                  nproc_per_node: Union[int, str, None], h: Optional[str], gpu: int, cpu: Union[int, str, None],
                  memMB: Union[int, str, None], shmMB: Union[int, str, None], max_restarts: int, max_retries: int,
                  rdzv_port: int, env: Optional[Dict[str, str]], mounts: Optional[List[str]], name: str,
                  role: str) -> specs.AppDef:
    """`barlow <subcommand> <spec>` as an elastic torchrun job: what train and evaluate share."""
    low, high = parse_nnodes(nnodes)
    _count(max_restarts, "max_restarts")
    _count(max_retries, "max_retries")
    _count(gpu, "gpu")
    _count(rdzv_port, "rdzv_port", least=1)
    if not IMAGE_REFERENCE.fullmatch(image or ""):
        raise SubmissionError(f"image {image!r} is not an image reference: [REGISTRY[:PORT]/]NAME[:TAG][@sha256:...], "
                              "e.g. registry.example.com/barlow/trainer:1.0")
    _refuse_credentials(overrides, env)
    try:
        parsed_mounts = specs.parse_mounts(mounts) if mounts else []
    except (KeyError, ValueError, TypeError) as error:
        raise SubmissionError(f"mounts {','.join(mounts or [])!r}: {error}; e.g. type=volume,src=CLAIM,dst=/data,"
                              "readonly or type=bind,src=/host/path,dst=/data") from None
    resource, shm, nproc = node_resource(h, gpu, _count(cpu, "cpu", 1), _count(memMB, "memMB", 1),
                                         _count(shmMB, "shmMB", 1), _count(nproc_per_node, "nproc_per_node", 1))
    kind = EvaluateSpec if subcommand == "evaluate" else TrainSpec
    try:
        job_spec = resolve_job_spec(spec, list(overrides), world_size=high * nproc, kind=kind)
    except SpecError as error:
        raise SubmissionError(str(error)) from None

    if high == 1:
        endpoint = "localhost:0"  # one agent: torchrun picks a free port
    else:
        endpoint = f"$${{{macros.rank0_env}:=localhost}}:{rdzv_port}"
    command = [
        # torchrun's own entry point as the pod's main process (exec: the pod's signals reach it), exiting 2 when
        # a worker stopped on the user's error, so that the scheduler fails the job instead of retrying it
        "exec", "python", "-m", "service.launch.torchrun",
        "--rdzv_backend", "c10d",
        "--rdzv_endpoint", endpoint,
        "--rdzv_id", macros.app_id,  # TORCHELASTIC_RUN_ID: the job's restarts keep run.output's lease
        "--nnodes", f"{low}:{high}" if low != high else str(low),
        "--nproc_per_node", str(nproc),
        "--max_restarts", str(max_restarts),
        "-m", "service", subcommand, job_spec.argument,
    ]
    for override in job_spec.overrides:
        command += ["--set", override]
    metadata = {SHM_CAPABILITY: shm, WORKERS_METADATA: nproc,
                MOUNTS_METADATA: [mount.dst_path for mount in parsed_mounts]}
    if job_spec.run_output:
        metadata[RUN_OUTPUT_METADATA] = job_spec.run_output
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
                env={"PYTHONUNBUFFERED": "1", "LOGLEVEL": "WARNING", **(env or {}), **job_spec.env},
                port_map={"c10d": rdzv_port},
                mounts=parsed_mounts,
                # a lost pod is replaced and the job resumes from its checkpoint (see the kubernetes scheduler)
                max_retries=max_retries,
                retry_policy=specs.RetryPolicy.APPLICATION,
                metadata=metadata,
            )
        ],
    )
