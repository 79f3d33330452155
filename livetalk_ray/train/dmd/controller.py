"""The asynchronous DMD loop, on one screen.

Iteration i is one critic step on rollout i. Before it, when i ≥ critic_warmup and (i − warmup) is a
multiple of critic_per_generator, the generator takes one step (its own rollout with gradient, scored by
the teacher and the current critic) and publishes weight version v + 1. Rollout i is made by a rollout
worker with generator version V(i) = max(0, G(i) − staleness), G(i) = generator steps taken up to and
including iteration i: with staleness 0 that is the synchronous algorithm (each rollout waits for the
newest weights); with staleness ≥ 1 workers produce rollouts ahead, in parallel with critic and generator
steps, up to `queue_size` ahead.

Everything a rollout depends on — its conditions (a data cursor consumed in request order), noise seed,
exit step and weight version — is a function of its index, never of timing, and each worker receives
`set_weights(v)` in its own call stream right before the first rollout that needs v (Ray runs one caller's
calls to an actor in order). So the async run computes exactly what the synchronous schedule with the
same staleness computes, and resume is exact: checkpoints hold both engines, EMA, the cursors, the
finished-but-unused rollouts with their versions and the weights of every version still to be used.
"""

from __future__ import annotations

import json
import time
from collections import deque
from pathlib import Path

import ray
import torch
from safetensors.torch import load_file, save_file

from livetalk_ray import metrics
from livetalk_ray.config import LiveTalkConfig
from livetalk_ray.diffusion.clips import CONDITION_COLUMNS
from livetalk_ray.errors import find_user_error
from livetalk_ray.models.checkpoint import CheckpointError
from livetalk_ray.seeds import seed_of
from livetalk_ray.train.cursor import DataCursor
from livetalk_ray.train.dmd import layout
from livetalk_ray.train.dmd.placement import RoleActors, start_roles
from livetalk_ray.train.dmd.schedule import generator_steps_through, takes_generator_step
from livetalk_ray.train.loop import MetricsLog, following


def request_plan(i: int, cfg: LiveTalkConfig) -> tuple[int, int, int]:
    """(weight version, noise seed, exit step) of rollout i: functions of i alone."""
    version = max(0, generator_steps_through(i, cfg) - cfg.train.dmd.staleness)
    g = torch.Generator().manual_seed(seed_of(cfg.runtime.seed, "dmd.exit_step", i))
    exit_step = int(torch.randint(cfg.sampler.student_steps, (1,), generator=g))
    return version, seed_of(cfg.runtime.seed, "dmd.rollout", i), exit_step


