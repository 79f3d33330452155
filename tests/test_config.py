import pytest
import yaml
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


def test_derived_sizes():
    toy = load_config("toy")
    assert (toy.latent_height, toy.tokens_per_frame) == (8, 16)
    real = load_config("wan-1.3b")
    assert (real.latent_height, real.tokens_per_frame) == (64, 1024)


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


def test_every_default_is_the_1_3b_student():
    assert LiveTalkConfig(preset="wan-1.3b").model.num_layers == 30
    assert load_config("wan-1.3b") == LiveTalkConfig(preset="wan-1.3b")


def test_frame_arithmetic_lives_on_the_config():
    """One rule for every frame count: the causal VAE's first latent frame is one video frame, later ones 4."""
    cfg = load_config("toy")
    assert cfg.block_video_frames(0) == 9 and cfg.block_video_frames(1) == 12
    assert cfg.video_frames(4, at_start=False) == 16 and cfg.video_frames(4, at_start=True) == 13
    assert cfg.latent_frames(33) == 9 == cfg.clip_latent_frames and cfg.latent_frames(36) == 9
    assert cfg.block_seconds == 12 / 16
    for frames in range(1, 200):  # the fewest blocks whose frames reach `frames`
        n = cfg.blocks_for_video_frames(frames)
        made = sum(cfg.block_video_frames(k) for k in range(n))
        assert made >= frames and made - cfg.block_video_frames(n - 1) < frames


def test_model_interface_sizes_are_derived_from_the_vae_and_encoders(tmp_path):
    """in/out/text/audio sizes of the DiT are set in one place each: the VAE and encoder sections."""
    cfg = load_config("toy", overrides=["text.d_model=48", "audio.num_hidden_layers=3", "vae.z_dim=8"])
    m = cfg.model
    assert (m.text_dim, m.audio_feature_dim, m.in_dim, m.out_dim) == (48, 32 * 5, 17, 8)
    assert m.audio_frames_per_latent == cfg.vae.temporal_factor == 4
    assert (
        load_config("toy", overrides=["vae.temperal_downsample=[false,false,true]"]).model.audio_frames_per_latent == 2
    )
    cfg.save(tmp_path / "c.yaml")
    saved = yaml.safe_load((tmp_path / "c.yaml").read_text())["model"]
    assert not {"text_dim", "audio_feature_dim", "in_dim", "out_dim", "audio_frames_per_latent"} & set(saved)
    assert load_config(config_file=tmp_path / "c.yaml") == cfg
    assert load_config("toy", overrides=["model.text_dim=64"]).model.text_dim == 64  # agreeing is fine
    with pytest.raises(ConfigError, match=r"model.text_dim=10 disagrees with text.d_model \(64\).*set text.d_model"):
        load_config("toy", overrides=["model.text_dim=10"])


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
