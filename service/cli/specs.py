"""`barlow validate` and `barlow schema`: a spec checked and printed resolved, and the specs' JSON Schema for
editors. Neither imports torch."""

from __future__ import annotations

import argparse
import json

from service.spec import EvaluateSpec, json_schema, load_spec, spec_kind, spec_to_yaml


def validate_command(args: argparse.Namespace, argv: list[str] | None) -> int:
    spec = load_spec(args.spec, args.overrides, world_size=args.world_size, kind=spec_kind(args.spec))
    print(spec_to_yaml(spec), end="")
    return 0


def schema_command(args: argparse.Namespace, argv: list[str] | None) -> int:
    text = json.dumps(json_schema(EvaluateSpec if args.evaluation else None), indent=2)
    if args.output:
        with open(args.output, "w") as file:
            file.write(text + "\n")
    else:
        print(text)
    return 0
