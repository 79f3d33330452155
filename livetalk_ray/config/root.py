"""The whole config tree: LiveTalkConfig, its derived sizes and its frame arithmetic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from livetalk_ray.config.base import _Section
from livetalk_ray.config.model import (
    AudioEncoderConfig,
    CacheConfig,
    DiTConfig,
    SamplerConfig,
    TextEncoderConfig,
    VAEConfig,
    VideoConfig,
    video_frames_of,
)
from livetalk_ray.config.serve import RuntimeConfig, ServeConfig
from livetalk_ray.config.train import DataConfig, PipelineConfig, TrainConfig


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
