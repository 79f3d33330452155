"""The one typed config tree of livetalk-ray.

Every default lives in this package exactly once. Presets (`toy`, `wan-1.3b`, `wan-14b`) are data: partial dicts
merged over the defaults. The resolved config is saved as YAML beside every checkpoint and run, and
every command accepts `--config FILE` and `--set a.b=value` overrides on top of a preset.

Modules, lower ones never importing higher ones: `base` (the section base class, ConfigError), `model`, `train`
and `serve` (the sections), `root` (LiveTalkConfig, the whole tree), `load` (presets, overrides, resume checks).
"""

from livetalk_ray.config.base import ConfigError
from livetalk_ray.config.load import (
    DEFAULT_PRESET,
    PRESETS,
    RENAMED,
    RESUME_MUST_MATCH,
    load_config,
    resume_changes,
)
from livetalk_ray.config.model import (
    TOY_INIT_SEED,
    WAN_NEGATIVE_PROMPT,
    AudioEncoderConfig,
    CacheConfig,
    DiTConfig,
    SamplerConfig,
    TextEncoderConfig,
    TinyDecoderConfig,
    VAEConfig,
    VideoConfig,
    video_frames_of,
)
from livetalk_ray.config.root import DERIVED_FROM, LiveTalkConfig, derived_model_sizes
from livetalk_ray.config.serve import (
    ASRConfig,
    LLMConfig,
    RuntimeConfig,
    ServeConfig,
    SpeechConfig,
    resolve_device,
    resolve_dtype,
)
from livetalk_ray.config.train import (
    DataConfig,
    DMDConfig,
    DMDPlacement,
    EngineConfig,
    ODEConfig,
    OptimConfig,
    PipelineConfig,
    PlateauConfig,
    RolePlacement,
    TeacherConfig,
    TrainConfig,
    VAETrainConfig,
)

__all__ = [
    "DEFAULT_PRESET",
    "DERIVED_FROM",
    "PRESETS",
    "RENAMED",
    "RESUME_MUST_MATCH",
    "TOY_INIT_SEED",
    "WAN_NEGATIVE_PROMPT",
    "AudioEncoderConfig",
    "CacheConfig",
    "ConfigError",
    "DMDConfig",
    "DMDPlacement",
    "DataConfig",
    "DiTConfig",
    "EngineConfig",
    "LLMConfig",
    "LiveTalkConfig",
    "ODEConfig",
    "OptimConfig",
    "PipelineConfig",
    "PlateauConfig",
    "RolePlacement",
    "RuntimeConfig",
    "SamplerConfig",
    "ServeConfig",
    "ASRConfig",
    "SpeechConfig",
    "TeacherConfig",
    "TextEncoderConfig",
    "TrainConfig",
    "TinyDecoderConfig",
    "VAEConfig",
    "VAETrainConfig",
    "VideoConfig",
    "derived_model_sizes",
    "load_config",
    "resolve_device",
    "resolve_dtype",
    "resume_changes",
    "video_frames_of",
]
