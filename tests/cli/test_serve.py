"""`livetalk serve` as a user runs it: a real process that starts local Ray and the app, answers /healthz and
the page, and exits cleanly (code 0, no Ray left behind) on SIGTERM; a start that cannot work ends with one line."""

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time

import grpc
import httpx
import psutil
import pytest
from ray.core.generated.gcs_service_pb2 import GetAllNodeInfoRequest
from ray.core.generated.gcs_service_pb2_grpc import NodeInfoGcsServiceStub

from livetalk_ray.assets import TOY_DIR

STAGES = {"Denoiser", "VAEDecoder", "LLM", "Speech", "ASR", "Placement"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    command = [sys.executable, "-m", "livetalk_ray.cli", "serve", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


def _port_free(port: int) -> bool:
    """Nothing listens on the port (as a new server binds: SO_REUSEADDR, so closed connections don't count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _one_error_line(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    assert proc.returncode == code, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    return lines[0]


def test_port_in_use_is_one_line_with_the_fix():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = _one_error_line(_serve("--port", str(port), timeout=60))
    assert f"port {port} on 127.0.0.1 is in use" in line and f"--port {port + 1}" in line


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("serve.speech.voice=zz-missing", "no voice 'zz-missing'"),
        ("serve.llm.path=/nonexistent/model.gguf", "--set serve.llm.path=PATH"),
        ("vae.path=/nonexistent/vae", "vae.path /nonexistent/vae does not exist"),
    ],
)
def test_settings_that_cannot_work_fail_before_ray_starts(override, fragment):
    started = time.monotonic()
    line = _one_error_line(_serve("--port", str(_free_port()), "--set", override, timeout=60))
    assert fragment in line
    assert time.monotonic() - started < 30  # no Ray, no model: the check runs before either


def test_a_stage_that_cannot_start_ends_with_one_line_naming_it(tmp_path):
    """Only a replica can find this (a checkpoint file that is not one): the first failed start ends the command,
    not Serve's retries, and Ray goes down with it."""
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.yaml").write_text((TOY_DIR / "config.yaml").read_text())
    (checkpoint / "model.safetensors").write_bytes(b"not a checkpoint")
    port = _free_port()
    started = time.monotonic()
    line = _one_error_line(_serve("--port", str(port), "--checkpoint", str(checkpoint)))
    assert line.startswith("error: the Denoiser stage could not start: ")
    assert "not a safetensors or torch checkpoint" in line
    assert time.monotonic() - started < 150
    assert _port_free(port)  # Serve's proxy went down with Ray


def _listening(pid: int) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every TCP socket listening in `pid` and its descendants (Ray's GCS,
    raylet, agents and workers are all started under the driver)."""
    root = psutil.Process(pid)
    procs = {p.pid: p for p in [root, *root.children(recursive=True)]}
    out = []
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in procs:
            try:
                name = procs[conn.pid].name()
            except psutil.NoSuchProcess:
                continue
            out.append((conn.laddr.ip, conn.laddr.port, name))
    return out


def _is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address.removeprefix("::ffff:")).is_loopback


def test_livetalk_serve_exposes_only_its_http_port_answers_and_stops_on_sigterm(tmp_path):
    """`--host 0.0.0.0`: the HTTP port on every interface with a generated token, every Ray port on loopback only,
    Ray's own token auth on (nothing in the environment turns it off); SIGTERM ends it in under 15 s."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}  # Ray's default: token auth
    env["XDG_RUNTIME_DIR"] = str(tmp_path / "run")
    command = [sys.executable, "-m", "livetalk_ray.cli", "serve", "--host", "0.0.0.0", "--port", str(port)]
    command += ["--set", "model.num_layers=2"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline, ready, waiting = time.monotonic() + 300, False, []
        while time.monotonic() < deadline and proc.poll() is None and not ready:
            try:
                reply = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
                ready = reply.status_code == 200
                if reply.status_code == 503 and reply.headers.get("content-type") == "application/json":
                    waiting.append(reply.json()["waiting_for"])
            except httpx.HTTPError:
                pass
            time.sleep(0 if ready else 1)  # 503 while the models load
        assert ready, proc.communicate(timeout=30)[0] if proc.poll() is not None else "no /healthz in 300 s"
        assert "<canvas" in httpx.get(f"http://127.0.0.1:{port}/").text
        # While starting, /healthz named the stages not ready yet (the chat model alone loads for seconds).
        assert waiting and all(stages and set(stages) <= STAGES for stages in waiting), waiting

        token = (tmp_path / "run" / "serve-token").read_text().strip()
        assert httpx.get(f"http://127.0.0.1:{port}/v1/portraits").status_code == 401
        auth = {"Authorization": f"Bearer {token}"}
        assert httpx.get(f"http://127.0.0.1:{port}/v1/portraits", headers=auth).status_code == 200

        listening = _listening(proc.pid)
        exposed = [(ip, p, name) for ip, p, name in listening if not _is_loopback(ip)]
        assert len(listening) > 5 and [p for _, p, _ in exposed] == [port], exposed  # Ray: loopback only
        # Ray's token auth is on: the GCS refuses a call without the token, or with a wrong one.
        gcs = [p for ip, p, name in listening if name == "gcs_server"]
        assert gcs, listening
        for metadata in ([], [("authorization", "Bearer not-the-token")]):
            with grpc.insecure_channel(f"127.0.0.1:{gcs[0]}") as channel:
                with pytest.raises(grpc.RpcError) as refused:
                    NodeInfoGcsServiceStub(channel).GetAllNodeInfo(
                        GetAllNodeInfoRequest(), metadata=metadata, timeout=10
                    )
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

        time.sleep(2)  # let the command print its ready line
        stopping = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
        stopped_in = time.monotonic() - stopping
        assert proc.returncode == 0, output
        assert stopped_in < 15, (stopped_in, output)
        assert "shutting down" in output and token not in output and f"{token[:4]}…" in output
        deadline = time.monotonic() + 30  # the port is free again once Ray has reaped Serve's proxy process
        while not _port_free(port):
            assert time.monotonic() < deadline, f"port {port} still in use 30 s after exit"
            time.sleep(1)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_generated_token_goes_to_a_file_only_its_owner_reads(tmp_path, monkeypatch):
    from livetalk_ray.cli.serve import _write_token

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    path = _write_token("first-token")
    path.chmod(0o644)
    path = _write_token("second-token")  # rewritten, and private again
    assert path == tmp_path / "run" / "serve-token" and path.read_text() == "second-token\n"
    assert path.stat().st_mode & 0o777 == 0o600
