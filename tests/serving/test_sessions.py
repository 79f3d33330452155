"""A replica's session table: use refreshes a session, idle ones are reaped, and a missing one is `SessionLost`
with the holder named (the relay re-primes on it). The module imports no torch (the Ingress uses it)."""

import subprocess
import sys
import time

import pytest

from livetalk_ray.serving.sessions import SessionLost, SessionTable


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


def test_the_ingress_side_of_serving_imports_no_torch():
    code = "import sys, livetalk_ray.serving.ingress; print('torch' in sys.modules or 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
