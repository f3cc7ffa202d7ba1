"""The fault test's checker on synthetic histories: each violation is found, and named."""

from __future__ import annotations

from tests.jepsen.checker import (
    FAILED,
    OK,
    UNKNOWN,
    Joined,
    Publish,
    Received,
    Stored,
    SubscriberHistory,
    check,
    check_storage,
    check_subscriber,
    time_to_recover,
)

R = "jp:r0"


def _pubs(*seqs: int, room: str = R) -> list[Publish]:
    return [Publish(f"m{s}", room, OK, s, acked_at=float(s)) for s in seqs]


def _stored(*seqs: int, room: str = R) -> list[Stored]:
    return [Stored(room, s, f"m{s}") for s in seqs]


def _join(conn: int, seq: int, since: int | None = None, *, recovered: bool = True,
          replayed: int = 0, epoch: str = "e1", room: str = R, sent_at: float = 0.0,
          at: float = 0.0) -> Joined:
    return Joined(conn, room, since, seq, epoch, recovered if since is not None else False,
                  replayed, sent_at, at)


def _got(conn: int, *seqs: int, room: str = R, at: float = 0.0) -> list[Received]:
    return [Received(conn, room, s, at) for s in seqs]


def _history(*entries: Joined | Received | list[Received], name: str = "s0") -> SubscriberHistory:
    flat: list[Joined | Received] = []
    for e in entries:
        flat.extend(e if isinstance(e, list) else [e])
    return SubscriberHistory(name, flat)


def test_a_clean_history_with_churn_passes_and_counts() -> None:
    pubs = [*_pubs(1, 2, 3, 4, 5, 6), Publish("m7", R, OK, 7, attempts=3, acked_at=7.0)]
    # A first join at 1, two events live, a reconnect that recovers 4 and 5, then live 6, 7.
    h = _history(_join(0, 1), _got(0, 2, 3), _join(1, 5, 3, replayed=2), _got(1, 4, 5, 6, 7))
    report = check(pubs, _stored(1, 2, 3, 4, 5, 6, 7), [h])
    assert report.ok, report.format()
    s = report.summary()
    assert (s["acked"], s["retried"], s["gaps"], s["duplicates"], s["reorders"]) == (7, 1, 0, 0, 0)
    assert (s["joins"], s["replayed"], s["epochs seen"]) == (2, 2, 1)
    assert "PASS" in report.format()


def test_an_acked_publish_missing_from_the_stream_or_at_another_seq_fails() -> None:
    r = check_storage(_pubs(1, 2, 3), [Stored(R, 1, "m1"), Stored(R, 4, "m3")])
    assert any("acked but not stored: 1" in p and "m2" in p for p in r.problems), r.problems
    assert any("stored elsewhere" in p and "m3" in p for p in r.problems), r.problems


def test_a_msg_id_stored_twice_and_an_event_nobody_sent_fail() -> None:
    r = check_storage(_pubs(1), [Stored(R, 1, "m1"), Stored(R, 2, "m1"), Stored(R, 3, "zz")])
    assert any("more than once" in p for p in r.problems), r.problems
    assert any("never published" in p and "zz" in p for p in r.problems), r.problems


def test_unknown_publishes_may_be_stored_once_refused_ones_never() -> None:
    pubs = [Publish("a", R, UNKNOWN, attempts=4), Publish("b", R, UNKNOWN),
            Publish("c", R, FAILED)]
    r = check_storage(pubs, [Stored(R, 1, "a")])
    assert not r.problems and (r.unknown, r.unknown_stored, r.failed, r.retried) == (2, 1, 1, 1)
    r = check_storage(pubs, [Stored(R, 1, "c")])
    assert any("refused" in p for p in r.problems)


def test_a_stored_event_never_received_is_a_gap_and_the_report_says_which_connection() -> None:
    h = _history(_join(0, 0), _got(0, 1, 3), _join(1, 6, 3, replayed=1), _got(1, 4, 6))
    r = check_subscriber(h, {R: [1, 2, 3, 4, 5, 6]})
    assert r.gaps == 2, r.problems
    text = " ".join(r.problems)
    assert "[2] due by live on conn 0" in text and "[5] due by replay on conn 1" in text, text
    assert r.replay_mismatches == 1  # 4 and 5 are in (3, 6]: the node said 1


def test_events_at_or_before_the_first_cursor_are_not_expected() -> None:
    h = _history(_join(0, 5), _got(0, 6))
    assert check_subscriber(h, {R: [1, 2, 3, 4, 5, 6]}).gaps == 0


