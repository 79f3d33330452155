"""`livetalk job ...`: run a stage (`jobs/<stage>.py`) as a Ray job on a cluster, and watch, list or stop it.

`submit` ships the project directory (the one holding `jobs/`) as the job's runtime_env `working_dir`; Ray puts
it first on the job's PYTHONPATH, so the cluster runs this checkout's `livetalk_ray`. The cluster's Python must
already have the dependencies: an image with `pip install livetalk-ray` (or `pip install -e .` of this
checkout) on every node, or per-job requirements with `--pip`. `--config FILE` travels with the job from
anywhere: it is copied into `_livetalk_job/` of the uploaded directory and the entrypoint names it relative to
the working dir. Paths in the stage's own options (`--data`, `--out`, ...) are paths on the cluster.

Exit codes: 0 done (for `status`: SUCCEEDED, RUNNING or PENDING); 1 the job FAILED or was STOPPED (`submit
--wait`, `logs --follow`, `status`), or `stop` could not end it; 2 user error (unknown stage or job id,
unreachable or wrong address, bad config or override); 130 interrupted while following (the job keeps running).
"""

from __future__ import annotations

import sys
import time
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.markup import escape

from livetalk_ray.cli.common import ConfigOpt, PresetOpt, SetOpt, console, err_console, friendly_errors
from livetalk_ray.cli.job_client import (
    DEFAULT_ADDRESS,
    PACKING_EXCLUDES,
    TERMINAL,
    Cluster,
    _value,
    build_entrypoint,
    check_stage_args,
    parse_env,
    project_root,
    resolve_stage,
    staged_working_dir,
)
from livetalk_ray.config import load_config

job_app = typer.Typer(no_args_is_help=True, help="Stages as Ray jobs on a cluster: submit, status, logs, stop, list.")

LOG_TAIL_LINES = 20
HEALTHY = ("SUCCEEDED", "RUNNING", "PENDING")
STATUS_STYLE = {"SUCCEEDED": "green", "FAILED": "red", "STOPPED": "yellow", "RUNNING": "cyan", "PENDING": "blue"}
ADDRESS_HELP = f"the head's dashboard URL; default $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS or {DEFAULT_ADDRESS}"
JobAddressOpt = Annotated[str | None, typer.Option("--address", help=ADDRESS_HELP)]
JobIdArg = Annotated[str, typer.Argument(help="submission id (`livetalk job list` shows them)")]


def _job_id(info) -> str:
    return escape(info.submission_id or info.job_id or "?")


def _stage(info) -> str:
    stage = (info.metadata or {}).get("livetalk_stage")
    return escape(stage or (info.entrypoint[:40] + ("…" if len(info.entrypoint) > 40 else "")))


def _styled(status: str) -> str:
    return f"[{STATUS_STYLE.get(status, 'white')}]{status}[/]"


def _when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def _took(info) -> str:
    seconds = int(((info.end_time or time.time() * 1000) - info.start_time) / 1000) if info.start_time else None
    if seconds is None:
        return "-"
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def _reason(info) -> str:
    lines = (info.message or "").strip().splitlines()
    # Ray appends the log's tail to a failure's first line; the tail is printed on its own.
    return escape(lines[0].split(", last available logs")[0]) if lines else "no message"


