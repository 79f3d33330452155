"""`livetalk job`: real stages submitted as Ray jobs to a real local `ray start --head`, and every failure path.

One head for the module (started on first use, about 10 s); each job runs a real `jobs/<stage>.py` on 2 CPUs.
RAY_AUTH_MODE is `disabled` in this process, in the head's environment and (through `job submit`) in every job,
because Ray >= 2.59 turns token auth on for `ray start --head` whenever ~/.ray/auth_token exists.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.server
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from typer.testing import CliRunner

from livetalk_ray.cli import app
from livetalk_ray.cli.job import _report_end
from livetalk_ray.cli.job_client import build_entrypoint, job_stages, project_root, resolve_stage, staged_working_dir

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
JOB_ID = re.compile(r"raysubmit_\w+")
# Ray's own log-streaming client passes aiohttp a deprecated argument; nothing this project can change.
pytestmark = pytest.mark.filterwarnings("ignore:ssl=None is deprecated:DeprecationWarning")


def run(*args: str):
    return CliRunner().invoke(app, ["job", *map(str, args)])


def job_id_in(output: str) -> str:
    match = JOB_ID.search(output)
    assert match, output
    return match.group(0)


def assert_one_error_line(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for fragment in fragments:
        assert fragment in lines[0], result.output


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:  # all bound at once, so no port is handed out twice
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="module", autouse=True)
def _auth_disabled():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_AUTH_MODE", "disabled")
        patch.delenv("RAY_ADDRESS", raising=False)  # tests name their address; none may leak in
        patch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
        yield


def _die_with_parent() -> None:
    # The head shuts down (SIGTERM: Ray drains and stops its processes) even if pytest itself is killed.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@pytest.fixture(scope="module")
def head():
    """A real head with the dashboard (the job server) on free ports; yields its address."""
    gcs, dashboard, client, agent_http, agent_grpc, metrics, env_agent = free_ports(7)
    temp_dir = Path(tempfile.mkdtemp(prefix="ltjob-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(name, None)
    # Every port is our own: another Ray on this machine (a developer's `livetalk serve`) keeps its defaults.
    command = [
        VENV_BIN / "ray", "start", "--head", "--block", "--num-cpus=2", "--include-dashboard=true",
        "--dashboard-host=127.0.0.1", f"--port={gcs}", f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={env_agent}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]  # fmt: skip
    log_path = temp_dir / "head.log"
    with open(log_path, "w") as log:
        head_process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
        )
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while run("list", "--address", url).exit_code != 0:
            if head_process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Ray head did not come up:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        # Only the process this fixture started: `ray start --block` stops its own cluster on SIGTERM.
        head_process.terminate()
        try:
            head_process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head_process.kill()
            head_process.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clips")
    result = CliRunner().invoke(app, ["demo-data", "--out", str(out), "--clips", "2"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def outside_config(tmp_path_factory) -> Path:
    """A config outside the project. Two clips fit the vae stage only with its psnr_clips=1 (the default is 4)."""
    path = tmp_path_factory.mktemp("elsewhere") / "outside.yaml"
    path.write_text("train:\n  vae:\n    psnr_clips: 1\n")
    assert ROOT not in path.parents
    return path


@pytest.fixture(scope="module")
def failed_job(head):
    result = run("submit", "vae", "--address", head, "--wait")  # no --data: the stage's own usage error
    return result, job_id_in(result.output)


@pytest.fixture(scope="module")
def succeeded_job(head, clips, outside_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("vae-run")
    result = run(
        "submit", "vae", "--address", head, "--config", outside_config, "--set", "runtime.seed=4242", "--wait",
        "--entrypoint-cpus", "1",
        "--", "--data", clips, "--out", out, "--max-steps", "0",
    )  # fmt: skip
    return result, job_id_in(result.output), out


# ------------------------------------------------------------------------ no cluster needed: fast failures


def test_stages_are_the_jobs_directory():
    stages = job_stages(project_root())
    assert stages == sorted(p.stem for p in (ROOT / "jobs").glob("*.py"))
    assert {"data_prepare", "vae", "teacher", "ode_generate", "ode", "dmd"} <= set(stages)
    assert resolve_stage("data-prepare", ROOT) == "data_prepare" == resolve_stage("data_prepare", ROOT)


def test_unknown_stage_lists_the_stages_without_contacting_anyone():
    started = time.monotonic()
    result = run("submit", "nope", "--address", "http://127.0.0.1:1")
    assert_one_error_line(result, "unknown stage 'nope'", *job_stages(ROOT))
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("command", [["list"], ["status", "raysubmit_x"], ["submit", "vae"], ["logs", "x", "-f"]])
def test_unreachable_address_fails_fast_naming_it(command):
    (port,) = free_ports(1)  # nothing listens there
    started = time.monotonic()
    result = run(*command, "--address", f"http://127.0.0.1:{port}")
    assert_one_error_line(result, f"cannot reach the Ray job server at http://127.0.0.1:{port}")
    assert time.monotonic() - started < 5


@contextlib.contextmanager
def http_server(status: int, body: bytes):
    """Something at an address that is not a Ray job server (or, with a JSON body, one that wants a token)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("status", "body", "client_mode", "fragment"),
    [
        (404, b"not found", "disabled", "does not answer like a Ray job server"),
        (200, b"<html>a web page</html>", "disabled", "does not answer like a Ray job server"),
        (401, b"Unauthorized", "disabled", "uses token auth: export RAY_AUTH_MODE=token"),
        (200, b'{"authentication_mode": "token"}', "disabled", "uses token auth: export RAY_AUTH_MODE=token"),
        (403, b"Forbidden", "token", "refused this client's auth token"),
    ],
)
def test_address_that_is_not_a_job_server_or_wants_a_token(status, body, client_mode, fragment, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", client_mode)  # the probe fails before Ray is imported
    with http_server(status, body) as url:
        assert_one_error_line(run("list", "--address", url), url, fragment)


def test_ray_client_and_malformed_addresses_are_refused():
    assert_one_error_line(run("list", "--address", "ray://head:10001"), "Ray Client address")
    assert_one_error_line(run("list", "--address", "http://head:port"), "is not a URL like")


def test_bad_config_is_refused_before_the_cluster_is_contacted(tmp_path):
    closed = f"http://127.0.0.1:{free_ports(1)[0]}"
    assert_one_error_line(run("submit", "vae", "--set", "nodot", "--address", closed), "override 'nodot'")
    missing = tmp_path / "missing.yaml"
    assert_one_error_line(run("submit", "vae", "--config", missing, "--address", closed), "config file not found")
    result = run("submit", "vae", "--address", closed, "--", "--config", "x.yaml")
    assert_one_error_line(result, "put --config before `--`")
    assert_one_error_line(run("submit", "vae", "--env", "NOEQUALS", "--address", closed), "KEY=VALUE")


def test_staged_working_dir_and_entrypoint(outside_config):
    with staged_working_dir(ROOT, outside_config) as (staged, config):
        names = {p.name for p in staged.iterdir()}
        assert {"jobs", "livetalk_ray", "pyproject.toml", "_livetalk_job"} <= names
        assert not names & {".venv", ".git", "out", "runs"}
        assert (staged / config).read_text() == outside_config.read_text()
        assert config == "_livetalk_job/outside.yaml"
    assert not staged.exists()
    command = build_entrypoint("vae", "_livetalk_job/a b.yaml", "toy", ["x.y=1 2"], ["--out", "/o"])
    assert command == "python jobs/vae.py --preset toy --config '_livetalk_job/a b.yaml' --set 'x.y=1 2' --out /o"


def test_a_failure_before_the_entrypoint_ran_is_explained_by_the_message(capsys):
    info = SimpleNamespace(
        submission_id="raysubmit_a", job_id=None, status="FAILED", error_type="RUNTIME_ENV_SETUP_FAILURE",
        message="Job set up failed with error: Failed to set up runtime environment.\nno distribution for nosuchpkg",
        start_time=None, end_time=None, metadata={}, entrypoint="python jobs/vae.py",
    )  # fmt: skip

    class NoLog:
        def logs(self, job_id):
            raise AssertionError("a job that never ran has no log worth showing")

    assert _report_end(NoLog(), info) == 1
    err = capsys.readouterr().err
    assert "no distribution for nosuchpkg" in err and "FAILED (RUNTIME_ENV_SETUP_FAILURE)" in err


# ----------------------------------------------------------------------------- against the real head


def test_failed_job_exits_1_with_its_reason(failed_job):
    result, _ = failed_job
    assert result.exit_code == 1, result.output
    assert "Missing option '--data'" in result.output  # the stage's own error, from the job's log tail
    assert "FAILED (JOB_ENTRYPOINT_COMMAND_ERROR): Job entrypoint command failed with exit code 2" in result.output


def test_status_of_a_failed_job_exits_1(head, failed_job):
    _, job_id = failed_job
    result = run("status", job_id, "--address", head)
    assert result.exit_code == 1, result.output
    assert f"job {job_id} (vae): FAILED" in result.output
    assert "exit code 2" in result.output


def test_succeeded_job_saw_the_outside_config_and_the_override(succeeded_job):
    result, _, out = succeeded_job
    assert result.exit_code == 0, result.output
    assert "SUCCEEDED" in result.output and "held-out PSNR" in result.output  # the streamed log
    assert "--config _livetalk_job/outside.yaml --set runtime.seed=4242" in result.output  # Ray echoes the entrypoint
    saved = yaml.safe_load((out / "checkpoints" / "step_000000" / "config.yaml").read_text())
    assert saved["train"]["vae"]["psnr_clips"] == 1  # from the file that lives outside the project
    assert saved["runtime"]["seed"] == 4242


def test_status_and_logs_of_a_succeeded_job(head, succeeded_job):
    _, job_id, _ = succeeded_job
    status = run("status", job_id, "--address", head)
    assert status.exit_code == 0 and f"job {job_id} (vae): SUCCEEDED" in status.output, status.output
    logs = run("logs", job_id, "--address", head)
    assert logs.exit_code == 0 and "held-out PSNR" in logs.output, logs.output
    last = run("logs", job_id, "--address", head, "--tail", "1")
    assert last.exit_code == 0 and len(last.output.splitlines()) == 1, last.output


def test_list_shows_the_submitted_jobs(head, failed_job, succeeded_job):
    result = run("list", "--address", head)
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.output.splitlines() if JOB_ID.match(line.strip())}
    assert rows[failed_job[1]][1:3] == ["vae", "FAILED"], result.output
    assert rows[succeeded_job[1]][1:3] == ["vae", "SUCCEEDED"], result.output


