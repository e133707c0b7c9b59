"""The chaos net's pure half: each checker, handed a bad state, must report it.

The model and checkers decide whether a round on the real environment passes; a checker that
cannot fail would make every round pass. Each bad state below is one the issue names (a mix of
leaf and key, another revision, a snapshot of our own content, a rollback restoring an older
state, a webhook delivered twice with different ids or never).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.certfactory import make_chain
from tests.chaos.model import (
    ABSENT,
    FAULT_KINDS,
    SEED,
    Delivery,
    ObservedRun,
    ObservedSnapshot,
    OwnerWrite,
    RunRecord,
    Step,
    TargetModel,
    Version,
    Violation,
    check_no_internal_errors,
    check_runs_final,
    check_secrets,
    check_snapshots,
    check_webhooks,
    delivery_from_request,
    fault_schedule,
    identify,
    is_ours,
    known_cause,
    owner_may_write,
    replay,
    version_of,
)

# ------------------------------------------------------------------------------ schedule


@given(seed=st.integers(min_value=0, max_value=2**32), duration=st.floats(30, 1800))
@settings(max_examples=40, deadline=None)
def test_a_schedule_is_a_function_of_its_seed_and_covers_every_kind(
    seed: int, duration: float
) -> None:
    schedule = fault_schedule(seed, duration=duration)
    assert schedule == fault_schedule(seed, duration=duration)
    assert {fault.kind for fault in schedule} == set(FAULT_KINDS)
    assert [fault.at for fault in schedule] == sorted(fault.at for fault in schedule)
    assert all(0 <= fault.at <= duration for fault in schedule)
    assert schedule[0].kind == "execute" and schedule[0].at == 0


def test_different_seeds_give_different_schedules() -> None:
    assert fault_schedule(1, duration=90) != fault_schedule(2, duration=90)


def test_one_rollback_is_aimed_shortly_after_an_execute() -> None:
    schedule = fault_schedule(7, duration=90)
    executes = [fault.at for fault in schedule if fault.kind == "execute"]
    aimed = [fault for fault in schedule if fault.kind == "rollback" and fault.arg == 0]
    assert any(0.5 <= rollback.at - at <= 3.0 for rollback in aimed for at in executes)


def test_a_skipped_kind_is_left_out_and_the_rest_of_the_schedule_kept() -> None:
    full = fault_schedule(3, duration=120)
    without = fault_schedule(3, duration=120, skip=frozenset({"renew"}))
    assert without == [fault for fault in full if fault.kind != "renew"]


@pytest.mark.parametrize("skip", [{"execute"}, {"reboot"}])
def test_skipping_executes_or_an_unknown_kind_is_refused_naming_the_kinds(skip: set[str]) -> None:
    with pytest.raises(ValueError, match="kinds that may be skipped: rollback, worker_kill"):
        fault_schedule(3, duration=120, skip=frozenset(skip))


def test_a_round_too_short_to_hold_every_fault_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 30 s"):
        fault_schedule(1, duration=10)


# ------------------------------------------------------------------------------ contents


@pytest.fixture(scope="module")
def chains() -> dict[str, object]:
    return {label: make_chain(cn="shop.example.com", fresh_leaf_key=True) for label in ("v0", "v1")}


@pytest.fixture(scope="module")
def versions(chains: dict[str, object]) -> list[Version]:
    return [version_of(label, c.leaf_pem, c.key_pem) for label, c in chains.items()]  # type: ignore[attr-defined]


def test_identify_names_a_known_version_from_its_full_chain(chains, versions) -> None:  # type: ignore[no-untyped-def]
    v1 = chains["v1"]
    assert identify(v1.fullchain_pem, v1.key_pem, versions).label == "v1"
    assert identify(None, None, versions).label == ABSENT


def test_identify_reports_a_leaf_of_one_version_with_the_key_of_another(chains, versions) -> None:  # type: ignore[no-untyped-def]
    seen = identify(chains["v0"].fullchain_pem, chains["v1"].key_pem, versions)
    assert seen.label is None and "mix: the leaf of v0 with the key of v1" in (seen.problem or "")


def test_identify_reports_a_revision_the_scenario_does_not_know(versions) -> None:  # type: ignore[no-untyped-def]
    other = make_chain(cn="shop.example.com", fresh_leaf_key=True)
    seen = identify(other.fullchain_pem, other.key_pem, versions)
    assert seen.label is None and "another revision" in (seen.problem or "")


def test_identify_reports_an_empty_key() -> None:
    assert identify(b"x", b"", []).problem == "tls.crt or tls.key is missing or empty"


# -------------------------------------------------------------------------------- replay


def _execute(run_id: str, pinned: str, **results: tuple[str, str | None]) -> RunRecord:
    return RunRecord(run_id, "execute", pinned, "succeeded", results)


def _rollback(run_id: str, **results: tuple[str, str | None]) -> RunRecord:
    return RunRecord(run_id, "rollback", None, "succeeded", results)


def test_a_written_target_holds_exactly_the_pinned_revision_and_snapshots_what_was_there() -> None:
    model = replay({"a": SEED}, [_execute("r1", "v0", a=("updated", None))])
    assert model["a"] == TargetModel(frozenset({"v0"}), frozenset({SEED}))


def test_a_failed_write_allows_the_content_before_or_the_pinned_revision() -> None:
    model = replay({"a": SEED}, [_execute("r1", "v0", a=("failed", "unreachable"))])
    assert model["a"] == TargetModel(frozenset({SEED, "v0"}), None)


def test_a_refusal_before_the_write_changes_nothing() -> None:
    model = replay({"a": SEED}, [_execute("r1", "v0", a=("failed", "unmanaged_secret"))])
    assert model["a"].live == {SEED}


def test_a_later_write_snapshots_the_content_before_our_first_write_never_ours() -> None:
    # The first write may have landed (its answer lost); the second one lands: the snapshot
    # must be the team's Secret, not v0 (ours, of an older revision).
    model = replay(
        {"a": SEED},
        [_execute("r1", "v0", a=("failed", "timeout")), _execute("r2", "v1", a=("updated", None))],
    )
    assert model["a"] == TargetModel(frozenset({"v1"}), frozenset({SEED}))


def test_a_rollback_restores_the_snapshot_and_opens_a_new_generation() -> None:
    steps: list[Step] = [
        _execute("r1", "v0", a=("updated", None)),
        _rollback("r2", a=("rolled_back", None)),
        OwnerWrite("a", "owner-1"),
        _execute("r3", "v1", a=("updated", None)),
    ]
    model = replay({"a": SEED}, steps)
    assert model["a"] == TargetModel(frozenset({"v1"}), frozenset({"owner-1"}))
    restored = replay({"a": SEED}, [*steps, _rollback("r4", a=("rolled_back", None))])
    assert restored["a"].live == {"owner-1"}


def test_nothing_to_restore_leaves_our_content() -> None:
    model = replay(
        {"a": ABSENT},
        [
            _execute("r1", "v0", a=("created", None)),
            _rollback("r2", a=("failed", "nothing_to_restore")),
        ],
    )
    assert model["a"] == TargetModel(frozenset({"v0"}), frozenset({ABSENT}))


def test_the_owner_writes_only_where_its_own_content_surely_is() -> None:
    assert owner_may_write(TargetModel(frozenset({SEED})))
    assert not owner_may_write(TargetModel(frozenset({ABSENT})))
    assert not owner_may_write(TargetModel(frozenset({SEED, "v0"})))
    assert not owner_may_write(TargetModel(frozenset({"v0"}), frozenset({SEED})))


def test_ours_are_the_certificate_versions() -> None:
    assert is_ours("v0") and is_ours("v12")
    assert not any(map(is_ours, [SEED, ABSENT, "owner-1", "v", "vx"]))


# ------------------------------------------------------------------------------ checkers


def test_a_run_left_running_is_reported() -> None:
    found = check_runs_final([ObservedRun("r1", "execute", "running")])
    assert [v.invariant for v in found] == ["run-final"]


def test_a_final_run_with_a_pending_target_is_reported() -> None:
    found = check_runs_final([ObservedRun("r1", "execute", "succeeded", {"a": ("pending", None)})])
    assert "a still pending" in str(found[0])


def test_an_internal_error_is_reported() -> None:
    run = ObservedRun("r1", "execute", "failed", {"a": ("failed", "internal_error")})
    assert [v.invariant for v in check_no_internal_errors([run])] == ["no-internal-error"]


def test_another_revision_than_the_pinned_one_is_reported() -> None:
    # The run pinned v0 (enqueued before the renewal) and a later batch deployed v1.
    model = replay(
        {"a": SEED, "b": SEED}, [_execute("r1", "v0", a=("updated", None), b=("updated", None))]
    )
    found = check_secrets(model, {"a": _seen("v0"), "b": _seen("v1")})
    assert [(v.subject, v.detail) for v in found] == [("b", "holds v1; allowed: v0")]


def test_a_mix_of_leaf_and_key_is_reported() -> None:
    model = {"a": TargetModel(frozenset({"v0"}))}
    found = check_secrets(model, {"a": _problem("mix: the leaf of v0 with the key of v1")})
    assert "mix" in found[0].detail


def test_a_secret_not_observed_is_reported() -> None:
    assert check_secrets({"a": TargetModel(frozenset({"v0"}))}, {})[0].detail == "not observed"


def test_a_snapshot_of_our_own_content_is_reported() -> None:
    model = {"a": TargetModel(frozenset({"v1"}), frozenset({SEED}))}
    found = check_snapshots(model, {"a": ObservedSnapshot("v0", final=True)})
    assert found[0].detail == "holds our own content v0"


def test_a_final_snapshot_of_an_older_generation_is_reported() -> None:
    # Issue 17 §2 B: the owner rotated after a rollback; the snapshot must be the rotation.
    model = {"a": TargetModel(frozenset({"v1"}), frozenset({"owner-1"}))}
    found = check_snapshots(model, {"a": ObservedSnapshot(SEED, final=True)})
    assert "final snapshot holds seed" in found[0].detail
    assert not check_snapshots(model, {"a": ObservedSnapshot(SEED, final=False)})


def test_a_webhook_never_delivered_or_delivered_with_two_ids_is_reported() -> None:
    runs = [
        ObservedRun("r1", "execute", "succeeded", webhook_run="w1"),
        ObservedRun("r2", "execute", "succeeded", webhook_run="w2"),
        ObservedRun("r3", "execute", "succeeded"),
        ObservedRun("r4", "execute", "failed"),
        ObservedRun("w1", "execute", "succeeded", stacked=True),  # the webhook run itself
    ]
    deliveries = [Delivery("w1", "r1", "fp0"), Delivery("x", "r1", "fp0")]
    found = check_webhooks(runs, deliveries, {"r1": "fp0"})
    assert sorted((v.subject, v.detail.split(" ")[0]) for v in found) == [
        ("r1", "2"),
        ("r2", "succeeded"),
        ("r3", "succeeded"),
    ]


def test_a_webhook_reporting_another_revision_than_the_run_pinned_is_reported() -> None:
    runs = [ObservedRun("r1", "execute", "succeeded", webhook_run="w1")]
    found = check_webhooks(runs, [Delivery("w1", "r1", "fp1")], {"r1": "fp0"})
    assert "the run pinned fp0" in found[0].detail
    assert not check_webhooks(runs, [Delivery("w1", "r1", "fp0")] * 2, {"r1": "fp0"})


def test_a_recorded_request_is_read_with_any_header_case() -> None:
    body = b'{"trigger_run_id": "r1", "certificate": {"sha256_fingerprint": "ab"}}'
    assert delivery_from_request({"x-certautopilot-delivery": "w1"}, body) == Delivery(
        "w1", "r1", "ab"
    )
    assert delivery_from_request({}, b"not json") == Delivery(None, None, None)


def test_the_triage_hint_names_the_pinning_defect_only_for_its_signature() -> None:
    later = Violation("secret-content", "a", "holds v3; allowed: v0")
    earlier = Violation("secret-content", "a", "holds v0; allowed: seed, v2")
    mixed = Violation("secret-content", "a", "mix: the leaf of v0 with the key of v1")
    assert "§4" in (known_cause(later) or "")
    assert known_cause(earlier) is None and known_cause(mixed) is None
    webhook = Violation("webhook", "r1", "reported certificate ['b'], the run pinned a")
    assert "§4" in (known_cause(webhook) or "")


def _seen(label: str):  # type: ignore[no-untyped-def]
    from tests.chaos.model import Identified

    return Identified(label)


def _problem(problem: str):  # type: ignore[no-untyped-def]
    from tests.chaos.model import Identified

    return Identified(None, problem)
