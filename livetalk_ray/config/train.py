"""Data preparation and training sections: curation, optimiser, engine, the stages and their placement."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from livetalk_ray.config.base import _Section


class DataConfig(_Section):
    """Curation thresholds and pipeline sizes of `livetalk data prepare` (see data/curation.py)."""

    num_frames: int = 81  # video frames per training clip, 4k+1 (LiveTalk: 81 = 21 latent frames)
    min_fps: float = 12.0
    max_fps: float = 120.0
    min_side: int = 64  # shorter side of the source video, pixels
    max_frame_pixels: int = 4096 * 4096  # larger frames are refused before decoding
    max_seconds: float = 3600.0
    black_luma: float = 0.06  # a frame with mean luma (0..1) below this is black
    black_max_fraction: float = 0.3
    frozen_diff: float = 0.5 / 255  # mean absolute change between frames below this is frozen
    frozen_max_fraction: float = 0.9
    blur_min_laplacian_var: float = 20.0  # variance of the Laplacian of the sharpest frame, 0..255 luma
    silence_dbfs: float = -45.0  # audio RMS below this is silence
    max_av_offset_frames: int = 2  # |lag| of lower-face motion vs audio envelope allowed
    av_min_correlation: float = 0.5  # an offset is only declared for a clear peak this strong ...
    av_min_margin: float = 0.25  # ... and this much above the in-sync correlation
    require_caption: bool = True
    caption_rewriter: str | None = None  # "module:function" (str -> str), e.g. an LLM rewrite, after the rules
    feature_dtype: Literal["float16", "float32"] = "float16"  # latents and features in the shards
    clips_per_shard: int = 16
    decode_cpus: float = 1.0  # CPUs per decode/curate task
    decode_memory_mb: int = 1024  # memory reserved per decode task, so the scheduler does not over-pack them
    decode_max_retries: int = 2  # a clip whose task keeps killing its worker is then quarantined (worker_lost)
    decode_batch_clips: int = 1  # clips per decode task; a worker crash loses the whole task's clips
    encode_actors: int = 1
    encode_cpus: float = 1.0  # logical CPUs held by each encoder actor (it runs torch with that many threads)
    encode_gpus: float = 0.0  # GPUs per encoder actor (set 1 on GPU nodes, with runtime.device=cuda)
    encode_batch_clips: int = 4

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if (self.num_frames - 1) % 4:
            raise ValueError(f"data.num_frames must be 4k+1, got {self.num_frames}")
        return self


class OptimConfig(_Section):
    """AdamW and its schedule (LiveTalk ODE init: 4e-5, betas (0.9, 0.999), no weight decay)."""

    lr: float = 4e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the end of the schedule (train.max_steps)


class EngineConfig(_Section):
    """How one model trains: DeepSpeed (ZeRO stage) or plain torch (DDP when distributed)."""

    backend: Literal["deepspeed", "torch"] = "deepspeed"
    zero_stage: int = Field(default=2, ge=0, le=2)  # stage 3 would shard weights the Wan-layout export reads
    micro_batch_per_worker: int = 1
    grad_accum_steps: int = 1
    grad_clip: float = 10.0


class TeacherConfig(_Section):
    """Bidirectional teacher fine-tune: per-sample condition dropout so text and audio CFG work."""

    init_checkpoint: str | None = None  # starting weights (merged OmniAvatar for real runs); None: random init

    text_dropout: float = 0.1  # text embedding replaced by zeros (the empty / negative prompt)
    audio_dropout: float = 0.1  # wav2vec2 features replaced by zeros, as the "no audio" CFG branch
    reference_dropout: float = 0.05  # reference latent zeroed (mask kept), frame 0 then has to be generated


class ODEConfig(_Section):
    """ODE trajectories (teacher sampler → states at the student's timesteps) and the causal student's
    regression onto them (LiveTalk `ode.yaml`)."""

    teacher_checkpoint: str | None = None  # generation samples it; regression starts the student from it
    seeds_per_clip: int = 1  # trajectories per training condition (different noise)
    actors: int = 1  # Ray Data actor pool size for generation
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    clips_per_call: int = 4  # clips sampled together by one actor call


class RolePlacement(_Section):
    """Resources of one DMD role's actors; roles with the same `node_group` share a placement-group bundle
    set (and so a node type), e.g. critic and teacher on the big-memory GPUs."""

    count: int = Field(default=1, ge=1)  # actors; for generator/critic, ranks of a DeepSpeed group
    cpus: float = 1.0
    gpus: float = 0.0
    node_group: str | None = None  # None: anywhere; else a custom resource name the nodes advertise


class DMDPlacement(_Section):
    generator: RolePlacement = Field(default_factory=RolePlacement)
    critic: RolePlacement = Field(default_factory=RolePlacement)
    teacher: RolePlacement = Field(default_factory=RolePlacement)
    rollout: RolePlacement = Field(default_factory=RolePlacement)


class DMDConfig(_Section):
    """On-policy DMD (LiveTalk `dmd.yaml`, Self-Forcing's schedule); see reference-models.md §3.3."""

    generator_checkpoint: str | None = None  # the ODE-initialised student
    teacher_checkpoint: str | None = None  # the real score; the critic starts from it too
    generator_lr: float = 4e-6
    critic_lr: float = 8e-7
    betas: tuple[float, float] = (0.0, 0.999)
    critic_per_generator: int = 5  # one generator step per this many critic steps
    critic_warmup: int = 20  # critic-only steps before the first generator step
    ema_decay: float = 0.99
    ema_start: int = 200  # generator steps before the EMA shadow starts
    staleness: int = 1  # rollouts may lag the generator by this many weight versions; 0 = synchronous
    queue_size: int = 4  # bounded rollout queue (detached rollouts waiting for critic steps)
    role_timeout_s: float = 600.0  # a role call slower than this counts as a failure (train.max_failures)
    placement: DMDPlacement = Field(default_factory=DMDPlacement)


class PlateauConfig(_Section):
    """Convergence: the mean loss of a `window` of steps improved by less than `min_improvement` (relative)
    on the window before, `patience` windows in a row. Reported by every stage; `stop` ends the run there."""

    window: int = 200
    min_improvement: float = 0.02
    patience: int = 3
    stop: bool = False


class VAETrainConfig(_Section):
    """Toy VAE fit (`livetalk train vae`): real presets use the pretrained Wan VAE instead."""

    lr: float = 1e-3
    schedule: Literal["constant", "cosine"] = "cosine"
    streams: int = 16  # live training streams (each a clip played forwards and backwards)
    clips_per_step: int = 4  # streams advanced per step, picked at random from the live ones
    chunk_latents: int = 4  # latent frames per stream per step (16 video frames at 4x temporal compression)
    # mean chunks before a stream restarts on a new clip (10 x 16 frames = 10 s at 16 fps): long enough to cover
    # the decoder's temporal reach, short enough that stream starts (the reference frame's path) train often
    episode_chunks: int = 10
    kl_weight: float = 1e-6
    psnr_clips: int = 4  # clips of --data held out of training for the PSNR report
    eval_stream_seconds: float = 12.0  # ... over each clip's first 33 frames and over a stream this long
    # False: fine-tune the decoder only; latents, and every shard and model made from them, stay valid.
    train_encoder: bool = True


class TinyDecoderTrainConfig(_Section):
    """Tiny decoder distillation (`livetalk train tiny-decoder`): its frames learn the full decoder's (and, from
    clips, the ground truth's) for the same latents."""

    lr: float = 1e-3
    schedule: Literal["constant", "cosine"] = "cosine"
    clips_per_step: int = 8  # whole clips per worker per step (the decoder is small: a step is cheap)
    truth_weight: float = 0.5  # weight of the ground-truth frames' loss beside the full decoder's (clips only)
    psnr_clips: int = 4  # clips of --data held out of training for the PSNR report
    # Clips in the distillation set, which keeps the full decoder's frames of each on disk (targets.pt: about
    # 64 MB per 81-frame 512x512 clip, 0.4 MB per toy clip), decoded once before training.
    max_clips: int = 512


class TrainConfig(_Section):
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    ode: ODEConfig = Field(default_factory=ODEConfig)
    dmd: DMDConfig = Field(default_factory=DMDConfig)
    vae: VAETrainConfig = Field(default_factory=VAETrainConfig)
    tiny_decoder: TinyDecoderTrainConfig = Field(default_factory=TinyDecoderTrainConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    plateau: PlateauConfig = Field(default_factory=PlateauConfig)
    # The stage's length in optimizer steps (DMD: critic steps, one per iteration): the LR schedule spans it
    # and a training command stops there unless `--max-steps` stops this invocation earlier or later.
    max_steps: int = 1000
    checkpoint_every: int = 100
    max_failures: int = 3  # Ray Train restarts the worker group from the newest checkpoint this often
    # Ray Train placement: one DeepSpeed rank per worker.
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    # Held-out conditions for the sample report (PNG frames, lip-sync); None: the first training clips.
    eval_data: str | None = None
    report_clips: int = 2  # conditions of eval_data the sample report draws


class PipelineConfig(_Section):
    """`livetalk pipeline`: the whole toy chain, stage by stage (the values of the run in the README)."""

    train_clips: int = 160
    heldout_clips: int = 16  # toy-world clips rendered for evaluation only
    # Each stage's train.max_steps in the chain
    vae_train_steps: int = 2000
    tiny_decoder_train_steps: int = 1500  # distilled from the VAE's decoder (the `vae.decoder=tiny` serving tier)
    teacher_train_steps: int = 2500
    ode_train_steps: int = 3000  # an upper bound: the plateau detector ends the stage
    ode_lr: float = 2e-4
    dmd_train_steps: int = 600  # critic steps
    eval_seconds: float = 60.0  # each held-out portrait's stream in the long-stream evaluation
    eval_people: int = 2  # bundled portraits streamed (all six are held out of training)
