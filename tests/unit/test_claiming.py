"""The tenancy rule for gRPC service names: the oldest claim wins, whatever the names say."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from controlplane.claiming import Claim, Claims
from weighbridge.keys import ServiceKey

NAME = "payments.Api"


def claim(key: str, created: str, *names: str) -> Claim:
    return Claim(ServiceKey(key), created, frozenset(names))


def winner(claims: Claims, name: str) -> str | None:
    found = claims.winner(name)
    return None if found is None else found.key


def test_the_older_service_wins_even_when_its_name_sorts_last() -> None:
    claims = Claims()
    claims.update(ServiceKey("payments/api"), claim("payments/api", "2024-01-01T00:00:00Z", NAME))
    claims.update(ServiceKey("aaa/evil"), claim("aaa/evil", "2024-06-01T00:00:00Z", NAME, "x.Y"))
    assert winner(claims, NAME) == "payments/api"
    assert winner(claims, "x.Y") == "aaa/evil"  # its other names are its own
    assert claims.taken == 1


def test_a_tie_in_age_goes_to_namespace_then_name() -> None:
    claims = Claims()
    same = "2024-01-01T00:00:00Z"
    for key in ("b/a", "a-b/z", "a/z", "a/y"):
        claims.update(ServiceKey(key), claim(key, same, NAME))
    # By namespace first ("a" < "a-b" < "b"), then name: not by the "ns/name" text.
    assert winner(claims, NAME) == "a/y"
    claims.update(ServiceKey("a/y"), None)
    assert winner(claims, NAME) == "a/z"
    claims.update(ServiceKey("a/z"), None)
    assert winner(claims, NAME) == "a-b/z"


def test_when_the_winner_goes_or_drops_the_name_the_next_oldest_gets_it() -> None:
    claims = Claims()
    old, new = ServiceKey("p/old"), ServiceKey("e/new")
    claims.update(old, claim(old, "2024-01-01T00:00:00Z", NAME, "a.B"))
    claims.update(new, claim(new, "2024-02-01T00:00:00Z", NAME))
    assert claims.update(old, claim(old, "2024-01-01T00:00:00Z", "a.B")) == {NAME}
    assert winner(claims, NAME) == new
    assert claims.claimants([NAME]) == {new}
    assert claims.taken == 0
    assert claims.update(old, claim(old, "2024-01-01T00:00:00Z", NAME, "a.B")) == {NAME}
    assert winner(claims, NAME) == old
    assert claims.update(old, None) == {NAME, "a.B"}
    assert winner(claims, NAME) == new
    assert winner(claims, "a.B") is None
    assert len(claims) == 1


def test_an_update_that_changes_no_claim_concerns_no_name() -> None:
    claims = Claims()
    key = ServiceKey("p/api")
    claims.update(key, claim(key, "2024-01-01T00:00:00Z", NAME))
    assert claims.update(key, claim(key, "2024-01-01T00:00:00Z", NAME)) == frozenset()
    assert claims.update(key, claim(key, "2024-01-01T00:00:00Z")) == {NAME}  # no names: none
    assert len(claims) == 0


KEYS = st.sampled_from([ServiceKey(k) for k in ("a/x", "a/y", "b/x", "c/z")])
NAMES = st.frozensets(st.sampled_from(["n.A", "n.B", "n.C"]), max_size=3)
TIMES = st.sampled_from(["2024-01-01T00:00:00Z", "2024-01-01T00:00:01Z", "2025-01-01T00:00:00Z"])


@given(st.lists(st.tuples(KEYS, st.none() | st.tuples(TIMES, NAMES)), max_size=30))
def test_index_agrees_with_a_recomputation_after_any_updates(
    updates: list[tuple[ServiceKey, tuple[str, frozenset[str]] | None]],
) -> None:
    claims = Claims()
    current: dict[ServiceKey, Claim] = {}
    for key, value in updates:
        new = None if value is None else Claim(key, value[0], value[1])
        before = {n: winner(claims, n) for n in ("n.A", "n.B", "n.C")}
        changed = claims.update(key, new)
        after = {n: winner(claims, n) for n in ("n.A", "n.B", "n.C")}
        # Every name whose winner changed is reported, so its claimants get requeued.
        assert {n for n in before if before[n] != after[n]} <= changed
        if new is not None and new.names:
            current[key] = new
        else:
            current.pop(key, None)
    for name in ("n.A", "n.B", "n.C"):
        claimants = [c for c in current.values() if name in c.names]
        expected = min(claimants, key=lambda c: c.rank).key if claimants else None
        assert winner(claims, name) == expected
        assert claims.claimants([name]) == {c.key for c in claimants}
    assert claims.taken == sum(
        max(0, len([c for c in current.values() if n in c.names]) - 1)
        for n in ("n.A", "n.B", "n.C")
    )
