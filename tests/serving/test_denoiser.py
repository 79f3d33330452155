"""A replica's session table: use refreshes a session, idle ones are reaped, and a missing one is `SessionLost`
with the holder named (the relay re-primes on it)."""

import time

import pytest

from livetalk_ray.serving.denoiser import SessionLost, SessionTable


def test_idle_sessions_are_reaped_and_then_lost():
    table = SessionTable("denoiser")
    table.put("a", "state a")
    table.put("b", "state b")
    time.sleep(0.05)
    assert table.get("a") == "state a"  # refreshed just now
    assert table.reap(idle_s=0.03) == ["b"] and len(table) == 1
    with pytest.raises(SessionLost, match="session b is not held by this denoiser replica"):
        table.get("b")
    assert table.close("a") and not table.close("a") and len(table) == 0
