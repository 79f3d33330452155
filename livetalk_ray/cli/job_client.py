"""Ray job client for `livetalk job`: which stages exist, the entrypoint and working dir a submission ships, the
job server's address (checked before Ray's own client, which has no timeout) and `Cluster`, the calls on it.
The commands and what they print are in cli/job.py."""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import os
import shlex
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from livetalk_ray.cli.common import err_console
from livetalk_ray.config import ConfigError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
JOB_INPUTS_DIR = "_livetalk_job"  # where --config lands inside the uploaded working dir
# Top-level entries of the project that never travel: environments, VCS, run outputs, caches.
TOP_LEVEL_EXCLUDES = (".venv", ".git", "out", "runs", "*.egg-info", ".pytest_cache", ".ruff_cache", ".mypy_cache")
# Patterns Ray applies while packing (gitwildmatch, like .gitignore; the project's .gitignore/.rayignore also apply).
PACKING_EXCLUDES = ["__pycache__/", "*.pyc", "*.mp4", "bench/results/", ".pytest_cache/", ".ruff_cache/"]
PROBE_TIMEOUT_S = 5.0  # the address check; Ray's own client has no timeout and would hang on a black hole
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def project_root() -> Path:
    """The directory holding jobs/: this package's checkout, else the current directory or one above it."""
    import livetalk_ray

    cwd = Path.cwd().resolve()
    for candidate in (Path(livetalk_ray.__file__).resolve().parents[1], cwd, *cwd.parents):
        if (candidate / "jobs").is_dir() and (candidate / "livetalk_ray").is_dir():
            return candidate
    raise ConfigError("no project directory (with jobs/ and livetalk_ray/) found; run from a livetalk-ray checkout")


def job_stages(root: Path) -> list[str]:
    """Every stage with an entrypoint, i.e. every jobs/<stage>.py."""
    return sorted(p.stem for p in (root / "jobs").glob("*.py") if not p.stem.startswith("_"))


def resolve_stage(name: str, root: Path) -> str:
    stages = job_stages(root)
    stage = name.replace("-", "_")  # data-prepare and data_prepare both name jobs/data_prepare.py
    if stage not in stages:
        raise ConfigError(f"unknown stage {name!r}; choose one of: {', '.join(stages)}")
    return stage


def build_entrypoint(
    stage: str, config: str | None, preset: str | None, overrides: list[str] | None, stage_args: list[str]
) -> str:
    """The shell command the job runs in its working dir."""
    args = ["python", f"jobs/{stage}.py"]
    if preset:
        args += ["--preset", preset]
    if config:
        args += ["--config", config]
    for item in overrides or []:
        args += ["--set", item]
    return shlex.join(args + stage_args)


def check_stage_args(stage_args: list[str]) -> None:
    for arg in stage_args:
        option = arg.split("=", 1)[0]
        if option in ("--config", "--preset", "--set"):
            raise ConfigError(f"put {option} before `--`: `job submit` ships the config and checks it first")
        if option == "--address":
            raise ConfigError("drop --address after `--`: a job joins the cluster it runs on")
    for option, value in zip(stage_args, stage_args[1:], strict=False):
        if option == "--out" and not value.startswith("/") and "://" not in value:
            err_console.print(
                f"[yellow]note:[/] --out {value} is relative: on the cluster it lands in the job's temporary "
                "working dir; give a path on shared storage",
                highlight=False,
            )


def parse_env(items: list[str] | None) -> dict[str, str]:
    env = {"PYTHONUNBUFFERED": "1"}  # a job's stdout is a file: unbuffered, so followed logs arrive as printed
    if mode := os.environ.get("RAY_AUTH_MODE"):
        # The stage's own ray.init must use the auth mode this client reaches the cluster with (common.py
        # defaults it to disabled). The token itself is never copied into a job's (visible) environment.
        env["RAY_AUTH_MODE"] = mode
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--env {item!r} must look like KEY=VALUE")
        env[key.strip()] = value
    return env


@contextlib.contextmanager
def staged_working_dir(root: Path, config: Path | None) -> Iterator[tuple[Path, str | None]]:
    """A temporary view of the project to upload, and the config's path inside it.

    Each top-level entry is a symlink (nothing is copied; Ray packs through the links and still applies the
    project's .gitignore/.rayignore), and the config file is a real copy under _livetalk_job/, so a config from
    anywhere travels with the job.
    """
    with tempfile.TemporaryDirectory(prefix="livetalk-job-") as tmp:
        staged = Path(tmp) / root.name
        staged.mkdir()
        for entry in sorted(root.iterdir()):
            if entry.name == JOB_INPUTS_DIR or any(fnmatch.fnmatch(entry.name, p) for p in TOP_LEVEL_EXCLUDES):
                continue
            (staged / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
        relative = None
        if config is not None:
            (staged / JOB_INPUTS_DIR).mkdir()
            shutil.copyfile(config, staged / JOB_INPUTS_DIR / config.name)
            relative = f"{JOB_INPUTS_DIR}/{config.name}"
        yield staged, relative


def job_server_url(address: str | None) -> str:
    raw = (
        address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    ).strip()
    if raw.startswith("ray://"):
        raise ConfigError(
            f"{raw} is a Ray Client address; job commands use the head's dashboard, e.g. {DEFAULT_ADDRESS}"
        )
    url = raw if "://" in raw else f"http://{raw}"
    parts = urlsplit(url)
    try:
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port or 0) >= 0
    except ValueError:  # a port that is not a number
        valid = False
    if not valid:
        raise ConfigError(f"address {raw!r} is not a URL like {DEFAULT_ADDRESS}")
    return url.rstrip("/")


