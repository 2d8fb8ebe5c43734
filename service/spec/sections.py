"""The sections of a spec (data, augment, model, loss, ddp, optim, run, storage, checkpoint, monitor) and the field
types they share.

Every default is the reference recipe (facebookresearch/barlowtwins `main.py`, Zbontar et al. 2021); the
description of each field says where a number comes from.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from service.credentials import has_url_userinfo, is_credential_key

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _auto_count(least: int) -> BeforeValidator:
    """The check of an AutoCount field: a whole number of at least `least`, or "auto"."""

    def check(value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= least):
            return value
        raise ValueError(f"must be `auto` or a whole number of at least {least} (got {value!r})")
    return BeforeValidator(check)


# A whole number of at least 0 (AutoCount0) or 1 (AutoCount1), or "auto" (resolved from the machine when the run
# starts). Spelt out, one alias per bound, so that type checkers read them as `int | Literal["auto"]`.
AutoCount0 = Annotated[Annotated[int, Field(ge=0)] | Literal["auto"], _auto_count(0)]
AutoCount1 = Annotated[Annotated[int, Field(ge=1)] | Literal["auto"], _auto_count(1)]


def _without_userinfo(value: str) -> str:
    if has_url_userinfo(value):  # the value is never echoed: hide_input_in_errors, and no input in the message
        raise PydanticCustomError("credential", f"holds user info (user:password@): {CREDENTIALS_ADVICE}")
    return value


Location = Annotated[str, AfterValidator(_without_userinfo)]
"""A path or URL of the spec: printed and recorded, so it may not carry credentials."""


class Section(BaseModel):
    # No inf or nan in any number (tuples and optional fields included); pydantic's own messages never print
    # inputs (describe_errors prints them, redacted).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, hide_input_in_errors=True)


class DataSpec(Section):
    dataset: Literal["imagefolder", "cifar10", "digits", "shards"] = Field(
        "imagefolder",
        description="`imagefolder`: an ImageNet-style tree with a `train/` folder of one sub-folder per class "
        "(the reference's layout); `cifar10`: torchvision's CIFAR-10 files, never downloaded; `digits`: the "
        "8x8 handwritten digits that scikit-learn ships, upscaled (no download, the built-in demo); `shards`: a "
        "data set packed by `barlow data pack`, read by index from any URL (s3://...), through `storage`.",
    )
    path: Location | None = Field(
        None, description="Root of the data set: the folder holding `train/` (imagefolder) or CIFAR-10's "
        "`cifar-10-batches-py/` (cifar10), or the URL `barlow data pack` wrote (shards). Not used by `digits`."
    )
    cache: Location | None = Field(
        None, description="shards: a node-local folder (an SSD) where whole shards are cached, filled in the "
        "background while training reads, so later epochs read locally. Unset: every read is remote."
    )
    cache_max_gb: float = Field(100.0, gt=0, description="shards: the most the cache may hold, in GB (1e9 bytes).")
    on_error: Literal["fail", "skip"] = Field(
        "fail", description="A sample that cannot be read or decoded: `fail` ends the run naming it (and its "
        "shard); `skip` trains on a deterministic other sample in its place (a function of seed, epoch and "
        "index), logs it once and counts it in stats.txt (`skipped`)."
    )
    max_errors: int = Field(100, ge=0, description="on_error=skip: the run fails once more distinct samples than "
                            "this were skipped.")
    image_size: int = Field(224, ge=8, description="Side of the square crops fed to the network (reference: 224).")
    workers: AutoCount0 = Field(
        "auto", description="Data-loading processes per training worker (the reference used 8 per GPU). `auto`: the "
        "cores this container may use (affinity and cgroup quota) shared among the node's training workers, less one "
        "for each training worker itself, at most 16, and no more than a quarter of the free /dev/shm holds a batch "
        "for. 0 loads in the worker itself.",
    )
    prefetch: AutoCount1 = Field(
        "auto", description="Batches each loading process prepares ahead (PyTorch's default: 2). `auto`: as many as "
        "fit, from 1 to 4, in a quarter of the free /dev/shm and an eighth of the container's memory, shared among "
        "the node's training workers.",
    )


class AugmentSpec(Section):
    """The two asymmetric views. Defaults are the reference's ImageNet pipelines."""

    crop_scale: tuple[float, float] = Field(
        (0.08, 1.0), description="RandomResizedCrop area range (reference: 0.08-1); aspect ratio is always 3/4-4/3."
    )
    horizontal_flip: float = Field(0.5, ge=0.0, le=1.0,
                                   description="Probability of a horizontal flip (reference: 0.5).")
    color_jitter: float = Field(
        0.8, ge=0.0, le=1.0,
        description="Probability of ColorJitter(0.4, 0.4, 0.2, 0.1) (reference: 0.8).",
    )
    grayscale: float = Field(0.2, ge=0.0, le=1.0,
                             description="Probability of converting to grayscale (reference: 0.2).")
    blur: tuple[float, float] = Field(
        (1.0, 0.1), description="Probability of a Gaussian blur, sigma ~ U(0.1, 2), for view 1 and view 2 "
        "(reference: 1.0 and 0.1; small images usually use 0 and 0).",
    )
    solarize: tuple[float, float] = Field(
        (0.0, 0.2), description="Probability of solarization at 128 for view 1 and view 2 (reference: 0.0 and 0.2)."
    )
    color_on: Literal["auto", "loader", "device"] = Field(
        "auto", description="Where the colour augmentations run: `loader`: per image in the data-loading processes "
        "(as the reference); `device`: batched on the training device after the transfer, the loader only "
        "cropping and flipping (same distributions); `auto`: `device` on CUDA, `loader` otherwise."
    )
    mean: tuple[float, float, float] = Field(IMAGENET_MEAN, description="Per-channel normalisation mean (ImageNet's).")
    std: tuple[float, float, float] = Field(IMAGENET_STD, description="Per-channel normalisation std (ImageNet's).")

    @field_validator("crop_scale")
    @classmethod
    def _ordered_scale(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0.0 < low <= high <= 1.0:
            raise ValueError("crop_scale must be [low, high] with 0 < low <= high <= 1, e.g. [0.08, 1.0]")
        return value

    @field_validator("blur", "solarize")
    @classmethod
    def _probabilities(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= p <= 1.0 for p in value):
            raise ValueError("each probability must lie in [0, 1]")
        return value


class ModelSpec(Section):
    backbone: Literal["resnet18", "resnet34", "resnet50"] = Field(
        "resnet50",
        description="torchvision ResNet, built with zero_init_residual=True, fc removed (reference: resnet50).",
    )
    stem: Literal["imagenet", "cifar"] = Field(
        "imagenet", description="`imagenet`: 7x7/2 convolution and max-pool; `cifar`: 3x3/1 convolution, no max-pool, "
        "the usual adaptation for 32x32 images."
    )
    projector: str = Field(
        "8192-8192-8192",
        description="Hidden and output sizes of the projector, dash-separated (reference: 8192-8192-8192). "
        "Every layer but the last is Linear(bias=False)-BatchNorm-ReLU; the last is Linear(bias=False).",
    )

    @field_validator("projector")
    @classmethod
    def _projector_sizes(cls, value: str) -> str:
        if not re.fullmatch(r"[1-9][0-9]*(-[1-9][0-9]*)*", value):
            raise ValueError(f"projector must be positive sizes joined by dashes, e.g. '8192-8192-8192', not {value!r}")
        return value

    @property
    def projector_sizes(self) -> list[int]:
        return [int(size) for size in self.projector.split("-")]


class LossSpec(Section):
    lambd: float = Field(
        0.0051, ge=0.0,
        description="Weight of the off-diagonal (redundancy) term (reference code: 0.0051; paper: 5e-3).",
    )
    scale_loss: float = Field(
        1.0, gt=0.0, description="Multiplies the loss, as the first release's `--scale-loss` did (the seed README's "
        "command: 0.024). Keep 1.0 with the current two-learning-rate form."
    )
    reference_world_size: int | None = Field(
        None, ge=1,
        description="Reproduce the reference's gradient scale: its non-differentiable all_reduce made every update "
        "use 1/world_size of the true gradient. Set this to the reference run's GPU count (16 for the seed README's "
        "run, 32 for the paper) to divide gradients by it at any world size. Unset: the true gradient.",
    )
    communication: Literal["auto", "reduce", "gather"] = Field(
        "auto", description="How workers combine the cross-correlation: `reduce` all-reduces the D x D matrix (the "
        "reference), `gather` all-gathers the embeddings and computes it whole on every worker; the same loss and "
        "gradients. `auto`: `gather` when the job spans several nodes and the global batch is under twice the "
        "embedding size (fewer bytes where bytes are dear), else `reduce`; see bench/README.md.",
    )


class DdpSpec(Section):
    """DistributedDataParallel's settings; they matter only with more than one worker."""

    static_graph: bool = Field(
        True, description="Declare that every step uses the same parameters in the same order (true of this model): "
        "DDP then skips its per-step search for unused parameters and reorders its buckets to the gradients' real "
        "order after the first step.",
    )
    gradient_compression: Literal["none", "bf16", "fp16"] = Field(
        "none", description="Cast gradients to bf16 or fp16 for their all-reduce (PyTorch's DDP compression hooks): "
        "half the bytes on the network, at the price of rounding the averaged gradient. `none` (the reference): fp32.",
    )


class OptimSpec(Section):
    optimizer: Literal["lars"] = Field("lars", description="LARS, as in the reference (no other optimizer).")
    epochs: int = Field(1000, ge=1, description="Training epochs (reference: 1000).")
    batch_size: int = Field(2048, ge=2, description="Global batch size over all workers (reference: 2048).")
    lr_weights: float = Field(
        0.2, gt=0.0, description="Learning rate multiplier for weights; the peak is lr_weights * batch_size / 256 "
        "(reference: 0.2)."
    )
    lr_biases: float = Field(
        0.0048, gt=0.0, description="Learning rate multiplier for biases and BatchNorm parameters (reference: 0.0048)."
    )
    weight_decay: float = Field(1e-6, ge=0.0,
                                description="Weight decay of the weights (reference code: 1e-6; paper: 1.5e-6).")
    momentum: float = Field(0.9, ge=0.0, lt=1.0,
                            description="LARS momentum, no dampening or Nesterov (reference: 0.9).")
    eta: float = Field(0.001, gt=0.0, description="LARS trust coefficient (reference: 0.001).")
    warmup_epochs: float = Field(10, ge=0.0, description="Linear warm-up from 0, per step (reference: 10 epochs).")

    @model_validator(mode="after")
    def _warmup_within_training(self) -> OptimSpec:
        if self.warmup_epochs > self.epochs:
            raise ValueError(
                f"optim.warmup_epochs ({self.warmup_epochs}) cannot exceed optim.epochs ({self.epochs})"
            )
        return self


class RunSpec(Section):
    output: Location = Field(
        "./checkpoint", description="Where the run lives: a folder or an fsspec URL (s3://bucket/runs/name, gs://, "
        "file://, memory://) for stats.txt, checkpoints/ and the exported backbone (reference: ./checkpoint)."
    )
    seed: int = Field(0, ge=0, description="Seed of the model initialisation, the data order and every augmentation.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp16", description="Autocast precision on CUDA (reference: fp16 with a GradScaler). On the CPU, bf16 uses "
        "CPU autocast and fp16 falls back to fp32."
    )
    channels_last: bool = Field(True, description="Use the channels_last memory format for the convolutions on CUDA.")
    compile: bool = Field(
        False, description="torch.compile the model (Inductor; the first steps compile for a few minutes, later ones "
        "run faster on GPUs). Needs a C compiler, which the training image has. Off: eager, as the reference."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="`auto`: CUDA when available, else the CPU.")
    log_every: int = Field(100, ge=1, description="Steps between stats lines (reference: 100). The step's metrics "
                           "(loss terms, throughput, data wait, memory, collapse signal) are read at these steps only.")
    tensorboard: bool = Field(
        True, description="Write TensorBoard event files under `run.output/tensorboard/` (pretraining): the stats "
        "lines' scalars, the kNN monitor and the cross-correlation image. For an object store they are written "
        "locally and uploaded as closed files."
    )
    image_every: int | None = Field(
        1000, ge=1, description="Steps between cross-correlation images (the D x D matrix the loss optimises, "
        "decimated to 64 x 64) in TensorBoard, drawn at the first logged step from each multiple of it on. Null: none."
    )
    sync_every_seconds: float = Field(
        300, gt=0, description="Seconds between uploads of stats.txt and the closed TensorBoard files to a remote "
        "`run.output` (they are also uploaded at every checkpoint and at the end)."
    )
    log_format: Literal["auto", "text", "json"] = Field(
        "auto", description="Log lines on standard error: `text`, or `json` (one object per line: time, level, "
        "rank, step, message) for log collectors; `auto`: json when standard error is not a terminal and "
        "KUBERNETES_SERVICE_HOST is set (in a pod), else text."
    )


class StorageSpec(Section):
    """Where `run.output` lives when it is a URL. Credentials come from the standard AWS chain (environment
    variables, AWS_PROFILE / `profile`, web identity for IRSA), never from the spec."""

    endpoint_url: Location | None = Field(
        None, description="S3-compatible endpoint (MinIO, Ceph, R2, a test server); unset: AWS S3."
    )
    region: str | None = Field(None, description="S3 region; unset: from the AWS configuration.")
    profile: str | None = Field(None, description="AWS profile name from ~/.aws; unset: the default chain.")
    retries: int = Field(5, ge=0, le=20,
                         description="Attempts, with exponential backoff, for transient storage errors.")
    options: dict[str, Any] = Field(
        default_factory=dict, description="Extra fsspec options for the output's filesystem (e.g. for gs://)."
    )

    @field_validator("options")
    @classmethod
    def _no_credentials(cls, value: dict[str, Any]) -> dict[str, Any]:
        def find(node: Any, path: str) -> str | None:
            items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
            for key, item in items:
                if isinstance(node, dict) and is_credential_key(key):
                    return f"{path}{key}"
                found = find(item, f"{path}{key}.")
                if found:
                    return found
            return None

        where = find(value, "")
        if where:  # ctx's `subpath` completes the field's dotted path in describe_errors
            raise PydanticCustomError("credential", f"is a credential: {CREDENTIALS_ADVICE}", {"subpath": where})
        return value


CREDENTIALS_ADVICE = (
    "credentials never go in the spec (it is printed, and recorded in spec.yaml and every checkpoint); remove it and "
    "use environment variables (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY), AWS_PROFILE or storage.profile, web "
    "identity (IRSA), or a Kubernetes Secret mounted as environment (run option credentials_secret)"
)


class CheckpointSpec(Section):
    every_steps: int | None = Field(
        None, ge=1,
        description="Save every this many steps (unset: only per epoch). A lost node costs at most this many steps.",
    )
    every_epochs: int | None = Field(1, ge=1, description="Save at the end of every this many epochs (reference: 1).")
    keep_last: int = Field(2, ge=2,
                           description="Valid checkpoints kept; older ones are deleted once a newer one is committed.")
    keep_every_epochs: int | None = Field(
        None, ge=1, description="Also keep, forever, the end-of-epoch checkpoints of every this many epochs."
    )
    resume: Location = Field(
        "auto", description="`auto`: continue from the newest valid checkpoint under `run.output`, or start fresh; "
        "`none`: start fresh (refused where `run.output` already holds checkpoints); a checkpoint URL "
        "(…/checkpoints/step-000000123): continue from that one, e.g. into a new `run.output`."
    )
    allow_changes: list[str] = Field(
        default_factory=list, description="Fields (dotted, e.g. `optim.epochs`) or sections (`optim`) the resumed "
        "run may change although they change the optimisation. Resuming compares the spec with the checkpoint's and "
        "refuses any other such change (model, loss, optim, augment, data, seed, precision, gradient compression), "
        "listing them; logging, checkpoint cadence, storage and the monitor may always change. Allowed changes are "
        "recorded in every later manifest and in stats.txt.",
    )
    lease_timeout: float = Field(
        300.0, gt=0, description="Seconds without a heartbeat after which another run may take over this "
        "`run.output`'s lease (`lease.json`, refreshed by the running job's rank 0 every quarter of this). A live "
        "run's output is refused to any other run; `barlow train --force` takes it over at once.",
    )


class MonitorSpec(Section):
    """A cheap online signal of representation quality during pretraining (the reference has none)."""

    knn_every_epochs: int | None = Field(
        None, ge=1, description="Every this many epochs (and after the last), a weighted kNN classifier on the "
        "backbone's features: the labelled training images are the memory bank, the held-out split (digits' and "
        "CIFAR's test split, ImageFolder's `val/`) the queries; top-1 goes to stats.txt. Unset: off."
    )
    knn_k: int = Field(200, ge=1, description="Neighbours that vote (the SSL benchmarks' 200).")
    knn_temperature: float = Field(0.1, gt=0, description="Votes weigh exp(cosine similarity / T) (benchmarks: 0.1).")
