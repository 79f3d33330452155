"""Presets, files, overrides and renamed keys (livetalk_ray/config/load.py)."""

import pytest
from pydantic import ValidationError

from livetalk_ray.config import DEFAULT_PRESET, PRESETS, RENAMED, ConfigError, LiveTalkConfig, load_config


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_validate(name):
    cfg = load_config(name)
    assert cfg.preset == name


def test_overrides_and_yaml_round_trip(tmp_path):
    cfg = load_config("toy", overrides=["cache.sink_size=6", "sampler.text_guidance=4.5", "runtime.device=cpu"])
    assert cfg.cache.sink_size == 6 and cfg.sampler.text_guidance == 4.5
    path = tmp_path / "config.yaml"
    cfg.save(path)
    again = load_config(config_file=path)
    assert again == cfg
    # a file plus overrides: the override wins
    assert load_config(config_file=path, overrides=["cache.sink_size=3"]).cache.sink_size == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"preset": "huge"}, "unknown preset 'huge'"),
        ({"overrides": ["cache.sink_size"]}, "section.key=value"),
        ({"overrides": ["cache.nope=1"]}, "cache.nope"),
        ({"overrides": ["cache.sink_size=4"]}, "multiples of frames_per_block"),
        ({"overrides": ["model.text_dim=10"]}, "text_dim"),
        ({"config_file": "/nonexistent/x.yaml"}, "config file not found"),
    ],
)
def test_bad_configs_name_the_problem(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        load_config(**kwargs)


def test_renamed_keys_load_from_old_files_and_are_refused_as_overrides(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text(
        "preset: toy\npipeline:\n  teacher_steps: 7\n  eval_clips: 5\n"
        "train:\n  eval_clips: 3\n  vae:\n    eval_clips: 1\ntext:\n  negative_prompt: ''\n"
    )
    cfg = load_config(config_file=old)
    assert (cfg.pipeline.teacher_train_steps, cfg.pipeline.heldout_clips) == (7, 5)
    assert (cfg.train.report_clips, cfg.train.vae.psnr_clips) == (3, 1)
    assert cfg.sampler.teacher_steps == 48  # the sampler's own key is untouched by the pipeline rename
    for old_name, new_name in RENAMED.items():
        with pytest.raises(ConfigError, match=f"{old_name} was renamed {new_name}"):
            load_config("toy", overrides=[f"{old_name}=1"])


def test_the_default_preset_is_named_once():
    assert load_config().preset == DEFAULT_PRESET == "toy"
    with pytest.raises(ValidationError):
        LiveTalkConfig()  # the class's defaults are wan-1.3b's, but a config must say which preset it is
