"""The job spec: one validated description of a run, read and checked before any process starts.

    sections.py      the sections (data, augment, model, loss, ddp, optim, run, storage, checkpoint, monitor)
    train.py         TrainSpec, a pretraining run          evaluate.py   EvaluateSpec, an evaluation
    job.py           what both kinds check across sections  recipe.py     which changes a resumed run may make
    loading.py       reading a spec with overrides, from a file, a URL or a job's environment; its errors
    bounded_yaml.py  YAML as a spec may be read (aliases bounded)

The names below are the package's public face; each is defined in the module named above.
"""

from service.spec import recipe
from service.spec.bounded_yaml import MAX_SPEC_BYTES, MAX_SPEC_VALUES, safe_yaml
from service.spec.evaluate import REFERENCE_EVAL, BackboneSpec, EvalDataSpec, EvalSpec, EvaluateSpec
from service.spec.loading import (
    SPEC_ENV_PREFIX,
    apply_overrides,
    describe_errors,
    json_schema,
    kind_of,
    load_spec,
    read_spec_data,
    read_spec_text,
    reading_each_spec_once,
    spec_digest,
    spec_kind,
    spec_to_yaml,
    validate_spec,
)
from service.spec.sections import (
    CREDENTIALS_ADVICE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentSpec,
    CheckpointSpec,
    DataSpec,
    DdpSpec,
    LossSpec,
    ModelSpec,
    MonitorSpec,
    OptimSpec,
    RunSpec,
    StorageSpec,
)
from service.spec.train import TrainSpec

__all__ = [
    "CREDENTIALS_ADVICE", "IMAGENET_MEAN", "IMAGENET_STD", "MAX_SPEC_BYTES", "MAX_SPEC_VALUES", "REFERENCE_EVAL",
    "SPEC_ENV_PREFIX", "AugmentSpec", "BackboneSpec", "CheckpointSpec", "DataSpec", "DdpSpec", "EvalDataSpec",
    "EvalSpec", "EvaluateSpec", "LossSpec", "ModelSpec", "MonitorSpec", "OptimSpec", "RunSpec", "StorageSpec",
    "TrainSpec", "apply_overrides", "describe_errors", "json_schema", "kind_of", "load_spec", "read_spec_data",
    "read_spec_text", "reading_each_spec_once", "recipe", "safe_yaml", "spec_digest", "spec_kind", "spec_to_yaml",
    "validate_spec",
]