def test_stop_ends_a_running_job_as_stopped(head, clips, outside_config, tmp_path):
    submitted = run(
        "submit", "vae", "--address", head, "--config", outside_config,
        "--", "--data", clips, "--out", tmp_path / "long", "--max-steps", "100000",
    )  # fmt: skip
    assert submitted.exit_code == 0 and "livetalk job stop" in submitted.output, submitted.output
    job_id = job_id_in(submitted.output)
    deadline = time.monotonic() + 60
    while "RUNNING" not in (status := run("status", job_id, "--address", head)).output:
        assert status.exit_code == 0 and time.monotonic() < deadline, status.output
        time.sleep(0.5)
    stopped = run("stop", job_id, "--address", head)
    assert stopped.exit_code == 0 and f"job {job_id} STOPPED" in stopped.output, stopped.output
    status = run("status", job_id, "--address", head)
    assert status.exit_code == 1 and "STOPPED" in status.output, status.output
    again = run("stop", job_id, "--address", head)
    assert again.exit_code == 0 and "already ended: STOPPED" in again.output, again.output


@pytest.mark.parametrize("command", ["status", "logs", "stop"])
def test_unknown_job_id(head, command):
    assert_one_error_line(run(command, "raysubmit_nosuchjob", "--address", head), "no job raysubmit_nosuchjob")