def _auth_hint(url: str) -> str:
    where = "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (`ray get-auth-token` on the head prints it)"
    if os.environ.get("RAY_AUTH_MODE") == "token":
        return f"the Ray cluster at {url} refused this client's auth token: give it the cluster's token as {where}"
    return f"the Ray cluster at {url} uses token auth: export RAY_AUTH_MODE=token and the cluster's token as {where}"


def _get_json(url: str, timeout_s: float) -> Any:
    """GET url as JSON; None if the body is not JSON. HTTP errors and connection errors propagate."""
    with urllib.request.urlopen(url, timeout=timeout_s) as reply:
        body = reply.read()
    try:
        return json.loads(body)
    except ValueError:
        return None


def probe_job_server(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Fail fast, naming the address, if nothing there answers like a Ray job server or auth modes disagree.
    Asks /api/authentication_mode (public on a Ray >= 2.59 dashboard), else /api/version (older, no auth)."""
    not_ray = f"{url} does not answer like a Ray job server; pass the head's dashboard address (port 8265 by default)"
    try:
        try:
            answer = _get_json(f"{url}/api/authentication_mode", timeout_s)
            key = "authentication_mode"
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise
            answer, key = _get_json(f"{url}/api/version", timeout_s), "ray_version"
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise ConfigError(_auth_hint(url)) from None
        raise ConfigError(f"{not_ray} (HTTP {exc.code})") from None
    except (OSError, ValueError) as exc:  # refused, timed out, unknown host, TLS
        reason = getattr(exc, "reason", None) or exc
        raise ConfigError(
            f"cannot reach the Ray job server at {url}: {reason} (is the cluster up? pass its head's dashboard "
            f"address, e.g. --address {DEFAULT_ADDRESS}, or set RAY_ADDRESS)"
        ) from None
    if not isinstance(answer, dict) or key not in answer:
        raise ConfigError(not_ray)
    if answer.get("authentication_mode") == "token" and os.environ.get("RAY_AUTH_MODE") != "token":
        raise ConfigError(_auth_hint(url))


class Cluster:
    """Ray's JobSubmissionClient for one address, with every failure turned into one clear ConfigError."""

    def __init__(self, address: str | None) -> None:
        self.url = job_server_url(address)
        probe_job_server(self.url)  # before importing Ray, which alone takes seconds
        from ray.job_submission import JobSubmissionClient

        _quiet_ray_loggers()
        hidden = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
        try:  # Ray lets these variables override an explicit address; --address must win
            self.client = self._call(JobSubmissionClient, self.url)
        finally:
            os.environ.update(hidden)

    def _call(self, fn, *args, job_id: str | None = None, **kwargs):
        from ray.exceptions import AuthenticationError

        try:
            return fn(*args, **kwargs)
        except AuthenticationError:
            raise ConfigError(_auth_hint(self.url)) from None
        except RuntimeError as exc:
            if job_id is not None and "does not exist" in str(exc):
                raise ConfigError(f"no job {job_id} on {self.url} (`livetalk job list` shows the jobs)") from None
            raise ConfigError(f"the job server at {self.url} refused: {_last_line(exc)}") from None
        except (OSError, ValueError) as exc:  # connection lost, upload or runtime_env rejected
            raise ConfigError(f"job request to {self.url} failed: {exc}") from None

    def info(self, job_id: str):
        return self._call(self.client.get_job_info, job_id, job_id=job_id)

    def logs(self, job_id: str) -> str:
        return self._call(self.client.get_job_logs, job_id, job_id=job_id)

    def stop(self, job_id: str) -> bool:
        return self._call(self.client.stop_job, job_id, job_id=job_id)

    def jobs(self) -> list:
        return [j for j in self._call(self.client.list_jobs) if _value(j.type) == "SUBMISSION"]

    def submit(self, **kwargs) -> str:
        return self._call(self.client.submit_job, **kwargs)

    def stream_logs(self, job_id: str) -> None:
        """Print the job's log as it grows, until the job ends (Ray closes the stream then)."""

        async def pump() -> None:
            async for chunk in self.client.tail_job_logs(job_id):
                sys.stdout.write(chunk)
                sys.stdout.flush()

        import aiohttp

        try:
            asyncio.run(pump())
        except (TimeoutError, RuntimeError, OSError, aiohttp.ClientError) as exc:
            raise ConfigError(f"the log stream of {job_id} from {self.url} broke: {exc}") from None


def _last_line(exc: Exception) -> str:
    """The cause in a server error, whose body is often a whole traceback ending in `ValueError: ...`."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip().strip(".")]
    return lines[-1] if lines else str(exc)


def _quiet_ray_loggers() -> None:
    import logging

    # Ray's client logs every upload step at INFO; the spinner and the summary line say what matters.
    for name in ("dashboard.modules.dashboard_sdk", "dashboard.modules.job.sdk", "_private.runtime_env.packaging"):
        logging.getLogger(f"ray.{name}").setLevel(logging.WARNING)


def _value(field: Any) -> str:
    return str(getattr(field, "value", field))
