"""megatron_moe_ext.cli.parse_options: argparse -> options dataclass, errors as usage errors;
and the front ends in scripts/ stay thin (no sys.path edits, no script imports another)."""

from __future__ import annotations

import argparse
import ast
from dataclasses import dataclass

import pytest

from megatron_moe_ext.cli import parse_options
from tests.helpers import REPO


@dataclass
class _Opts:
    n: int = 1
    tag: str = ""

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError("--n must be >= 1")


def test_parse_options(capsys: pytest.CaptureFixture) -> None:
    p = argparse.ArgumentParser(prog="x")
    p.add_argument("--n", type=int, default=_Opts.n)
    assert parse_options(p, _Opts, ["--n", "3"], tag="t") == _Opts(3, "t")
    with pytest.raises(SystemExit) as exc:
        parse_options(p, _Opts, ["--n", "0"])
    assert exc.value.code == 2 and "--n must be >= 1" in capsys.readouterr().err


def test_scripts_are_front_ends() -> None:
    names = {p.stem for p in (REPO / "scripts").rglob("*.py")}
    for path in sorted((REPO / "scripts").rglob("*.py")):
        text = path.read_text()
        assert "sys.path" not in text, path
        assert "spec_from_file_location" not in text and "exec_module" not in text, path
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [
                    node.module or ""]
                assert not any(m.split(".")[0] in names for m in mods), (path, mods)
        assert len(text.splitlines()) < 200, path
