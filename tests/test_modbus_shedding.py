"""The shed schedule as a pure state machine (explicit ``now``) and its atomic persistence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmgw.modbus.shedding import Memory, Shed, ShedBook, ShedConflict, ShedState, ShedStore, Step

START, RESTORE, EXPIRE = Step.START, Step.RESTORE, Step.EXPIRE
PENDING, ACTIVE, RESTORING = ShedState.PENDING, ShedState.ACTIVE, ShedState.RESTORING


def kinds(book, now):
    return [(a.step, a.shed.id) for a in book.due(now)]


def test_life_of_a_shed():
    book = ShedBook()
    book.add(Shed("s1", "lm1", ["relay_1"], start_at=100.0, deadline=160.0))
    assert kinds(book, 99.0) == [] and book.next_due() == 100.0
    assert kinds(book, 100.0) == [(START, "s1")]
    book.started("s1", {"relay_1": True}, now=100.5)
    assert book.sheds["s1"].state == ACTIVE and kinds(book, 159.9) == [] and book.next_due() == 160.0
    assert kinds(book, 160.0) == [(RESTORE, "s1")]
    book.begin_restore("s1", "deadline", now=160.0)
    book.restore_failed("s1", now=160.0, retry_in=30.0, error="LM did not answer")
    shed = book.sheds["s1"]
    assert shed.state == RESTORING and shed.failures == 1 and book.next_due() == 190.0
    assert kinds(book, 189.0) == [] and kinds(book, 190.0) == [(RESTORE, "s1")]
    book.begin_restore("s1", "command", now=190.0)  # a second request keeps the first reason
    book.finish("s1", ShedState.RESTORED, now=191.0)
    assert book.next_due() is None and kinds(book, 1e9) == [] and book.sheds == {}
    assert book.lookup("s1").summary() == {
        "shed_id": "s1", "lm": "lm1", "points": ["relay_1"], "state": "restored", "start_at": 100.0,
        "deadline": 160.0, "previous": {"relay_1": True}, "reason": "deadline", "ended_at": 191.0}


def test_pending_shed_whose_deadline_passed_expires_without_starting():
    book = ShedBook()
    book.add(Shed("s1", "lm1", ["relay_1"], start_at=100.0, deadline=110.0))
    assert kinds(book, 500.0) == [(EXPIRE, "s1")]


def test_clock_jumping_back_before_the_start_restores():
    book = ShedBook()
    book.add(Shed("s1", "lm1", ["relay_1"], start_at=100.0, deadline=200.0))
    book.started("s1", {"relay_1": True}, now=100.0)
    assert kinds(book, 150.0) == []
    assert kinds(book, 50.0) == [(RESTORE, "s1")]  # wall clock set back: fail safe


def test_a_point_belongs_to_one_shed_at_a_time():
    book = ShedBook()
    book.add(Shed("s1", "lm1", ["relay_1", "relay_2"], 0.0, 10.0))
    with pytest.raises(ShedConflict, match="'relay_2' is already part of shed 's1'"):
        book.add(Shed("s2", "lm1", ["relay_3", "relay_2"], 0.0, 10.0))
    book.add(Shed("s3", "lm2", ["relay_2"], 0.0, 10.0))  # same point name, other LM
    assert book.holder("lm1", "relay_2").id == "s1" and book.holder("lm1", "relay_3") is None


def test_next_due_skips_excluded_sheds():
    book = ShedBook()
    book.add(Shed("s1", "lm1", ["relay_1"], 5.0, 10.0))
    book.add(Shed("s2", "lm1", ["relay_2"], 7.0, 10.0))
    assert book.next_due() == 5.0 and book.next_due(exclude={"s1"}) == 7.0


def test_store_round_trip_and_atomic_file(tmp_path: Path):
    store = ShedStore(tmp_path / "sheds.json")
    assert store.load().sheds == {}
    book = ShedBook()
    book.add(Shed("s1", "lm1", ["relay_1"], 1.0, 2.0))
    book.started("s1", {"relay_1": True}, 1.0)
    book.add(Shed("s2", "lm1", ["power_limit"], 3.0, 4.0))
    store.save(book)
    assert (tmp_path / "sheds.json").stat().st_mode & 0o777 == 0o600
    assert not list(tmp_path.glob(".*tmp"))
    loaded = store.load()
    assert loaded.sheds == book.sheds and loaded.sheds["s2"].state == PENDING


@pytest.mark.parametrize("content", ["{not json", json.dumps({"version": 9, "sheds": []}),
                                     json.dumps({"version": 1, "sheds": [{"id": "x"}]})])
def test_unreadable_state_is_kept_aside_and_the_gateway_starts_empty(tmp_path: Path, content, caplog):
    path = tmp_path / "sheds.json"
    path.write_text(content)
    assert ShedStore(path).load().sheds == {}
    assert (tmp_path / "sheds.json.corrupt").read_text() == content
    assert "check the loads it names by hand" in caplog.text


def test_each_state_change_is_checked_and_logged_once(caplog):
    caplog.set_level("INFO", logger="lmgw.modbus.shedding")
    book = ShedBook()
    book.add(Shed("s1", "lm1", ["relay_1"], 0.0, 10.0))
    book.started("s1", {"relay_1": True}, now=0.0)
    book.begin_restore("s1", "command", now=1.0)
    book.finish("s1", ShedState.RESTORED, now=2.0)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and lines[1] == "shed s1 on LM lm1: active -> restoring (command)"
    assert lines[2] == "shed s1 on LM lm1: restoring -> restored (command)"
    book.add(Shed("s2", "lm1", ["relay_1"], 5.0, 10.0))
    with pytest.raises(ValueError, match="no transition from pending to restored"):
        book.finish("s2", ShedState.RESTORED, now=3.0)
    book.add(Shed("s3", "lm1", ["relay_2"], 5.0, 10.0))
    book.finish("s3", ShedState.EXPIRED, now=20.0, reason="deadline")
    assert caplog.records[-1].levelname == "WARNING" and book.lookup("s3").state == ShedState.EXPIRED


def test_finished_sheds_are_remembered_within_bounds_of_age_and_count():
    book = ShedBook(memory=Memory(seconds=100.0, entries=3))
    for n in range(5):
        book.add(Shed(f"s{n}", "lm1", ["relay_1"], 10.0 * n, 10.0 * n + 5))
        book.finish(f"s{n}", ShedState.CANCELLED, now=10.0 * n, reason="command")
    assert list(book.finished) == ["s2", "s3", "s4"]  # at most 3: the oldest forgotten first
    book.forget_old(now=125.0)  # s2 ended at 20: older than 100 s
    assert list(book.finished) == ["s3", "s4"] and book.lookup("s3").state == ShedState.CANCELLED
    assert book.lookup("s2") is None


def test_finished_sheds_survive_a_restart_and_version_1_files_load(tmp_path: Path):
    store = ShedStore(tmp_path / "sheds.json")
    book = ShedBook()
    book.add(Shed("done", "lm1", ["relay_1"], 1.0, 2.0))
    book.started("done", {"relay_1": True}, 1.0)
    book.begin_restore("done", "deadline", 2.0)
    book.finish("done", ShedState.RESTORED, 2.5)
    store.save(book)
    assert store.load().lookup("done") == book.lookup("done")
    old = {"version": 1, "sheds": [{"id": "s1", "lm": "lm1", "points": ["relay_1"], "start_at": 1.0,
                                    "deadline": 2.0, "state": "restoring", "previous": {"relay_1": True},
                                    "started_at": 1.0, "retry_at": 5.0, "restore_reason": "command",
                                    "failures": 1}]}
    (tmp_path / "sheds.json").write_text(json.dumps(old))
    shed = store.load().sheds["s1"]
    assert shed.state == RESTORING and shed.reason == "command" and shed.retry_at == 5.0
