"""The training loop of the teacher and ODE stages: the same function runs in every Ray Train worker, or
in this process (tests, a laptop).

A stage (teacher.py, ode.py) supplies the model, the loss, the columns it reads and a sampler for the
report; this file owns everything else: seeding, the data cursor, the engine, logging, plateau detection,
checkpoints and the sample report. A run directory holds

    metrics.jsonl   one line per optimizer step (loss, lr, samples/s): the driver's progress bar reads it
    loss.png        the loss curve, redrawn at every checkpoint
    report.json     sample-report history (toy preset: lip-sync of generated clips)
    checkpoints/step_NNNNNN/  weights, config, training state, samples.png
    summary.json    written when the run ends
"""

from __future__ import annotations

import contextlib
import importlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from livetalk_ray import metrics
from livetalk_ray.config import LiveTalkConfig, PlateauConfig, resolve_device, resolve_dtype
from livetalk_ray.models.dit import WanDiT
from livetalk_ray.train.cursor import DataCursor
from livetalk_ray.train.engine import TrainEngine, latest_checkpoint

if TYPE_CHECKING:
    from livetalk_ray.train.report import Reporter

STAGE_MODULES = {"teacher": "livetalk_ray.train.teacher", "ode": "livetalk_ray.train.ode"}


@dataclass(frozen=True)
class Stage:
    name: str
    build_model: Callable[[LiveTalkConfig, torch.device, torch.dtype], WanDiT]
    loss: Callable[[WanDiT, dict, LiveTalkConfig], torch.Tensor]
    columns: Callable[[LiveTalkConfig], list[str]]
    shard_files: Callable[[str | Path, LiveTalkConfig], list[Path]]  # checks the schema, lists the shards
    sample: Callable[[WanDiT, LiveTalkConfig, dict, int], torch.Tensor]  # latents for the sample report


def load_stage(name: str) -> Stage:
    if name not in STAGE_MODULES:
        raise ValueError(f"unknown training stage {name!r}; choose one of: {', '.join(STAGE_MODULES)}")
    return importlib.import_module(STAGE_MODULES[name]).STAGE


class Plateau:
    """Windowed mean loss; `converged` once `patience` windows in a row improved less than the threshold."""

    def __init__(self, cfg: PlateauConfig, state: dict | None = None) -> None:
        self.cfg = cfg
        state = state or {}
        self.window_sum, self.window_count = state.get("window_sum", 0.0), state.get("window_count", 0)
        self.means: list[float] = state.get("means", [])
        self.flat = state.get("flat", 0)
        self.converged_at: int | None = state.get("converged_at")

    def update(self, loss: float, step: int) -> None:
        self.window_sum += loss
        self.window_count += 1
        if self.window_count < self.cfg.window:
            return
        mean = self.window_sum / self.window_count
        if self.means:
            improvement = (self.means[-1] - mean) / max(abs(self.means[-1]), 1e-12)
            self.flat = self.flat + 1 if improvement < self.cfg.min_improvement else 0
            if self.flat >= self.cfg.patience and self.converged_at is None:
                self.converged_at = step
        self.means.append(mean)
        self.window_sum, self.window_count = 0.0, 0

    @property
    def stop(self) -> bool:
        return self.cfg.stop and self.converged_at is not None

    def state_dict(self) -> dict:
        return {
            "window_sum": self.window_sum,
            "window_count": self.window_count,
            "means": self.means,
            "flat": self.flat,
            "converged_at": self.converged_at,
        }


