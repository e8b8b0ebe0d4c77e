"""Weights and endpoint merging: the arithmetic behind "90% to v1" (pure functions)."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.annotations import WeightSpec, parse_pod_weight, parse_service, parse_weights
from controlplane.building import (
    RawEndpoint,
    assign_weights,
    build_backend_set,
    endpoints_from_slices,
    select_port,
)
from controlplane.errors import AnnotationError
from tests.unit.test_annotations import HOSTILE_TEXT


def raw(
    i: int, pod: str | None = None, serving: bool = True, terminating: bool = False
) -> RawEndpoint:
    return RawEndpoint(f"198.18.0.{i + 1}", 80, serving, terminating, "", "", pod or f"p{i}")


def pods(
    labels: dict[str, dict[str, str]], weights: dict[str, str] | None = None
) -> dict[str, Any]:
    weights = weights or {}
    return {
        name: {
            "metadata": {
                "name": name,
                "labels": lab,
                "annotations": {"weighbridge.io/weight": weights[name]} if name in weights else {},
            }
        }
        for name, lab in labels.items()
    }


def weights_of(endpoints: list[RawEndpoint], spec: WeightSpec, pods: dict[str, Any]) -> list[int]:
    """The weights assign_weights gives, when every pod annotation is good."""
    weights, problems = assign_weights(endpoints, spec, pods)
    assert problems == []
    return weights


def shares(weights: list[int]) -> list[Fraction]:
    total = sum(weights)
    return [Fraction(w, total) for w in weights]


def test_no_groups_uses_pod_weights() -> None:
    eps = [raw(0), raw(1), raw(2)]
    ws = weights_of(
        eps, parse_weights("pod/p2: 5"), pods({"p0": {}, "p1": {}, "p2": {}}, {"p1": "3"})
    )
    assert ws == [1, 3, 5]


@pytest.mark.parametrize(("n1", "n2"), [(9, 1), (1, 9), (3, 7), (150, 1), (7, 13)])
def test_group_shares_are_exact(n1: int, n2: int) -> None:
    eps = [raw(i) for i in range(n1 + n2)]
    labels = {f"p{i}": {"version": "v1" if i < n1 else "v2"} for i in range(n1 + n2)}
    ws = weights_of(eps, parse_weights("version=v1: 90%\nversion=v2: 10%"), pods(labels))
    s = shares(ws)
    assert sum(s[:n1]) == Fraction(9, 10)
    assert sum(s[n1:]) == Fraction(1, 10)


def test_pod_weights_split_a_group_share() -> None:
    eps = [raw(0), raw(1), raw(2)]
    labels = {"p0": {"v": "1"}, "p1": {"v": "1"}, "p2": {"v": "2"}}
    ws = weights_of(eps, parse_weights("v=1: 50%\nv=2: 50%"), pods(labels, {"p0": "3"}))
    assert shares(ws) == [Fraction(3, 8), Fraction(1, 8), Fraction(1, 2)]


def test_unmatched_pods_get_nothing_unless_a_rest_group_exists() -> None:
    eps = [raw(0), raw(1)]
    labels = {"p0": {"v": "1"}, "p1": {"v": "3"}}
    assert weights_of(eps, parse_weights("v=1: 1"), pods(labels)) == [1, 0]
    assert shares(weights_of(eps, parse_weights("v=1: 80%\n*: 20%"), pods(labels))) == [
        Fraction(4, 5),
        Fraction(1, 5),
    ]


def test_empty_group_share_is_redistributed() -> None:
    eps = [raw(0), raw(1)]
    labels = {"p0": {"v": "1"}, "p1": {"v": "1"}}
    ws = weights_of(eps, parse_weights("v=1: 90%\nv=2: 10%"), pods(labels))
    assert shares(ws) == [Fraction(1, 2), Fraction(1, 2)]


def test_group_shares_hold_among_serving_endpoints() -> None:
    eps = [raw(0), raw(1, serving=False), raw(2, terminating=True), raw(3)]
    labels = {f"p{i}": {"v": "1" if i < 3 else "2"} for i in range(4)}
    ws = weights_of(eps, parse_weights("v=1: 90%\nv=2: 10%"), pods(labels))
    assert ws[1] == ws[2] == 0
    assert shares(ws)[0] == Fraction(9, 10)


def test_first_matching_group_wins() -> None:
    eps = [raw(0)]
    ws = weights_of(eps, parse_weights("a=1: 1\nb=1: 1"), pods({"p0": {"a": "1", "b": "1"}}))
    assert ws == [1]


@pytest.mark.parametrize("bad", ["-2", "1.5", "²", "٣", "9" * 5000, "1000001", "3\x00", ""])
@pytest.mark.parametrize("groups", ["", "v=1: 50%\nv=2: 50%"])
def test_a_bad_pod_weight_gives_that_pod_the_default_weight_and_names_it(
    bad: str, groups: str
) -> None:
    eps = [raw(0), raw(1), raw(2)]
    labels = {"p0": {"v": "1"}, "p1": {"v": "1"}, "p2": {"v": "2"}}
    ws, problems = assign_weights(eps, parse_weights(groups), pods(labels, {"p0": bad, "p1": "3"}))
    # p0 counts as 1 beside p1's good 3: only the bad pod is affected.
    assert ws[1] == 3 * ws[0] > 0
    assert [p.reason for p in problems] == ["InvalidPodWeight"]
    assert "pod p0" in problems[0].message
    assert "default weight 1" in problems[0].message
    assert len(problems[0].message) < 300


def test_unusable_endpoints_are_left_out_and_named() -> None:
    service = {"metadata": {"namespace": "ns", "name": "svc", "annotations": {}}}
    odd = RawEndpoint("010.1.2.3", 80, True, False, "", "", "p9")
    built = build_backend_set(
        service=service,
        spec=parse_service({"weighbridge.io/strategy": "round_robin"}),
        raw=[raw(0), odd, raw(1)],
        pods={},
        source="endpointslices",
        generation=1,
        built_unix_nanos=0,
    )
    assert [e.address for e in built.backend_set.endpoints] == ["198.18.0.1", "198.18.0.2"]
    assert [p.reason for p in built.problems] == ["InvalidEndpoint"]
    assert "'010.1.2.3'" in built.problems[0].message
    assert "pod p9" in built.problems[0].message


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=8), st.data())
def test_many_groups_shares_within_a_millionth(sizes: list[int], data: st.DataObject) -> None:
    group_shares = [data.draw(st.integers(1, 1000)) for _ in sizes]
    text = "\n".join(f"g={i}: {s}" for i, s in enumerate(group_shares))
    eps, labels = [], {}
    for g, size in enumerate(sizes):
        for j in range(size):
            name = f"p{g}-{j}"
            eps.append(raw(len(eps), pod=name))
            labels[name] = {"g": str(g)}
    ws = weights_of(eps, parse_weights(text), pods(labels))
    assert all(0 < w < 2**32 for w in ws)
    s = shares(ws)
    total = sum(group_shares)
    start = 0
    for g, size in enumerate(sizes):
        got = sum(s[start : start + size])
        assert abs(got - Fraction(group_shares[g], total)) <= Fraction(size, 1_000_000)
        start += size


def test_slices_are_merged_and_duplicates_keep_the_best() -> None:
    def sl(eps: list[dict[str, Any]], port_name: str = "grpc") -> dict[str, Any]:
        return {
            "addressType": "IPv4",
            "ports": [{"name": port_name, "port": 9000}],
            "endpoints": eps,
        }

    a = sl([{"addresses": ["198.18.0.2"], "conditions": {"ready": False, "serving": False}}])
    b = sl([{"addresses": ["198.18.0.2"], "conditions": {}}, {"addresses": ["198.18.0.1"]}])
    other = sl([{"addresses": ["198.18.0.9"]}], port_name="metrics")
    fqdn = {
        "addressType": "FQDN",
        "ports": [{"name": "grpc", "port": 1}],
        "endpoints": [{"addresses": ["x.example"]}],
    }
    out = endpoints_from_slices([a, b, other, fqdn], "grpc")
    assert [(e.address, e.port, e.serving) for e in out] == [
        ("198.18.0.1", 9000, True),
        ("198.18.0.2", 9000, True),
    ]


def test_endpointslice_hints_are_kept_and_junk_in_them_ignored() -> None:
    eps = [
        {
            "addresses": ["198.18.0.1"],
            "zone": "zone-a",
            "hints": {
                "forZones": [{"name": "zone-b"}, {"name": "zone-a"}, {"name": 7}, "zone-c"],
                "forNodes": [{"name": "node-1"}],
            },
        },
        {"addresses": ["198.18.0.2"], "hints": {"forZones": "zone-a"}},
        {"addresses": ["198.18.0.3"]},
    ]
    out = endpoints_from_slices(
        [{"addressType": "IPv4", "ports": [{"name": "grpc", "port": 9}], "endpoints": eps}],
        "grpc",
    )
    assert [(e.hint_zones, e.hint_nodes) for e in out] == [
        (("zone-a", "zone-b"), ("node-1",)),
        ((), ()),
        ((), ()),
    ]
    built = build_backend_set(
        service={"metadata": {"namespace": "default", "name": "shop"}},
        spec=parse_service({"weighbridge.io/strategy": "round_robin"}),
        raw=out,
        pods={},
        source="endpointslices",
        generation=1,
        built_unix_nanos=0,
    )
    assert built.backend_set.endpoints[0].hint_zones == ("zone-a", "zone-b")


def test_port_selection() -> None:
    one = {"spec": {"ports": [{"port": 80}]}}
    assert select_port(one, None) == ("", 80)
    two = {"spec": {"ports": [{"name": "http", "port": 80}, {"name": "grpc", "port": 9000}]}}
    assert select_port(two, None) == ("grpc", 9000)
    assert select_port(two, "80") == ("http", 80)
    three = {"spec": {"ports": [{"name": "a", "port": 1}, {"name": "b", "port": 2}]}}
    with pytest.raises(AnnotationError, match=r"weighbridge\.io/port"):
        select_port(three, None)


def test_failover_policies_go_into_the_sets_options_only_when_annotated() -> None:
    def built(annotations: dict[str, str]) -> dict[str, str]:
        service = {"metadata": {"namespace": "ns", "name": "svc", "annotations": annotations}}
        built_set = build_backend_set(
            service=service,
            spec=parse_service({"weighbridge.io/strategy": "round_robin", **annotations}),
            raw=[raw(0)],
            pods={},
            source="endpointslices",
            generation=1,
            built_unix_nanos=0,
        )
        return dict(built_set.backend_set.options)

    assert built({}) == {}
    assert built({"weighbridge.io/retry": "on: 14", "weighbridge.io/panic-threshold": "10%"}) == {
        "retry": "on: unavailable; attempts: 2; backoff: 25ms..250ms; budget: 20% + 10/s",
        "panic-threshold": "10%",
    }


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.none() | HOSTILE_TEXT, min_size=1, max_size=6),
    st.sampled_from(["", "v=1: 1\n*: 1", "v=1: 100%", "pod/p0: 2"]),
)
def test_fuzz_no_pod_annotation_stops_a_set(values: list[str | None], weights: str) -> None:
    """Whatever pods carry, the set is built: a bad weight is that pod's problem only."""
    eps = [raw(i) for i in range(len(values))]
    labels = {f"p{i}": {"v": str(i % 2)} for i in range(len(values))}
    annotated = {f"p{i}": v for i, v in enumerate(values) if v is not None}
    service = {"metadata": {"namespace": "ns", "name": "svc", "annotations": {}}}
    built = build_backend_set(
        service=service,
        spec=parse_service(
            {"weighbridge.io/strategy": "weighted_random", "weighbridge.io/weights": weights}
        ),
        raw=eps,
        pods=pods(labels, annotated),
        source="endpointslices",
        generation=1,
        built_unix_nanos=0,
    )
    assert len(built.backend_set.endpoints) == len(values)
    assert {p.reason for p in built.problems} <= {"InvalidPodWeight"}
    bad = {p.message.split(":")[0] for p in built.problems}
    for i, value in enumerate(values):
        if f"pod/p{i}:" in weights:
            continue  # the Service's own weight for the pod wins; its annotation is not read
        try:
            parse_pod_weight(
                f"p{i}", {"weighbridge.io/weight": value} if value is not None else None
            )
        except AnnotationError:
            assert f"pod p{i}" in bad
