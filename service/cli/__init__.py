"""The `barlow` command line: `main` is its entry point (pyproject's `barlow` script and `python -m service`)."""

from service.cli.main import main

__all__ = ["main"]