class MetricsLog:
    """metrics.jsonl on rank 0; a resumed run first drops the lines past its checkpoint."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.path, self.enabled = run_dir / "metrics.jsonl", enabled

    def truncate(self, step: int) -> None:
        if self.enabled and self.path.exists():
            lines = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= step]
            self.path.write_text("".join(line + "\n" for line in lines))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []


@contextlib.contextmanager
def following(log: MetricsLog, on_progress: Callable[[dict], None] | None, every_s: float = 1.0):
    """While the body runs, a helper thread passes the newest metrics record to `on_progress`."""
    stop = threading.Event()

    def follow() -> None:
        while not stop.wait(every_s):
            if on_progress and (records := log.read()):
                on_progress(records[-1])

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def train_loop(config: dict) -> None:
    """Worker entry point. `config`: cfg (JSON), stage, data, run_dir, max_steps. Continues from the newest
    checkpoint in run_dir when there is one (the driver refuses to start over an old run without --resume),
    which is also how a worker group restarted by Ray Train after a failure picks up."""
    cfg = LiveTalkConfig.model_validate(config["cfg"])
    stage = load_stage(config["stage"])
    run_dir, max_steps = Path(config["run_dir"]), int(config["max_steps"])
    model, engine, cursor, rank, world = _build_worker(cfg, stage, config["data"])
    log = MetricsLog(run_dir, enabled=rank == 0)
    # train_seconds is optimizer-step time only: checkpoints and reports stay out, resumes add up
    plateau, train_seconds = _resume(cfg, run_dir, engine, cursor, log)
    reporter = None
    if rank == 0:
        from livetalk_ray.train.report import Reporter

        reporter = Reporter(cfg, stage, run_dir, config["data"])
    micro, accum = cfg.train.engine.micro_batch_per_worker, cfg.train.engine.grad_accum_steps
    loss_sum, tick = 0.0, time.perf_counter()
    while engine.step < max_steps and not plateau.stop:
        loss = stage.loss(engine.module, cursor.next_batch(), cfg)
        stepped = engine.backward_step(loss)
        loss_sum += _mean_over_workers(loss, world)
        if not stepped:
            continue
        step, now = engine.step, time.perf_counter()
        mean_loss = loss_sum / accum
        plateau.update(mean_loss, step)
        train_seconds += now - tick
        entry = {
            "step": step,
            "loss": mean_loss,
            "lr": engine.lr,
            "samples_per_s": micro * world * accum / (now - tick),
            "epoch": cursor.epoch,
            "train_s": train_seconds,
        }
        log.write(entry)
        if rank == 0:  # one series per run, like metrics.jsonl
            metrics.record(metrics.TRAIN_STEP_SECONDS, now - tick, role=stage.name)
            metrics.record(metrics.TRAIN_STEPS, role=stage.name)
            metrics.record_training(stage.name, entry)
        if step % cfg.train.checkpoint_every == 0 or step == max_steps or plateau.stop:
            extra = {
                "stage": stage.name,
                "cursor": cursor.state_dict(),
                "plateau": plateau.state_dict(),
                "train_seconds": train_seconds,
            }
            directory = engine.save(run_dir, extra=extra)
            if reporter is not None:
                reporter.report(model, directory, log.read(), plateau)
        loss_sum, tick = 0.0, time.perf_counter()  # checkpoint and report time stays out of samples/s
    if rank == 0:
        _write_summary(run_dir, stage, engine, plateau, world, reporter)


def _build_worker(
    cfg: LiveTalkConfig, stage: Stage, data: str | Path
) -> tuple[WanDiT, TrainEngine, DataCursor, int, int]:
    """This worker's model, engine and data cursor, and its rank and the world size."""
    device = resolve_device(cfg.runtime)
    dtype = resolve_dtype(cfg.runtime, device)
    if cfg.train.engine.backend == "deepspeed":
        from livetalk_ray.train.engine import init_distributed_for_deepspeed

        init_distributed_for_deepspeed()  # before the cursor asks for rank and world size
    rank, world = _rank_world()
    torch.manual_seed(cfg.runtime.seed)  # identical initial weights on every rank
    model = stage.build_model(cfg, device, dtype).train()
    engine = TrainEngine(model, cfg)
    torch.manual_seed(cfg.runtime.seed + 1 + rank)  # this rank's noise, timesteps, dropout (saved per rank)
    micro = cfg.train.engine.micro_batch_per_worker
    files = stage.shard_files(data, cfg)
    cursor = DataCursor(files, stage.columns(cfg), micro, rank=rank, world=world, seed=cfg.runtime.seed)
    return model, engine, cursor, rank, world


def _resume(
    cfg: LiveTalkConfig, run_dir: Path, engine: TrainEngine, cursor: DataCursor, log: MetricsLog
) -> tuple[Plateau, float]:
    """Load the newest checkpoint in run_dir, if any, into the engine and the cursor and drop the metrics
    past it; returns the plateau detector and the training seconds to continue from."""
    if (last := latest_checkpoint(run_dir)) is None:
        return Plateau(cfg.train.plateau), 0.0
    state = engine.load(last)
    cursor.load_state_dict(state["cursor"])
    plateau = Plateau(cfg.train.plateau, state["plateau"])
    log.truncate(engine.step)
    return plateau, state["train_seconds"]


def _mean_over_workers(loss: torch.Tensor, world: int) -> float:
    value = loss.detach().float()
    if world > 1:
        dist.all_reduce(value)
        value /= world
    return float(value)


def _write_summary(
    run_dir: Path, stage: Stage, engine: TrainEngine, plateau: Plateau, world: int, reporter: Reporter | None
) -> None:
    summary = {
        "stage": stage.name,
        "step": engine.step,
        "checkpoint": str(latest_checkpoint(run_dir)),
        "converged_at": plateau.converged_at,
        "workers": world,
        **(reporter.latest if reporter else {}),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
