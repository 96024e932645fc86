"""The ``python -m finetune.<tool>`` entry point shared by every offline tool.

A tool module implements ``configure(parser)`` and ``run(args) -> int`` (what ``supportbot``
calls); it ends with ``run_module(__name__)`` so it also runs on its own, with the same
options and exit codes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType


def parser_for(module: ModuleType) -> argparse.ArgumentParser:
    """The module's options, under its ``python -m`` name, with its docstring's first line."""
    spec = getattr(module, "__spec__", None)
    name = spec.name if spec is not None else module.__name__
    doc = (module.__doc__ or "").strip()
    parser = argparse.ArgumentParser(
        prog=f"python -m {name}", description=doc.splitlines()[0] if doc else None
    )
    module.configure(parser)
    return parser


def main(module: ModuleType, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: the command line) and run the tool; its exit code."""
    return int(module.run(parser_for(module).parse_args(argv)) or 0)


def run_module(name: str) -> None:
    """Run the tool and exit when its module is the program (``name`` is ``"__main__"``)."""
    if name == "__main__":
        raise SystemExit(main(sys.modules[name]))
