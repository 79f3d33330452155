"""Model sections: the DiT, its KV cache, video size, VAE, audio and text encoders, and the samplers."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from livetalk_ray.config.base import _Section

# Seed of the randomly initialised components of a preset without weights (toy VAE, wav2vec2, umT5, DiT),
# fixed so that every process of a run builds the same ones; `runtime.seed` only drives sampling noise.
TOY_INIT_SEED = 0


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


class TinyDecoderConfig(_Section):
    """The tiny streaming decoder that `vae.decoder=tiny` selects (models/tiny_decoder.py, TAEHV's architecture)."""

    # A TAEHV-format .safetensors: madebyollin's taew2_1 for Wan 2.1 latents, or one `livetalk train tiny-decoder`
    # made. None: a seeded random decoder (only useful for timing).
    path: str | None = None
    widths: list[int] = Field(default_factory=lambda: [256, 128, 64, 64])  # TAEHV's; a file's own shapes win
    time_upscale: list[bool] = Field(default_factory=lambda: [False, True, True])  # 4x in all, as the Wan VAE


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
    # What turns latents into frames when serving, generating and evaluating: the Wan decoder, or the tiny one
    # (several times faster; training and the reference-image encode always use the full VAE).
    decoder: Literal["full", "tiny"] = "full"
    tiny: TinyDecoderConfig = Field(default_factory=TinyDecoderConfig)

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


def video_frames_of(latent_frames: int, temporal_factor: int, at_start: bool) -> int:
    """t·f video frames for f latent frames, or 1 + t·(f-1) at a stream's start (the causal VAE's rule)."""
    return temporal_factor * latent_frames - (temporal_factor - 1 if at_start else 0)