def _wait_until(cluster: Cluster, job_id: str, done, label: str, timeout_s: float | None = None):
    """Poll the job's status (with a spinner) until done(status) or the timeout; returns the last info."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with console.status(label) as spinner:
        while True:
            info = cluster.info(job_id)
            status = _value(info.status)
            if done(status) or (deadline is not None and time.monotonic() > deadline):
                return info
            spinner.update(f"{label} ({status})")
            time.sleep(0.5)


def _report_end(cluster: Cluster, info) -> int:
    """The outcome line (and, for a failure, the log's last lines); the exit code it means."""
    job_id, status = _job_id(info), _value(info.status)
    if status in HEALTHY:  # SUCCEEDED, or still running after the log stream closed
        console.print(f"job {job_id} {_styled(status)} after {_took(info)}: {_reason(info)}", highlight=False)
        return 0
    # The log says why the entrypoint failed; for a failure before it ran (runtime env setup, an unschedulable
    # supervisor) the cause is in the message after its first line.
    ran = info.error_type in (None, "JOB_ENTRYPOINT_COMMAND_ERROR")
    lines = cluster.logs(job_id).rstrip().splitlines() if ran else (info.message or "").splitlines()[1:]
    if lines:
        err_console.rule(f"last {min(len(lines), LOG_TAIL_LINES)} lines of {job_id}'s {'log' if ran else 'message'}")
        err_console.print("\n".join(lines[-LOG_TAIL_LINES:]), markup=False, highlight=False)
        err_console.rule()
    kind = f" ({info.error_type})" if info.error_type else ""
    err_console.print(f"[bold red]job {job_id} {status}{kind}:[/] {_reason(info)}", highlight=False)
    return 1


def _follow_to_end(cluster: Cluster, job_id: str) -> int:
    try:
        _wait_until(cluster, job_id, lambda s: s != "PENDING", f"waiting for {job_id} to start")
        cluster.stream_logs(job_id)
        # The stream can close a moment before the status turns terminal.
        info = _wait_until(cluster, job_id, lambda s: s in TERMINAL, f"waiting for {job_id} to end", timeout_s=30)
    except KeyboardInterrupt:
        err_console.print(
            f"[yellow]stopped following; job {job_id} keeps running[/] (`livetalk job stop {job_id}`)", highlight=False
        )
        return 130
    return _report_end(cluster, info)


@job_app.command(
    "submit",
    epilog="Example: livetalk job submit teacher --address http://head:8265 --config my.yaml --wait "
    "-- --data /shared/shards --out /shared/runs/teacher",
)
@friendly_errors
def submit(
    stage: Annotated[str, typer.Argument(help="a jobs/<stage>.py entrypoint: data_prepare, vae, teacher, ...")],
    stage_args: Annotated[
        list[str] | None, typer.Argument(help="the stage's own options, after `--` (paths are cluster paths)")
    ] = None,
    address: JobAddressOpt = None,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    env: Annotated[list[str] | None, typer.Option("--env", help="job environment variable KEY=VALUE")] = None,
    pip: Annotated[
        list[str] | None, typer.Option("--pip", help="requirement Ray installs for this job (runtime_env pip)")
    ] = None,
    entrypoint_cpus: Annotated[
        float | None, typer.Option("--entrypoint-cpus", min=0, help="CPUs reserved for the entrypoint (vae fits in it)")
    ] = None,
    entrypoint_gpus: Annotated[
        float | None, typer.Option("--entrypoint-gpus", min=0, help="GPUs for the entrypoint")
    ] = None,
    job_id: Annotated[str | None, typer.Option("--job-id", help="submission id (default: Ray picks one)")] = None,
    wait: Annotated[
        bool, typer.Option("--wait", "--follow", help="stream the log until the job ends; exit 1 if it fails")
    ] = False,
) -> None:
    """Submit STAGE as a Ray job: this project as the working dir, --config shipped with it, --set passed on."""
    root = project_root()
    stage = resolve_stage(stage, root)
    stage_args = list(stage_args or [])
    check_stage_args(stage_args)
    load_config(preset, config, set_)  # a bad file or override fails here, not after a queue wait on the cluster
    env_vars = parse_env(env)
    cluster = Cluster(address)
    with staged_working_dir(root, config) as (working_dir, staged_config):
        runtime_env: dict[str, Any] = {"working_dir": str(working_dir), "excludes": PACKING_EXCLUDES}
        runtime_env |= {"env_vars": env_vars, **({"pip": list(pip)} if pip else {})}
        metadata = {"livetalk_stage": stage, "livetalk_config": config.name if config else ""}
        with console.status(f"uploading {root} and submitting {stage} to {cluster.url}"):
            submission_id = cluster.submit(
                entrypoint=build_entrypoint(stage, staged_config, preset, set_, stage_args),
                runtime_env=runtime_env,
                metadata=metadata,
                submission_id=job_id,
                entrypoint_num_cpus=entrypoint_cpus,  # default 0: the entrypoint may land on any node, the head too
                entrypoint_num_gpus=entrypoint_gpus,
            )
    console.print(f"submitted {stage} as job [bold]{escape(submission_id)}[/] to {cluster.url}", highlight=False)
    if not wait:
        where = f" --address {cluster.url}"
        console.print(f"  follow: livetalk job logs {submission_id} --follow{where}", highlight=False)
        console.print(f"  status: livetalk job status {submission_id}{where}", highlight=False)
        console.print(f"  stop:   livetalk job stop {submission_id}{where}", highlight=False)
        return
    raise typer.Exit(_follow_to_end(cluster, submission_id))


@job_app.command("status")
@friendly_errors
def status_command(job_id: JobIdArg, address: JobAddressOpt = None) -> None:
    """Status and message of a job; exits 0 for SUCCEEDED, RUNNING or PENDING and 1 for FAILED or STOPPED."""
    info = Cluster(address).info(job_id)
    status = _value(info.status)
    kind = f" ({info.error_type})" if info.error_type else ""
    console.print(f"job {_job_id(info)} ({_stage(info)}): {_styled(status)}", highlight=False)
    console.print(f"  message:    {_reason(info)}{kind}", highlight=False)
    times = f"{_when(info.start_time)}  ended: {_when(info.end_time)}  took: {_took(info)}"
    console.print(f"  started:    {times}", highlight=False)
    console.print(f"  entrypoint: {info.entrypoint}", highlight=False, markup=False)
    if status not in HEALTHY:
        raise typer.Exit(1)


@job_app.command("logs")
@friendly_errors
def logs_command(
    job_id: JobIdArg,
    address: JobAddressOpt = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="stream until the job ends; exit 1 if it FAILED or was STOPPED")
    ] = False,
    tail: Annotated[int | None, typer.Option("--tail", min=1, help="only the last N lines")] = None,
) -> None:
    """Print a job's log (driver stdout and stderr); --follow streams it until the job ends."""
    cluster = Cluster(address)
    if follow:
        raise typer.Exit(_follow_to_end(cluster, job_id))
    text = cluster.logs(job_id)
    if tail is not None:
        text = "".join(text.splitlines(keepends=True)[-tail:])
    sys.stdout.write(text)