def test_recovered_false_explains_a_loss_but_is_a_failure_here() -> None:
    h = _history(_join(0, 1), _got(0, 2), _join(1, 5, 2, recovered=False), _got(1, 6))
    r = check_subscriber(h, {R: [1, 2, 3, 4, 5, 6]})
    assert (r.gaps, r.reset_losses, r.recovered_false) == (0, 3, 1)
    assert any("recovered:false" in p for p in r.problems)
    allowed = check_subscriber(h, {R: [1, 2, 3, 4, 5, 6]}, resets_allowed=True)
    assert not allowed.problems and allowed.reset_losses == 3


def test_a_first_join_is_not_a_recovered_false() -> None:
    r = check_subscriber(_history(_join(0, 3), _got(0, 4)), {R: [3, 4]})
    assert r.recovered_false == 0 and not r.problems


def test_an_event_received_twice_across_connections_is_a_duplicate() -> None:
    # The client resumed after 3, and the node replayed 3 again.
    h = _history(_join(0, 0), _got(0, 1, 2, 3), _join(1, 4, 3, replayed=1), _got(1, 3, 4))
    r = check_subscriber(h, {R: [1, 2, 3, 4]})
    assert r.duplicates == 1 and r.reorders == 1, r.problems
    assert any("more than once: [3]" in p for p in r.problems)


def test_out_of_order_within_a_connection_is_a_reorder() -> None:
    h = _history(_join(0, 0), _got(0, 1, 3, 2, 4))
    r = check_subscriber(h, {R: [1, 2, 3, 4]})
    assert (r.reorders, r.duplicates, r.gaps) == (1, 0, 0)


def test_rooms_and_connections_are_ordered_apart() -> None:
    other = "jp:r1"
    h = _history(_join(0, 0), _join(0, 0, room=other), _got(0, 5), _got(0, 2, room=other),
                 _got(0, 6), _got(0, 3, room=other))
    assert not check_subscriber(h, {R: [5, 6], other: [2, 3]}).problems


def test_an_event_before_its_joined_or_not_in_the_stream_fails() -> None:
    h = _history(_got(0, 1), _join(0, 1), _got(0, 9))
    r = check_subscriber(h, {R: [1]})
    assert (r.strays, r.phantoms) == (1, 1)


def test_two_epochs_fail_the_run() -> None:
    h1 = _history(_join(0, 0, epoch="e1"), name="a")
    h2 = _history(_join(0, 0, epoch="e2"), name="b")
    report = check([], [], [h1, h2])
    assert not report.ok and any("epoch" in p for p in report.problems)
    assert "FAIL" in report.format()


def test_time_to_recover_counts_events_acked_before_the_heal() -> None:
    pubs = _pubs(1, 2, 3)  # acked at t = 1, 2, 3
    h = _history(_join(0, 0), _got(0, 1, at=1.5), _got(0, 2, at=7.0), _got(0, 3, at=3.5))
    assert time_to_recover(pubs, [h], healed_at=2.0) == 5.0  # event 2 arrived at 7.0
    assert time_to_recover(pubs, [h], healed_at=10.0) == 0.0
    assert time_to_recover(pubs, [_history(_join(0, 0), _got(0, 1))], healed_at=2.0) is None
    assert time_to_recover(pubs, [h], healed_at=None) is None


def test_a_join_below_a_seq_already_acked_is_counted_stale() -> None:
    pubs = _pubs(1, 2, 3)  # acked at t = 1, 2, 3
    fresh = _history(_join(0, 2, sent_at=2.5), name="a")
    stale = _history(_join(0, 1, sent_at=2.5), name="b")
    assert check(pubs, _stored(1, 2, 3), [fresh]).stale_joins == 0
    assert check(pubs, _stored(1, 2, 3), [fresh, stale]).stale_joins == 1


def test_the_report_lists_every_kind_of_problem() -> None:
    pubs = _pubs(1, 2, 3)
    h = _history(_join(0, 0), _got(0, 1, 1), _join(1, 3, 1, recovered=False, epoch="e2"))
    report = check(pubs, _stored(1, 2), [h])
    text = report.format("t")
    for needle in ("acked but not stored", "more than once", "recovered:false", "epoch",
                   "gaps: 0", "duplicates: 1"):
        assert needle in text, text


def test_a_subscriber_that_never_joined_a_room_fails() -> None:
    r = check_subscriber(_history(_join(0, 0)), {R: [1], "jp:r1": [2]})
    assert any("never joined ['jp:r1']" in p for p in r.problems), r.problems
