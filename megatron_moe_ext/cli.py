"""Shared by the command-line front ends in scripts/: argparse results into the library's
options dataclasses, with the library's validation errors reported as usage errors."""

from __future__ import annotations

import argparse
from typing import Any, Optional, Sequence, TypeVar

T = TypeVar("T")


def parse_options(parser: argparse.ArgumentParser, cls: type[T],
                  cli_args: Optional[Sequence[str]] = None, **extra: Any) -> T:
    """``cls(**vars(parser.parse_args(cli_args)), **extra)``; a ValueError raised by ``cls``
    (an option out of range) becomes ``parser.error`` (usage message, exit code 2)."""
    args = parser.parse_args(cli_args)
    try:
        return cls(**vars(args), **extra)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # parser.error exits; this keeps type checkers informed