class Controller:
    def __init__(self, cfg: LiveTalkConfig, data: str | Path, run_dir: str | Path, max_steps: int) -> None:
        from livetalk_ray.data.reader import check_shards

        self.cfg, self.run_dir, self.max_steps = cfg, Path(run_dir), max_steps
        self.run_dir.mkdir(parents=True, exist_ok=True)
        files = check_shards(data, cfg)
        # Each rank of a trainer group takes micro_batch_per_worker samples of every batch it is given.
        micro, place = cfg.train.engine.micro_batch_per_worker, cfg.train.dmd.placement
        seed = cfg.runtime.seed
        self.rollout_data = DataCursor(
            files, CONDITION_COLUMNS, micro * place.critic.count, seed=seed_of(seed, "dmd.rollout_data")
        )
        self.generator_data = DataCursor(
            files, CONDITION_COLUMNS, micro * place.generator.count, seed=seed_of(seed, "dmd.generator_data")
        )
        self.log = MetricsLog(self.run_dir, enabled=True)
        self.it = 0  # critic steps done
        self.version = 0  # generator steps done = newest weight version
        self.next_request = 0
        self.ready: dict[int, tuple[torch.Tensor, dict, int]] = {}  # i → (rollout, conditions, version)
        self.pending: dict[int, tuple[ray.ObjectRef, ray.ObjectRef, dict]] = {}  # i → (x, version, conditions)
        self.weights: dict[int, ray.ObjectRef] = {}  # versions rollouts still need
        self.worker_version: list[int | None] = []
        self.roles: RoleActors | None = None
        self.name = f"livetalk-dmd:{self.run_dir}"

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        failures = 0
        while True:
            try:
                self._start()
                return self._loop()
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
                if find_user_error(exc) is not None:
                    raise  # e.g. a checkpoint a role cannot load: every restart would fail the same way
                failures += 1
                event = {"time": time.time(), "step": self.it, "event": "role_failure", "detail": str(exc)[:500]}
                with (self.run_dir / "events.jsonl").open("a") as f:  # never truncated by a resume
                    f.write(json.dumps(event) + "\n")
                if failures > self.cfg.train.max_failures:
                    raise
            finally:
                self._stop()

    def _loop(self) -> dict:
        d, timeout = self.cfg.train.dmd, self.cfg.train.dmd.role_timeout_s
        roles = self.roles
        # Critic steps are submitted without waiting (the critic runs them back to back, each on a rollout
        # passed by reference); the controller blocks only before a generator step, which must see them all.
        in_flight: deque[tuple[dict, list[ray.ObjectRef], object]] = deque()

        def collect(keep: int = 0) -> None:
            while len(in_flight) > keep:
                record, refs, version = in_flight.popleft()
                record.update(rank_mean(ray.get(refs, timeout=timeout)))
                used = ray.get(version, timeout=timeout) if isinstance(version, ray.ObjectRef) else version
                record["staleness"] = record["generator_version"] - used
                record["done_s"] = time.perf_counter() - self.started
                self.log.write(record)
                metrics.record_training("dmd", record)

        while self.it < self.max_steps:
            record: dict = {"step": self.it + 1}
            if takes_generator_step(self.it, self.cfg):
                collect()
                batch, seed = self.generator_data.next_batch(), seed_of(self.cfg.runtime.seed, "dmd.generator", self.it)
                exit_step = request_plan(self.it, self.cfg)[2]
                calls = [
                    g.train_step.remote(batch, seed, exit_step, roles.teachers, roles.critics) for g in roles.generators
                ]
                record.update(rank_mean(ray.get(calls, timeout=timeout)))
                self.version += 1
                if self.version >= d.ema_start:
                    ray.get(roles.generator.update_ema.remote(d.ema_decay), timeout=timeout)
                self.weights[self.version] = roles.generator.weights.remote()
            self._fill_queue()
            x, batch, version = self._take(self.it)
            seed = seed_of(self.cfg.runtime.seed, "dmd.critic", self.it)
            in_flight.append((record, [c.train_step.remote(x, batch, seed) for c in roles.critics], version))
            self.it += 1
            record.update(generator_version=self.version, queue_depth=len(self.ready) + len(self.pending))
            collect(keep=d.queue_size)
            if self.it % self.cfg.train.checkpoint_every == 0 or self.it == self.max_steps:
                ray.get([ref for _, refs, _ in in_flight for ref in refs], timeout=timeout)
                record["busy_s"] = roles.busy_seconds(timeout)  # since the roles started
                record["roles_up_s"] = time.perf_counter() - self.started
                collect()
                self._save()
        return self._summary()

    def _fill_queue(self) -> None:
        """Submit rollouts ahead, in index order, while their weight version exists and the queue has room."""
        roles = self.roles
        while self.next_request < min(self.max_steps, self.it + self.cfg.train.dmd.queue_size):
            i = self.next_request
            version, seed, exit_step = request_plan(i, self.cfg)
            if version > self.version:
                break  # synchronous schedule (or a deep lookahead): wait for the generator
            w = i % len(roles.rollouts)
            if self.worker_version[w] != version:
                roles.rollouts[w].set_weights.remote(self.weights[version], version)
                self.worker_version[w] = version
            batch = self.rollout_data.next_batch()
            # Two returns: the rollout travels on to the critic by reference, its version to the controller.
            x_ref, version_ref = roles.rollouts[w].rollout.options(num_returns=2).remote(batch, seed, exit_step)
            self.pending[i] = (x_ref, version_ref, batch)
            self.next_request += 1
        # Submitted rollouts hold their own weight refs; only versions of unsubmitted ones must stay.
        floor = min(request_plan(self.next_request, self.cfg)[0], self.version)
        self.weights = {v: ref for v, ref in self.weights.items() if v >= floor}

    def _take(self, i: int) -> tuple[object, dict, object]:
        """Rollout i as (tensor or ref, conditions, version or ref): restored ones are values, others refs."""
        if i in self.ready:
            return self.ready.pop(i)
        x_ref, version_ref, batch = self.pending.pop(i)
        return x_ref, batch, version_ref

    # ------------------------------------------------------------------ roles, checkpoints
    def _start(self) -> None:
        self.roles = start_roles(self.cfg, name=self.name)
        self.started = time.perf_counter()
        self.worker_version = [None] * len(self.roles.rollouts)
        self.pending = {}
        if (last := self.latest()) is not None:
            self._load(last)
        else:  # a fresh run, or a failure before the first checkpoint: start over
            self.it = self.version = self.next_request = 0
            self.rollout_data.load_state_dict({"epoch": 0, "position": 0})
            self.generator_data.load_state_dict({"epoch": 0, "position": 0})
            self.ready = {}
            self.weights = {0: self.roles.generator.weights.remote()}
            self.log.truncate(0)

    def _stop(self) -> None:
        if self.roles is not None:
            self.roles.kill()
            self.roles = None

    def latest(self) -> Path | None:
        done = layout.finished_steps(self.run_dir)
        return done[-1] if done else None

    def _save(self) -> None:
        directory = layout.step_directory(self.run_dir, self.it)
        directory.mkdir(parents=True, exist_ok=True)
        timeout = self.cfg.train.dmd.role_timeout_s
        for i in sorted(self.pending):  # finished rollouts are state; in-flight ones become finished
            x_ref, version_ref, batch = self.pending.pop(i)
            self.ready[i] = (ray.get(x_ref, timeout=timeout), batch, ray.get(version_ref, timeout=timeout))
        extra = {"dmd_step": self.it, "version": self.version}
        generator, critic = (str(layout.role_directory(directory, role)) for role in ("generator", "critic"))
        saves = [g.save_with_ema.remote(generator, extra) for g in self.roles.generators]
        saves += [c.save.remote(critic, extra) for c in self.roles.critics]
        ray.get(saves, timeout=timeout)  # every rank: DeepSpeed saves collectively
        torch.save({i: (x, b, v) for i, (x, b, v) in self.ready.items()}, directory / layout.QUEUE)
        for v, ref in self.weights.items():
            save_file(ray.get(ref, timeout=timeout), str(layout.rollout_weights(directory, v)))
        state = {
            "it": self.it,
            "version": self.version,
            "next_request": self.next_request,
            "rollout_cursor": self.rollout_data.state_dict(),
            "generator_cursor": self.generator_data.state_dict(),
            "weight_versions": sorted(self.weights),
        }
        (directory / layout.MARKER).write_text(json.dumps(state, indent=2))  # last: marks it complete

    def _load(self, directory: Path) -> None:
        state = json.loads((directory / layout.MARKER).read_text())
        timeout = self.cfg.train.dmd.role_timeout_s
        generator, critic = (layout.role_engine_checkpoint(directory, r) for r in ("generator", "critic"))
        if generator is None or critic is None:
            raise CheckpointError(
                f"{directory} lacks a generator or critic checkpoint: remove it to resume from the one before"
            )
        loads = [g.load_with_ema.remote(str(generator)) for g in self.roles.generators]
        ray.get(loads + [c.load.remote(str(critic)) for c in self.roles.critics], timeout=timeout)
        self.it, self.version, self.next_request = state["it"], state["version"], state["next_request"]
        self.rollout_data.load_state_dict(state["rollout_cursor"])
        self.generator_data.load_state_dict(state["generator_cursor"])
        self.ready = torch.load(directory / layout.QUEUE, weights_only=False)
        self.weights = {
            v: ray.put(load_file(str(layout.rollout_weights(directory, v)))) for v in state["weight_versions"]
        }
        self.log.truncate(self.it)

    def _summary(self) -> dict:
        records = [r for r in self.log.read() if "critic_loss" in r]
        summary = {"step": self.it, "generator_steps": self.version, "checkpoint": str(self.latest())}
        if len(records) > 1:  # completion rate; the first step also waited for the first rollout
            summary["iterations_per_s"] = (len(records) - 1) / (records[-1]["done_s"] - records[0]["done_s"])
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def rank_mean(results: list[dict]) -> dict:
    """One record from a trainer group's per-rank results: losses averaged, counters from rank 0."""
    merged = dict(results[0])
    for key, value in merged.items():
        if isinstance(value, float):
            merged[key] = sum(r[key] for r in results) / len(results)
    return merged


