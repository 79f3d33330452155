import pytest

from livetalk_ray.config import PRESETS, ConfigError, LiveTalkConfig, load_config


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
    assert LiveTalkConfig().model.num_layers == 30
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
