"""The proxy's settings: flags default to the one dataclass, and the CPUs it may use."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dataplane.main import build_parser, settings_of
from dataplane.settings import DEFAULTS, ProxySettings, available_cpus


def test_flags_default_to_the_settings_dataclass() -> None:
    assert settings_of(build_parser().parse_args([])) == DEFAULTS


def test_flags_become_settings() -> None:
    args = build_parser().parse_args(
        ["--threads", "3", "--max-connection-age", "300", "--lazy-connect", "--admin-listen", ""]
    )
    s = settings_of(args)
    assert (s.threads, s.max_connection_age, s.eager_connections, s.admin_listen) == (
        3,
        300.0,
        False,
        None,
    )


def test_backend_connection_flags_become_settings() -> None:
    args = build_parser().parse_args(
        [
            "--backend-handshake-timeout",
            "0.5",
            "--backend-keepalive-time",
            "0",
            "--backend-keepalive-timeout",
            "1.5",
            "--retry-buffer-bytes",
            "1024",
        ]
    )
    s = settings_of(args)
    assert (
        s.handshake_timeout_s,
        s.keepalive_time_s,
        s.keepalive_timeout_s,
        s.retry_buffer_bytes,
    ) == (0.5, 0.0, 1.5, 1024)


def test_xds_flags_become_settings_and_the_server_is_off_by_default() -> None:
    assert DEFAULTS.xds_listen is None and DEFAULTS.xds_namespaces == ()
    s = settings_of(
        build_parser().parse_args(
            [
                "--xds-listen",
                "0.0.0.0:18000",
                "--xds-namespaces",
                "shop, default",
                "--xds-max-streams",
                "9",
            ]
        )
    )
    assert (s.xds_listen, s.xds_namespaces, s.xds_max_streams) == (
        "0.0.0.0:18000",
        ("shop", "default"),
        9,
    )


def test_xds_namespaces_without_an_xds_server_are_refused() -> None:
    with pytest.raises(ValueError, match="--xds-namespaces needs --xds-listen"):
        ProxySettings(xds_namespaces=("shop",))


@pytest.mark.parametrize(
    ("namespaces", "message"),
    [
        (("Shop",), "'Shop' is not a namespace name"),
        (("*", "shop"), "'\\*' already means every namespace"),
        (("shop", "shop"), "listed twice"),
    ],
)
def test_xds_namespaces_are_namespace_names(namespaces: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValueError, match=f"xDS namespaces: .*{message}"):
        ProxySettings(xds_listen="127.0.0.1:0", xds_namespaces=namespaces)


@pytest.mark.parametrize(
    "kw",
    [
        {"threads": 0},
        {"max_connection_age": -1.0},
        {"max_backend_connections": 0},
        {"max_message_bytes": 0},
        {"handshake_timeout_s": 0.0},
        {"handshake_timeout_s": float("inf")},
        {"keepalive_time_s": -1.0},
        {"keepalive_time_s": float("nan")},
        {"keepalive_timeout_s": 0.0},
        {"retry_buffer_bytes": 0},
        {"xds_max_streams": 0},
    ],
)
def test_bad_settings_are_refused(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        ProxySettings(**kw)  # type: ignore[arg-type]


def test_zero_threads_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--threads", "0"])
    assert "must be at least 1" in capsys.readouterr().err


def fake_cgroup(tmp_path: Path, proc: str, files: dict[str, str]) -> dict[str, Path]:
    for name, text in files.items():
        (tmp_path / "fs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fs" / name).write_text(text)
    (tmp_path / "cgroup").write_text(proc)
    return {"proc_self_cgroup": tmp_path / "cgroup", "root": tmp_path / "fs"}


AFFINITY = len(os.sched_getaffinity(0))


def test_no_quota_means_the_affinity(tmp_path: Path) -> None:
    paths = fake_cgroup(tmp_path, "0::/pod\n", {"pod/cpu.max": "max 100000\n"})
    assert available_cpus(**paths) == AFFINITY


def test_cgroup_v2_quota_rounds_up_and_ancestors_count(tmp_path: Path) -> None:
    paths = fake_cgroup(
        tmp_path,
        "0::/kubepods/pod/ctr\n",
        {"kubepods/pod/ctr/cpu.max": "max 100000\n", "kubepods/pod/cpu.max": "50000 100000\n"},
    )
    assert available_cpus(**paths) == 1
    (tmp_path / "fs/kubepods/pod/cpu.max").write_text("150000 100000\n")
    assert available_cpus(**paths) == min(AFFINITY, 2)


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    paths = fake_cgroup(
        tmp_path,
        "5:memory:/x\n4:cpu,cpuacct:/docker/abc\n",
        {
            "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "100000\n",
            "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
        },
    )
    assert available_cpus(**paths) == 1
    (tmp_path / "fs/cpu,cpuacct/docker/abc/cpu.cfs_quota_us").write_text("-1\n")
    assert available_cpus(**paths) == AFFINITY


def test_unreadable_cgroups_mean_the_affinity(tmp_path: Path) -> None:
    assert available_cpus(proc_self_cgroup=tmp_path / "none", root=tmp_path) == AFFINITY
    paths = fake_cgroup(tmp_path, "0::/\n", {"cpu.max": "garbage\n"})
    assert available_cpus(**paths) == AFFINITY


def test_admin_listens_on_loopback_and_health_on_every_interface() -> None:
    """The admin API tells every backend of every Service: only ``kubectl port-forward``
    (which enters the pod) reaches it by default, while the kubelet probes the pod's IP."""
    from controlplane.settings import DEFAULTS as CONTROLLER

    for settings in (DEFAULTS, CONTROLLER):
        assert settings.admin_listen is not None and settings.admin_listen.startswith("127.0.0.1:")
        assert settings.health_listen is not None and settings.health_listen.startswith("0.0.0.0:")
    assert (DEFAULTS.admin_listen, DEFAULTS.health_listen) == ("127.0.0.1:9501", "0.0.0.0:9503")
    assert (CONTROLLER.admin_listen, CONTROLLER.health_listen) == ("127.0.0.1:9401", "0.0.0.0:9403")
