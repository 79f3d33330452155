"""Shared pieces of the `livetalk` commands: options, config resolution, error handling, Ray sessions.

User errors (bad preset, unreadable image or audio, wrong checkpoint, ...) end with one red line and exit
code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from livetalk_ray.config import ConfigError, LiveTalkConfig, load_config

console = Console()
err_console = Console(stderr=True, soft_wrap=True)

PresetOpt = Annotated[str | None, typer.Option("--preset", help="toy | wan-1.3b | wan-14b (default toy)")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML config file")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override, e.g. --set cache.sink_size=6")]
AddressOpt = Annotated[str | None, typer.Option("--address", help="Ray cluster address; default: local Ray")]


def _user_errors() -> tuple[type[Exception], ...]:
    from livetalk_ray.data.schema import SchemaError
    from livetalk_ray.models.audio import AudioError
    from livetalk_ray.models.checkpoint import CheckpointError
    from livetalk_ray.models.image import ImageError
    from livetalk_ray.models.vae import VAEError

    return ConfigError, ImageError, AudioError, CheckpointError, VAEError, SchemaError, FileNotFoundError


def friendly_errors(fn):
    """Turn the known user errors into one clear line and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            # ConfigError first: the other error types live with the model stack (torch, transformers), whose
            # import costs seconds; an exit or a plain config error must not pay for it.
            if isinstance(exc, typer.Exit) or not (isinstance(exc, ConfigError) or isinstance(exc, _user_errors())):
                raise
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
            raise typer.Exit(2) from None

    return wrapper


def resolve_config(preset: str | None, config: Path | None, overrides: list[str] | None) -> LiveTalkConfig:
    return load_config(preset, config, overrides)


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot reach the Ray cluster at {address}: {exc}") from None


@contextlib.contextmanager
def ray_session(address: str | None):
    """Connect to a cluster at `address`, or start a local Ray for the duration of the command."""
    import ray

    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local runs; clusters set their own auth mode
    if address and address != "auto" and not address.startswith("ray://"):
        _check_reachable(address)  # ray.init would retry an unreachable GCS for minutes
    address = address or os.environ.get("RAY_ADDRESS")  # set for `ray job submit` entrypoints
    kwargs = {"address": address} if address else {"include_dashboard": False}
    try:
        ray.init(log_to_driver=False, logging_level="ERROR", **kwargs)
    except ConnectionError as exc:
        raise ConfigError(f"cannot connect to the Ray cluster at {address}: {exc}") from None
    try:
        yield
    finally:
        ray.shutdown()
