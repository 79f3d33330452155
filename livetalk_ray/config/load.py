"""Presets, `--config FILE` and `--set a.b=value` overrides, renamed keys, and what a resume may change."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from livetalk_ray.config.base import ConfigError
from livetalk_ray.config.root import LiveTalkConfig

# Presets are partial dicts over the sections' defaults (which are the 1.3B student's).
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
        "vae": {"base_dim": 16, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1, "tiny": {"widths": [64, 32, 16, 16]}},
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
RESUME_MAY_CHANGE = ("vae.decoder", "vae.tiny.")  # how samples are decoded for viewing changes no training


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
    refused = [k for k in changed if k.startswith(RESUME_MUST_MATCH) and not k.startswith(RESUME_MAY_CHANGE)]
    if refused:
        diffs = "; ".join(f"{k}: {saved.get(k)!r} → {now.get(k)!r}" for k in refused)
        raise ConfigError(
            f"cannot resume from {Path(saved_config).parent}: the run was made with other settings ({diffs}); "
            "set them back, or start a new run directory"
        )
    return [f"{k}: {saved.get(k)!r} → {now.get(k)!r}" for k in changed]
