"""The Dockerfile's second front end (devtools/image.py) reads the Dockerfile the project ships,
and refuses what it cannot do the way Docker does."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from devtools.image import Config, Instruction, apply_step, base_suite, parse, split_run

ROOT = Path(__file__).resolve().parents[2]


def test_the_projects_dockerfile_is_one_it_can_build() -> None:
    stages = parse((ROOT / "Dockerfile").read_text())
    assert len(stages) == 2
    final = stages[-1]
    assert base_suite(final[0]) == "trixie"
    config = Config()
    for ins in final[1:]:
        if ins.keyword == "RUN":
            mounts, command = split_run(ins)
            assert all(stage == "build" for stage, _, _ in mounts), ins
            assert command.startswith("/usr/local/lib/weighbridge/install "), command
        else:
            apply_step(ins, Path("/nonexistent"), ROOT, {}, config, execute=False)
    assert config.user == "65532:65532"
    assert config.env["PATH"].startswith("/opt/weighbridge/bin:")
    assert config.cmd == ["weighbridge-proxy", "--help"] and config.entrypoint == []
    assert "8080/tcp" in config.exposed


def test_what_it_cannot_do_is_refused() -> None:
    with pytest.raises(ValueError, match="only debian:<suite>-slim"):
        base_suite(Instruction("FROM", "python:3.13-slim", 1))
    with pytest.raises(ValueError, match="HEALTHCHECK is not supported"):
        apply_step(
            Instruction("HEALTHCHECK", "CMD true", 7), Path("/x"), ROOT, {}, Config(), execute=False
        )
    with pytest.raises(ValueError, match="RUN option '--network=none'"):
        split_run(Instruction("RUN", "--network=none true", 3))
    stages = parse("FROM debian:trixie-slim AS a\n# c\nRUN a \\\n  # inside\n  b\n")
    assert [(i.keyword, i.args, i.line) for i in stages[0]] == [
        ("FROM", "debian:trixie-slim AS a", 1),
        ("RUN", "a  b", 3),
    ]


def test_the_build_stage_copies_every_package_the_project_ships() -> None:
    """A package the wheel lists but the Dockerfile does not copy would be missing from the
    image (as wbtools once was: the etcd-auth Job's wbctl could not start)."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        find = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]["include"]
    shipped = {pattern.rstrip("*") for pattern in find}
    build = parse((ROOT / "Dockerfile").read_text())[0]
    copied = {ins.args.split()[0] for ins in build if ins.keyword == "COPY"}
    assert shipped <= copied, sorted(shipped - copied)
