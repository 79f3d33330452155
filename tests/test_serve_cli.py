"""`livetalk serve` as a user runs it: a real process that starts local Ray and the app, answers /healthz and
the page, and exits cleanly (code 0, no Ray left behind) on SIGTERM."""

import os
import signal
import socket
import subprocess
import sys
import time

import httpx


def test_livetalk_serve_starts_answers_and_stops_on_sigterm(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    command = [sys.executable, "-m", "livetalk_ray.cli", "serve", "--port", str(port), "--set", "model.num_layers=2"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline, ready = time.monotonic() + 300, False
        while time.monotonic() < deadline and proc.poll() is None and not ready:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                pass
            time.sleep(0 if ready else 1)  # 503 while the models load
        assert ready, proc.communicate(timeout=30)[0] if proc.poll() is not None else "no /healthz in 300 s"
        assert "<canvas" in httpx.get(f"http://127.0.0.1:{port}/").text
        time.sleep(2)  # let the command print its ready line
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, output
        assert f"http://127.0.0.1:{port}" in output and "shutting down" in output
        deadline = time.monotonic() + 30  # the port is free again once Ray has reaped Serve's proxy process
        while True:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
    finally:
        if proc.poll() is None:
            proc.kill()
