"""Shared pieces of the `livetalk` commands: options, config resolution, error handling, Ray sessions.

User errors (bad preset, unreadable image or audio, wrong checkpoint, too few clips, ...) end with one red line
and exit code 2, also when a Ray task, actor, Train worker or Data actor raised them (cli/errors.py); anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console

from livetalk_ray.cli.errors import quiet_ray_console, report_user_error
from livetalk_ray.config import DEFAULT_PRESET, PRESETS, ConfigError, LiveTalkConfig, load_config

console = Console()
err_console = Console(stderr=True, soft_wrap=True)

PresetOpt = Annotated[str | None, typer.Option("--preset", help=f"{' | '.join(PRESETS)} (default {DEFAULT_PRESET})")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML config file")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override, e.g. --set cache.sink_size=6")]
AddressOpt = Annotated[str | None, typer.Option("--address", help="Ray cluster address; default: local Ray")]


def friendly_errors(fn):
    """Turn the known user errors, raised here or in Ray, into one clear line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.ClickException):
            raise
        except Exception as exc:
            if not report_user_error(exc, err_console):
                raise
            raise typer.Exit(2) from None

    return wrapper


def resolve_config(preset: str | None, config: Path | None, overrides: list[str] | None) -> LiveTalkConfig:
    return load_config(preset, config, overrides)


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot reach the Ray cluster at {address} ({exc}): start it (`ray start --head` on the head node), "
            "pass the head's GCS address (HOST:6379) with --address, or leave --address out for a local Ray"
        ) from None


def loopback_only_ray() -> None:
    """Make a Ray started by this process a single-node cluster on 127.0.0.1: its GCS, raylet, workers, agents
    and metrics exporters then listen on loopback only. Ray binds them to the node address, and resolves
    "127.0.0.1" to the machine's network address unless cluster mode is off (its single-machine setting, read
    from this variable at import and inherited by every Ray process this one starts)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray._private.ray_constants as ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # `ray` may have been imported before the variable was set


@contextlib.contextmanager
def ray_session(address: str | None):
    """Connect to a cluster at `address`, or start a local Ray for the duration of the command: loopback only,
    with Ray's default token auth (`RAY_AUTH_MODE` from the environment, if set, wins)."""
    import ray

    if ray.is_initialized():
        yield
        return
    if address and address != "auto" and not address.startswith("ray://"):
        _check_reachable(address)  # ray.init would retry an unreachable GCS for minutes
    address = address or os.environ.get("RAY_ADDRESS")  # set for `ray job submit` entrypoints
    if not address:
        loopback_only_ray()
        from livetalk_ray.serving.proxy import PROXY_CALLBACK_ENV

        for key, value in PROXY_CALLBACK_ENV.items():  # read by Serve's HTTP proxy, if this command starts Serve
            os.environ.setdefault(key, value)
    kwargs = {"address": address} if address else {"include_dashboard": False}
    try:
        ray.init(log_to_driver=False, logging_level="ERROR", **kwargs)
    except ConnectionError as exc:
        raise ConfigError(
            f"cannot connect to the Ray cluster at {address} ({exc}): check that it runs the same Ray version "
            "and auth mode (RAY_AUTH_MODE), or leave --address out for a local Ray"
        ) from None
    quiet_ray_console()
    try:
        yield
    finally:
        ray.shutdown()