@job_app.command("stop")
@friendly_errors
def stop_command(
    job_id: JobIdArg,
    address: JobAddressOpt = None,
    timeout: Annotated[float, typer.Option("--timeout", min=1, help="seconds to wait for the job to end")] = 60.0,
) -> None:
    """Stop a job (SIGTERM, then SIGKILL after Ray's grace period) and wait until it has ended."""
    cluster = Cluster(address)
    info = cluster.info(job_id)
    if _value(info.status) in TERMINAL:
        console.print(f"job {job_id} already ended: {_styled(_value(info.status))}", highlight=False)
        return
    cluster.stop(job_id)
    info = _wait_until(cluster, job_id, lambda s: s in TERMINAL, f"stopping {job_id}", timeout_s=timeout)
    status = _value(info.status)
    if status not in TERMINAL:
        err_console.print(f"[bold red]error:[/] job {job_id} is still {status} after {timeout:g} s", highlight=False)
        raise typer.Exit(1)
    console.print(f"job {job_id} {_styled(status)}", highlight=False)


@job_app.command("list")
@friendly_errors
def list_command(address: JobAddressOpt = None) -> None:
    """Every submitted job on the cluster, oldest first: id, stage, status, start time, duration."""
    from rich import box
    from rich.table import Table

    cluster = Cluster(address)
    jobs = sorted(cluster.jobs(), key=lambda j: j.start_time or float("inf"))
    if not jobs:
        console.print(f"no jobs on {cluster.url}", highlight=False)
        return
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("job id", no_wrap=True)
    table.add_column("stage", overflow="fold")
    table.add_column("status", no_wrap=True)
    table.add_column("started", no_wrap=True)
    table.add_column("took", no_wrap=True, justify="right")
    for info in jobs:
        status = _value(info.status)
        table.add_row(_job_id(info), _stage(info), _styled(status), _when(info.start_time), _took(info))
    console.print(table)
