"""YAML as a spec may be read: PyYAML's SafeLoader, bounded in what its aliases expand to.

A spec, an override's value and a job's shipped spec are all read here; so is anything else the project reads as
YAML from where others write (a run's spec.yaml).
"""

from __future__ import annotations

import math
from typing import Any

import yaml

from service.errors import SpecError

MAX_SPEC_BYTES = 1 << 20  # specs are a few KB
MAX_SPEC_VALUES = 100_000  # and a few hundred values


def safe_yaml(text: str | bytes, source: str) -> Any:
    """YAML read with PyYAML's SafeLoader, refused (SpecError) when invalid or when its aliases expand it to more
    than MAX_SPEC_VALUES values (a "billion laughs" of under 1 KB): the node graph is composed, counted with every
    alias expanded (memoised per node, so in linear time), and only then constructed. Errors quote no input."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        sizes: dict[int, float] = {}

        def expanded(node: yaml.Node) -> float:
            if id(node) not in sizes:
                sizes[id(node)] = math.inf  # a node inside itself expands without end
                children = (node.value if isinstance(node, yaml.SequenceNode) else [part for pair in node.value for
                            part in pair] if isinstance(node, yaml.MappingNode) else [])
                sizes[id(node)] = 1 + sum(expanded(child) for child in children)
            return sizes[id(node)]

        if root is not None and expanded(root) > MAX_SPEC_VALUES:
            raise SpecError(f"{source} expands to more than {MAX_SPEC_VALUES} values (YAML aliases?)")
        return None if root is None else loader.construct_document(root)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise SpecError(f"{source} is not valid YAML: {error.problem or error.context}{where}") from None
    except yaml.YAMLError as error:
        raise SpecError(f"{source} is not valid YAML: {error}") from None
    except RecursionError:
        raise SpecError(f"{source} nests too deeply to be a spec") from None
    finally:
        loader.dispose()
