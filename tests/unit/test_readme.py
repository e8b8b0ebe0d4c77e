"""The README's flag tables say what the binaries do: every flag a table shows exists, and a
literal default it shows is the parser's (the settings dataclasses are the one home; these
tables only show them)."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable

import pytest

from controlplane.main import build_parser as controller_parser
from dataplane.main import build_parser as proxy_parser
from devtools.testenv import ROOT

ROW = re.compile(r"^\| (`--[^|]+`) \| ([^|]+) \|")


def table_after(heading: str) -> dict[str, str]:
    """``--flag`` → the default column of the first flag table under ``heading``."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading) :]
    section = section[: section.index("\n## ", 1)]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        if m := ROW.match(line):
            defaults = [d.strip() for d in m.group(2).split(",")]
            flags = re.findall(r"`(--[a-z0-9-]+)`", m.group(1))
            for i, flag in enumerate(flags):
                rows[flag] = defaults[i] if len(defaults) == len(flags) else defaults[0]
    return rows


@pytest.mark.parametrize(
    ("heading", "parser"),
    [("## The controller", controller_parser), ("## The proxy", proxy_parser)],
)
def test_flag_tables_match_the_parsers(
    heading: str, parser: Callable[[], argparse.ArgumentParser]
) -> None:
    p = parser()
    defaults = {a.option_strings[0]: a.default for a in p._actions if a.option_strings}
    rows = table_after(heading)
    assert rows, heading
    for flag, shown in rows.items():
        assert flag in defaults, f"README shows {flag}, which {p.prog} does not have"
        literal = re.fullmatch(r"`([^`$]*)`(?: \(.*\))?", shown)
        if literal and literal.group(1) != "":
            assert literal.group(1) == str(defaults[flag]).removesuffix(".0"), (flag, shown)
    for flag in defaults:
        assert flag in rows or flag == "-h", f"README's table lacks {flag}"
