"""The controller's settings have one home: the flags, the Controller and the chart all defer
to ControllerSettings, and every default says why it is what it is."""

from __future__ import annotations

import ast
import dataclasses
import inspect

import pytest

from controlplane import main
from controlplane.settings import DEFAULTS, ControllerSettings

OTHERS = ControllerSettings(
    source="endpoints",
    lease_ttl=DEFAULTS.lease_ttl + 7,
    resync_interval=DEFAULTS.resync_interval + 7.5,
    workers=DEFAULTS.workers + 7,
    admin_listen="127.0.0.1:19401",
    health_listen="127.0.0.1:19403",
    metrics_listen="127.0.0.1:19402",
    grpc_service_namespaces=("shop", "payments"),
)
"""Settings that differ from DEFAULTS in every field."""


def test_flags_without_arguments_give_the_default_settings() -> None:
    assert main.settings_of(main.build_parser().parse_args([])) == DEFAULTS


def test_every_flag_default_comes_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert all(
        getattr(OTHERS, f.name) != getattr(DEFAULTS, f.name) for f in dataclasses.fields(OTHERS)
    )
    monkeypatch.setattr(main, "DEFAULTS", OTHERS)
    parsed = main.settings_of(main.build_parser().parse_args([]))
    assert parsed == OTHERS, "a flag has a default of its own: take it from DEFAULTS"


def test_every_setting_has_a_docstring() -> None:
    (cls,) = ast.parse(inspect.getsource(ControllerSettings)).body
    assert isinstance(cls, ast.ClassDef)
    documented = {
        field.target.id
        for field, doc in zip(cls.body, cls.body[1:], strict=False)
        if isinstance(field, ast.AnnAssign)
        and isinstance(field.target, ast.Name)
        and isinstance(doc, ast.Expr)
        and isinstance(doc.value, ast.Constant)
        and isinstance(doc.value.value, str)
    }
    assert documented == {f.name for f in dataclasses.fields(ControllerSettings)}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--workers", "0"], "workers must be at least 1, not 0"),
        (["--lease-ttl", "1"], "lease TTL must be at least 2 s, not 1"),
        (["--resync", "0"], "resync interval must be > 0 s, not 0.0"),
        (["--source", "pods"], "invalid choice: 'pods'"),
        (["--grpc-service-namespaces", "shop,Shop"], "'Shop' is not a namespace name"),
        (["--grpc-service-namespaces", "*,shop"], "'*' already means every namespace"),
        (["--grpc-service-namespaces", "shop,shop"], "a namespace is listed twice"),
    ],
)
def test_out_of_range_flags_fail_with_a_clear_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "namespaces", "routed"),
    [
        ("*", ("*",), {"shop": True, "kube-system": True}),
        ("", (), {"shop": False, "kube-system": False}),
        (" shop, payments ,", ("shop", "payments"), {"shop": True, "payments": True, "x": False}),
    ],
)
def test_grpc_service_namespaces_flag(
    flag: str, namespaces: tuple[str, ...], routed: dict[str, bool]
) -> None:
    settings = main.settings_of(main.build_parser().parse_args(["--grpc-service-namespaces", flag]))
    assert settings.grpc_service_namespaces == namespaces
    assert {ns: settings.routes_names_in(ns) for ns in routed} == routed
