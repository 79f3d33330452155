"""ODE stage: teacher trajectories, then the causal student's regression onto them (LiveTalk `ode.yaml`).

Trajectories: the bidirectional teacher's many-step CFG sampler runs over every training condition; the
states at the student's timesteps (1000, 937.5, 833.3, 625 for 4 steps, all on the 48-step grid) and the
final latent are kept as one tensor column `ode_states` [S+1, C, F, h, w] next to the input columns.
Noise is seeded per (clip, seed index), so a trajectory does not depend on which actor made it.

Regression: the causal student starts from the teacher's weights. Per block one index into the student's
timesteps is drawn; the whole clip runs once through the block-causal mask with every block at its own
noise level; x0 = x_t − σ·v is regressed onto the trajectory's end (MSE). Latent frame 0 is the given
reference and is left out of the loss, as in the teacher's.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from livetalk_ray.config import LiveTalkConfig
from livetalk_ray.data.reader import check_shards
from livetalk_ray.data.schema import SchemaError
from livetalk_ray.diffusion.clips import CONDITION_COLUMNS, conditions, sample_stream
from livetalk_ray.diffusion.flow import FlowSchedule, student_steps
from livetalk_ray.diffusion.sampler import reference_condition, sample_teacher
from livetalk_ray.models.checkpoint import CheckpointError, load_checkpoint
from livetalk_ray.models.conditioning import negative_text
from livetalk_ray.models.dit import WanDiT
from livetalk_ray.progress import progress_bar
from livetalk_ray.train.loop import Stage

STATES = "ode_states"


def student_timesteps(cfg: LiveTalkConfig) -> list[float]:
    """1000·σ of the student's steps: where the teacher's trajectories are kept."""
    return [sigma * cfg.sampler.num_train_timesteps for sigma in student_steps(cfg.sampler).sigmas]


def states_shape(cfg: LiveTalkConfig) -> tuple[int, ...]:
    return (len(student_timesteps(cfg)) + 1, cfg.vae.z_dim, cfg.clip_latent_frames, cfg.latent_height, cfg.latent_width)


def states_field(cfg: LiveTalkConfig) -> pa.Field:
    dtype = pa.from_numpy_dtype(np.dtype(cfg.data.feature_dtype))
    return pa.field(STATES, pa.fixed_shape_tensor(dtype, list(states_shape(cfg))))


def trajectory_shards(directory: str | Path, cfg: LiveTalkConfig) -> list[Path]:
    """Shards with the base schema plus `ode_states` made for these student timesteps."""
    files = check_shards(directory, cfg)
    want = states_field(cfg)
    for f in files:
        schema = pq.read_schema(f)
        if STATES not in schema.names:
            raise SchemaError(f"{f} has no {STATES!r} column: make trajectories with `livetalk ode generate`")
        if not schema.field(STATES).type.equals(want.type):
            raise SchemaError(
                f"{f}: {STATES} is {schema.field(STATES).type}, expected {want.type}: make the trajectories "
                "again for this config (`livetalk ode generate`)"
            )
        meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
        kept = json.loads(meta.get("livetalk.ode_timesteps", "[]"))
        if [round(t, 3) for t in kept] != [round(t, 3) for t in student_timesteps(cfg)]:
            raise SchemaError(
                f"{f}: trajectories kept timesteps {kept}, the student uses {student_timesteps(cfg)}: make them "
                "again for this config (`livetalk ode generate`)"
            )
    return files


def noise_seed(base: int, clip_id: str, index: int) -> int:
    return (base * 1_000_003 + zlib.crc32(f"{clip_id}#{index}".encode())) % 2**63


class TrajectoryMaker:
    """Holds the frozen teacher; turns rows of a shard into rows with `ode_states` (also a Ray Data actor)."""

    def __init__(self, cfg: LiveTalkConfig | dict) -> None:
        from livetalk_ray.config import resolve_device, resolve_dtype

        cfg = cfg if isinstance(cfg, LiveTalkConfig) else LiveTalkConfig.model_validate(cfg)
        torch.set_num_threads(max(1, round(cfg.train.ode.cpus_per_actor)))
        checkpoint = cfg.train.ode.teacher_checkpoint
        if not checkpoint:
            raise CheckpointError("ODE trajectories need a teacher: set train.ode.teacher_checkpoint (--teacher)")
        self.cfg = cfg
        self.device = resolve_device(cfg.runtime)
        self.dtype = resolve_dtype(cfg.runtime, self.device)
        self.teacher, _ = load_checkpoint(checkpoint, device=self.device, dtype=self.dtype, causal=False)
        self.teacher.eval().requires_grad_(False)
        self.keep = student_timesteps(cfg)
        self.negative = negative_text(cfg, self.device, self.dtype)

    def states(self, batch: dict, seeds: list[int]) -> np.ndarray:
        """[B, S+1, C, F, h, w] states at the student's timesteps plus the final latent."""
        cfg, dev, dtype = self.cfg, self.device, self.dtype
        ref, text, audio = conditions(batch, cfg, dev, dtype)
        shape = (cfg.vae.z_dim, cfg.clip_latent_frames, cfg.latent_height, cfg.latent_width)
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
        final, kept = sample_teacher(
            self.teacher,
            cfg,
            noise.to(dev, dtype),
            ref.to(dtype),
            text,
            self.negative.expand_as(text),
            audio,
            keep_timesteps=self.keep,
        )
        return torch.stack([*kept, final], dim=1).float().cpu().numpy()

    def shard(self, table: pa.Table) -> pa.Table:
        """All rows of one input shard, `seeds_per_clip` times each, with their trajectories."""
        from livetalk_ray.data.reader import table_to_batch

        ode = self.cfg.train.ode
        rows = [(r, k) for r in range(table.num_rows) for k in range(ode.seeds_per_clip)]
        table = table.take(pa.array([r for r, _ in rows]))
        ids = table.column("clip_id").to_pylist()
        seeds = [noise_seed(self.cfg.runtime.seed, ids[i], k) for i, (_, k) in enumerate(rows)]
        parts = []
        for i in range(0, table.num_rows, ode.clips_per_call):
            batch = table_to_batch(table.slice(i, ode.clips_per_call), CONDITION_COLUMNS)
            parts.append(self.states(batch, seeds[i : i + ode.clips_per_call]))
        states = np.concatenate(parts).astype(self.cfg.data.feature_dtype)
        table = table.append_column(states_field(self.cfg), pa.FixedShapeTensorArray.from_numpy_ndarray(states))
        table = table.append_column("ode_seed", pa.array([k for _, k in rows], pa.int32()))
        meta = dict(table.schema.metadata or {})
        meta[b"livetalk.ode_timesteps"] = json.dumps(self.keep).encode()
        meta[b"livetalk.ode_teacher"] = str(self.cfg.train.ode.teacher_checkpoint).encode()
        return table.replace_schema_metadata(meta)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray Data entry: one input shard path per row → the output table as Arrow IPC bytes (the driver
        writes it, so workers need no shared output filesystem)."""
        out = []
        for path in batch["path"]:
            table = self.shard(pq.read_table(str(path)))
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
            out.append(sink.getvalue().to_pybytes())
        return {"name": batch["name"], "arrow": np.array(out, dtype=object)}


def generate_trajectories(
    cfg: LiveTalkConfig, data_dir: str | Path, out_dir: str | Path, *, use_ray: bool = True, progress: bool = True
) -> dict:
    """Trajectories for every clip of every input shard → `out_dir/shards/` (same shard names).

    Through a Ray Data actor pool of `train.ode.actors` teachers (Ray must be initialised), or in this
    process with `use_ray=False`. Finished shards are skipped, so an interrupted job resumes."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from livetalk_ray.data.pipeline import write_parquet_atomic

    files = check_shards(data_dir, cfg)
    out = Path(out_dir)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.yaml")
    rows = {f.name: pq.read_metadata(f).num_rows * cfg.train.ode.seeds_per_clip for f in files}
    todo = [f for f in files if not (out / "shards" / f.name).exists()]
    start = time.perf_counter()
    columns = [TextColumn("[bold]ode"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with progress_bar(*columns, disable=not progress) as bar:
        task = bar.add_task("trajectories", total=sum(rows.values()))
        bar.update(task, completed=sum(rows[f.name] for f in files if f not in todo))
        for name, table in _run_makers(cfg, todo, use_ray):
            write_parquet_atomic(table, out / "shards" / name)
            bar.update(task, advance=rows[name])
    made = sum(rows[f.name] for f in todo)
    seconds = time.perf_counter() - start
    stats = {
        "shards": len(files),
        "trajectories": sum(rows.values()),
        "made_this_run": made,
        "seconds_this_run": seconds,
        "trajectories_per_s": made / seconds if made else None,
        "timesteps": student_timesteps(cfg),
        "teacher": cfg.train.ode.teacher_checkpoint,
    }
    (out / "ode_stats.json").write_text(json.dumps(stats, indent=2))
    return stats


def _run_makers(cfg: LiveTalkConfig, todo: list[Path], use_ray: bool):
    """(shard name, output table) for each input shard, in completion order."""
    if not todo:
        return
    if not use_ray:
        maker = TrajectoryMaker(cfg)
        for f in todo:
            yield f.name, maker.shard(pq.read_table(f))
        return
    import ray

    from livetalk_ray.errors import defer_init_errors

    ode = cfg.train.ode
    ray.data.DataContext.get_current().enable_progress_bars = False  # the driver shows one bar
    items = [{"path": str(f.resolve()), "name": f.name} for f in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        defer_init_errors(TrajectoryMaker),  # a teacher that does not load fails the first batch, one clear error
        fn_constructor_kwargs={"cfg": cfg.model_dump(mode="json")},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=ode.actors),
        num_cpus=ode.cpus_per_actor,
        num_gpus=ode.gpus_per_actor,
    )
    for batch in ds.iter_batches(batch_size=1, batch_format="numpy"):
        with pa.ipc.open_stream(pa.py_buffer(batch["arrow"][0])) as reader:
            yield str(batch["name"][0]), reader.read_all()


# ------------------------------------------------------------------------------------------ regression
def ode_loss(
    model: WanDiT, batch: dict[str, torch.Tensor], cfg: LiveTalkConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    param = next(model.parameters())
    dev, dtype = param.device, param.dtype
    states = batch[STATES].to(dev, torch.float32)  # [B, S+1, C, F, h, w]
    b, s1, _, f = states.shape[:4]
    fpb = cfg.cache.frames_per_block
    if f % fpb:
        raise ValueError(f"{f} latent frames are not whole blocks of {fpb}")
    steps = student_steps(cfg.sampler)  # the model is told `timesteps`; the states sit at `sigmas`
    timesteps = torch.tensor(steps.timesteps, device=dev, dtype=steps.timestep_dtype)
    sigmas = torch.tensor(steps.sigmas, device=dev)
    index = torch.randint(s1 - 1, (b, f // fpb), generator=generator, device=dev).repeat_interleave(fpb, dim=1)
    xt = states[torch.arange(b, device=dev)[:, None], index, :, torch.arange(f, device=dev)[None, :]]  # [B,F,C,h,w]
    xt = xt.permute(0, 2, 1, 3, 4)
    t = timesteps[index]  # [B, F]
    ref, text, audio = conditions(batch, cfg, dev, dtype)
    y = reference_condition(ref, f)
    v = model(xt.to(dtype), t, text, y.to(dtype), audio)
    x0 = FlowSchedule(cfg.sampler).x0_from_v(xt, v.float(), sigmas[index])
    return torch.mean((x0 - states[:, -1])[:, :, 1:] ** 2)


def build_student(cfg: LiveTalkConfig, device, dtype) -> WanDiT:
    checkpoint = cfg.train.ode.teacher_checkpoint
    if not checkpoint:
        raise CheckpointError("the ODE student starts from the teacher: set train.ode.teacher_checkpoint")
    model, _ = load_checkpoint(checkpoint, device=device, dtype=dtype, causal=True)
    return model


def ode_columns(cfg: LiveTalkConfig) -> list[str]:
    return [STATES, *CONDITION_COLUMNS]


STAGE = Stage("ode", build_student, ode_loss, ode_columns, trajectory_shards, sample_stream)
