"""Start a training stage: checks on the driver, then `train_loop` on a Ray Train TorchTrainer (one DeepSpeed
rank per worker, gloo on CPU, NCCL on GPU) or in this process. The driver follows metrics.jsonl for its
progress bar, so it shows the same numbers the run directory keeps."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from livetalk_ray.config import ConfigError, LiveTalkConfig
from livetalk_ray.train.cursor import DataCursor
from livetalk_ray.train.engine import latest_checkpoint
from livetalk_ray.train.loop import MetricsLog, following, load_stage, train_loop


def absolute_paths(cfg: LiveTalkConfig) -> LiveTalkConfig:
    """Workers run in other directories: every path in the config becomes absolute."""
    cfg = cfg.model_copy(deep=True)
    for section, key in (
        (cfg.train.teacher, "init_checkpoint"),
        (cfg.train.ode, "teacher_checkpoint"),
        (cfg.train.dmd, "generator_checkpoint"),
        (cfg.train.dmd, "teacher_checkpoint"),
        (cfg.train, "eval_data"),
        (cfg.vae, "path"),
        (cfg.vae.tiny, "path"),
        (cfg.audio, "path"),
        (cfg.text, "path"),
    ):
        value = getattr(section, key, None)
        if value:
            setattr(section, key, str(Path(value).expanduser().resolve()))
    return cfg


def newest_to_resume(run_dir: Path, resume: bool) -> Path | None:
    """The run's newest checkpoint; one that exists without --resume is a user error (nothing is overwritten)."""
    last = latest_checkpoint(run_dir)
    if last is not None and not resume:
        raise ConfigError(f"{run_dir} already holds {last.name}: pass --resume to continue it, or choose a new --out")
    return last


def preflight(stage_name: str, cfg: LiveTalkConfig, data: Path, run_dir: Path, resume: bool) -> LiveTalkConfig:
    """Every check that can fail before workers start, with a message that says what to do."""
    stage = load_stage(stage_name)
    last = newest_to_resume(run_dir, resume)
    if last is not None:
        saved = json.loads((last / "trainer.json").read_text()).get("stage")
        if saved not in (None, stage_name):
            raise ConfigError(f"{run_dir} is a {saved} run, not a {stage_name} run: choose a new --out")
    if not data.exists():
        raise FileNotFoundError(
            f"--data {data} does not exist: pass the --out directory of `livetalk data prepare` "
            "(`livetalk ode generate` for the ode stage)"
        )
    files = stage.shard_files(data, cfg)  # schema and column checks
    if cfg.train.eval_data:
        from livetalk_ray.data.reader import check_shards

        check_shards(cfg.train.eval_data, cfg)
    if cfg.train.workers < 1:
        raise ConfigError("train.workers must be at least 1 (--workers N)")
    # The workers' own check, here in seconds rather than after the worker group started.
    DataCursor(files, stage.columns(cfg), cfg.train.engine.micro_batch_per_worker, world=cfg.train.workers)
    return absolute_paths(cfg)


def run_stage(
    stage_name: str,
    cfg: LiveTalkConfig,
    data: str | Path,
    run_dir: str | Path,
    max_steps: int,
    *,
    resume: bool = False,
    use_ray: bool = True,
    on_progress: Callable[[dict], None] | None = None,
) -> dict:
    """Train `stage_name` ("teacher" or "ode") to `max_steps`; returns summary.json's content."""
    data, run_dir = Path(data).resolve(), Path(run_dir).resolve()
    cfg = preflight(stage_name, cfg, data, run_dir, resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").unlink(missing_ok=True)
    config = {
        "cfg": cfg.model_dump(mode="json"),
        "stage": stage_name,
        "data": str(data),
        "run_dir": str(run_dir),
        "max_steps": max_steps,
    }
    if not use_ray:
        train_loop(config)
    else:
        # fit() runs on the main thread so that Ray Train's SIGINT handler turns Ctrl-C into a graceful
        # abort; a helper thread follows metrics.jsonl for the progress callback.
        with following(MetricsLog(run_dir, enabled=True), on_progress):
            try:
                fit_on_ray(config, cfg, stage_name, run_dir)
            except SystemExit:
                pass  # Ray Train's Ctrl-C handler aborts the run with sys.exit; reported below as an interruption
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        last = latest_checkpoint(run_dir)
        raise StageInterrupted(
            f"the {stage_name} run stopped before step {max_steps}"
            + (f"; its newest checkpoint is {last}: rerun with --resume to continue" if last else "")
        )
    summary = json.loads(summary_path.read_text())
    if on_progress and (records := MetricsLog(run_dir, enabled=True).read()):
        on_progress(records[-1])
    return summary


class StageInterrupted(RuntimeError):
    """A training run that ended (Ctrl-C, a worker group that gave up) before its last step."""


def _stop_on_user_error():
    """A Ray Train callback (it runs in the Train controller) that ends the run at a worker's user error (too few
    clips, a checkpoint that does not fit): every restart would fail the same way, after train.max_failures
    worker-group restarts. Ray Train retries a WorkerGroupError but not a ControllerError, which `fit()`
    raises with the user error as its `controller_failure`."""
    from ray.train import ControllerError, UserCallback

    from livetalk_ray.errors import find_user_error

    class StopOnUserError(UserCallback):
        def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
            for exc in worker_exceptions.values():
                if (found := find_user_error(exc)) is not None:
                    raise ControllerError(found)

    return StopOnUserError()


def fit_on_ray(config: dict, cfg: LiveTalkConfig, stage_name: str, run_dir: Path, loop: Callable = train_loop) -> None:
    """`loop(config)` on a Ray Train TorchTrainer of `train.workers` workers; a worker's user error ends the run."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = cfg.train.gpus_per_worker > 0
    resources = {"CPU": cfg.train.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.train.gpus_per_worker
    trainer = TorchTrainer(
        loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=cfg.train.workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            storage_path=str(run_dir / "ray"),
            name=f"{stage_name}-{time.strftime('%Y%m%d-%H%M%S')}",
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=[_stop_on_user_error()],
        ),
    )
    trainer.fit()
