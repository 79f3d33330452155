"""Session placement: least loaded at the first call, sticky after, no moves when replicas are added, a
gone replica's sessions re-placed, close and idleness release."""

import time

from livetalk_ray.serving.routing import SessionPins


def test_sessions_spread_evenly_and_stick():
    pins = SessionPins()
    placed = {f"s{i}": pins.route(f"s{i}", ["a", "b"]) for i in range(6)}
    assert sorted(pins.load().values()) == [3, 3]  # a hash ring puts 4+ on one replica for 1 in 3 such draws
    for _ in range(3):
        assert all(pins.route(sid, ["a", "b"]) == replica for sid, replica in placed.items())


def test_a_new_replica_takes_new_sessions_and_moves_none():
    pins = SessionPins()
    placed = {f"s{i}": pins.route(f"s{i}", ["a", "b"]) for i in range(4)}
    assert all(pins.route(sid, ["a", "b", "c"]) == replica for sid, replica in placed.items())
    assert pins.route("new1", ["a", "b", "c"]) == "c" and pins.route("new2", ["a", "b", "c"]) == "c"


def test_sessions_of_a_gone_replica_are_replaced_on_the_least_loaded():
    pins = SessionPins()
    for i in range(4):
        pins.route(f"s{i}", ["a", "b"])
    on_b = [sid for sid in (f"s{i}" for i in range(4)) if pins.route(sid, ["a", "b"]) == "b"]
    assert [pins.route(sid, ["a", "c"]) for sid in on_b] == ["c", "c"]  # "a" already holds two


def test_close_and_idleness_release_a_pin():
    pins = SessionPins(idle_s=0.05)
    assert pins.route("s1", ["a", "b"]) == pins.route("s1", ["a", "b"], release=True)
    assert pins.load() == {}
    pins.route("s2", ["a", "b"])
    time.sleep(0.1)
    pins.route("s3", ["a", "b"])
    assert sum(pins.load().values()) == 1  # s2 idled out
    assert pins.route("s4", []) is None