def run_dmd(
    cfg: LiveTalkConfig,
    data: str | Path,
    run_dir: str | Path,
    max_steps: int,
    *,
    resume: bool = False,
    on_progress=None,
) -> dict:
    """Checks, then the controller on this driver (Ray initialised); `on_progress(record)` as steps land."""
    from livetalk_ray.config import ConfigError
    from livetalk_ray.models.checkpoint import CheckpointError
    from livetalk_ray.train.launch import absolute_paths

    run_dir = Path(run_dir).resolve()
    cfg = absolute_paths(cfg)
    for key in ("generator_checkpoint", "teacher_checkpoint"):
        path = getattr(cfg.train.dmd, key)
        if not path or not (Path(path) / "model.safetensors").is_file():
            option = "--generator" if key == "generator_checkpoint" else "--teacher"
            raise CheckpointError(
                f"train.dmd.{key} must name a checkpoint directory (with model.safetensors), got {path!r}: "
                f"pass {option} runs/.../checkpoints/step_NNNNNN"
            )
    if not Path(data).exists():
        raise FileNotFoundError(f"--data {data} does not exist: pass the --out directory of `livetalk data prepare`")
    controller = Controller(cfg, Path(data).resolve(), run_dir, max_steps)
    if controller.latest() is not None and not resume:
        raise ConfigError(f"{run_dir} already holds {controller.latest().name}: pass --resume or choose a new --out")
    with following(controller.log, on_progress):
        return controller.run()
