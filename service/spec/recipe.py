"""Which spec changes a resumed run may make.

A checkpoint records the resolved spec it was trained with. Resuming compares it with the new one, field by field:
fields that change no numbers (where the run writes, how often it logs and saves, the monitor, the loader's
processes, DDP's static graph, the communication plan, the device's memory layout and compilation) may change
freely; every other field changes the optimisation (model, loss, optim, augment, data, seed, precision, gradient
compression), and a change to one of them refuses the resume unless `checkpoint.allow_changes` names it or its
section (`optim.epochs` to extend a run on purpose, `optim` for the whole section).
"""

from __future__ import annotations

from typing import Any

# Dotted fields, or whole sections, whose value changes nothing a run computes. Anything not listed counts:
# a field added later is guarded until someone decides otherwise here.
NEUTRAL_FIELDS = (
    "run.output", "run.log_every", "run.tensorboard", "run.image_every", "run.sync_every_seconds",
    "run.log_format", "run.device", "run.channels_last", "run.compile",
    "data.workers", "data.prefetch", "ddp.static_graph", "loss.communication",
    "checkpoint", "storage", "monitor",
)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"epochs": 10}} -> {"optim.epochs": 10}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _covered(field: str, names: tuple[str, ...] | list[str]) -> bool:
    return any(field == name or field.startswith(f"{name}.") for name in names)


def changed_fields(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Every field whose value differs between two resolved specs, with (old, new); absent is None."""
    before, after = flatten(old), flatten(new)
    return {name: (before.get(name), after.get(name)) for name in sorted(before.keys() | after.keys())
            if before.get(name) != after.get(name)}


def guarded_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The changes that alter the optimisation (those `checkpoint.allow_changes` must name)."""
    return {name: values for name, values in changed_fields(old, new).items() if not _covered(name, NEUTRAL_FIELDS)}


def unknown_names(names: list[str], spec: dict[str, Any]) -> list[str]:
    """The entries of `checkpoint.allow_changes` that are neither a field nor a section of `spec`."""
    fields = flatten(spec)
    return [name for name in names if not any(_covered(field, [name]) for field in fields)]


def refused_changes(old: dict[str, Any], new: dict[str, Any], allowed: list[str]) -> dict[str, tuple[Any, Any]]:
    """The guarded changes that `allowed` does not name."""
    return {name: values for name, values in guarded_changes(old, new).items() if not _covered(name, allowed)}


def describe(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{name}: {old!r} -> {new!r}" for name, (old, new) in changes.items())
