"""Checkpoint save/load, weight import from diffusers / Self-Forcing files, and LiveTalk's key hash."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from livetalk_ray.config import DiTConfig, load_config
from livetalk_ray.models import dit
from livetalk_ray.models.checkpoint import (
    CheckpointError,
    detect_layout,
    diffusers_to_wan,
    import_weights,
    livetalk_key_hash,
    load_checkpoint,
    read_state_dict,
    save_checkpoint,
)
from livetalk_ray.models.dit import WanDiT

diffusers = pytest.importorskip("diffusers")


def toy_model(seed: int = 0, **overrides) -> tuple[WanDiT, object]:
    cfg = load_config("toy", overrides=[f"{k}={v}" for k, v in overrides.items()])
    torch.manual_seed(seed)
    model = WanDiT(cfg.model, frames_per_block=cfg.cache.frames_per_block)
    with torch.no_grad():  # the zero-initialised head would hide a wrongly loaded head
        model.head.head.weight.normal_(0, 0.02)
    return model, cfg


def tiny_diffusers(dim_heads: int, head_dim: int, ffn: int, text_dim: int, layers: int):
    torch.manual_seed(1)
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=dim_heads,
        attention_head_dim=head_dim,
        in_channels=16,
        out_channels=16,
        text_dim=text_dim,
        freq_dim=256,
        ffn_dim=ffn,
        num_layers=layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()


# ---- our own format ----
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_is_bit_identical(tmp_path: Path, dtype: torch.dtype) -> None:
    model, cfg = toy_model()
    model.to(dtype)
    save_checkpoint(model, cfg, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.yaml", "model.safetensors"]
    rng = torch.random.get_rng_state()
    loaded, loaded_cfg = load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(rng, torch.random.get_rng_state())  # building on meta draws no random numbers
    assert loaded_cfg == cfg
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert theirs[key].dtype == dtype and torch.equal(ours[key], theirs[key]), key
    assert all(p.requires_grad and p.device.type == "cpu" for p in loaded.parameters())
    assert loaded.causal and loaded.frames_per_block == cfg.cache.frames_per_block
    as_fp32, _ = load_checkpoint(tmp_path / "ckpt", dtype="float32", causal=False)
    assert not as_fp32.causal and all(p.dtype == torch.float32 for p in as_fp32.parameters())


def test_save_refuses_a_config_that_does_not_describe_the_model(tmp_path: Path) -> None:
    model, _ = toy_model()
    with pytest.raises(CheckpointError, match="does not describe"):
        save_checkpoint(model, load_config("toy", overrides=["model.num_layers=4"]), tmp_path)


def test_shape_mismatch_names_key_and_both_shapes(tmp_path: Path) -> None:
    model, cfg = toy_model()
    save_checkpoint(model, cfg, tmp_path)
    expected = "blocks.0.self_attn.q.weight: checkpoint has 128x128, model expects 64x64"
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(tmp_path, overrides=["model.dim=64"])
    small, _ = toy_model(**{"model.dim": 64})
    with pytest.raises(CheckpointError, match=expected):
        import_weights(small, tmp_path)


def test_unreadable_sources_raise_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.yaml"):
        load_checkpoint(tmp_path)
    for name, data in [
        ("a.safetensors", b"garbage bytes " * 10),
        ("b.pt", b"garbage bytes"),
        ("c.bin", b"PK\x03\x04 not a zip"),
        ("d.safetensors", b"\x10\0\0\0\0\0\0\0{broken"),
        ("e", b""),
    ]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError) as err:
            read_state_dict(tmp_path / name)
        assert str(tmp_path / name) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        read_state_dict(tmp_path)  # a directory without any known model file


# ---- reading other people's files ----
def test_self_forcing_checkpoint_picks_ema_unless_told_not_to(tmp_path: Path) -> None:
    plain, _ = toy_model(seed=1)
    ema, _ = toy_model(seed=2)

    def wrap(m: WanDiT) -> dict[str, torch.Tensor]:  # FSDP state dict of Self-Forcing's WanDiffusionWrapper
        return {"model." + k: v for k, v in m.state_dict().items()}

    dmd = {"generator": wrap(plain), "critic": wrap(plain), "generator_ema": wrap(ema)}
    torch.save(dmd, tmp_path / "dmd.pt")
    torch.save({"generator": wrap(plain)}, tmp_path / "ode.pt")
    for path, use_ema, source in [("dmd.pt", True, ema), ("dmd.pt", False, plain), ("ode.pt", True, plain)]:
        target, _ = toy_model(seed=3)
        report = import_weights(target, tmp_path / path, use_ema=use_ema)
        assert report.layout == "wan" and report.loaded == len(source.state_dict())
        assert not (report.initialised or report.adapted or report.ignored)
        assert all(torch.equal(v, target.state_dict()[k]) for k, v in source.state_dict().items())


def test_wrapper_prefixes_are_stripped(tmp_path: Path) -> None:
    t = torch.zeros(2)
    torch.save({"module._orig_mod.model.blocks.0.a": t, "module._orig_mod.model.head.b": t}, tmp_path / "a")
    assert set(read_state_dict(tmp_path / "a")) == {"blocks.0.a", "head.b"}
    torch.save({"state_dict": {"blocks.0._fsdp_wrapped_module.x": t, "model.y": t}}, tmp_path / "b.bin")
    assert set(read_state_dict(tmp_path / "b.bin")) == {"blocks.0.x", "model.y"}  # not all share model.


def test_sharded_directory(tmp_path: Path) -> None:
    model, _ = toy_model()
    sd = model.state_dict()
    keys = list(sd)
    shards = {"m-1.safetensors": keys[: len(keys) // 2], "m-2.safetensors": keys[len(keys) // 2 :]}
    for name, part in shards.items():
        save_file({k: sd[k].contiguous() for k in part}, tmp_path / name)
    weight_map = {k: name for name, part in shards.items() for k in part}
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = read_state_dict(tmp_path)
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_wan_layout_is_strict_but_ignores_the_image_branch(tmp_path: Path) -> None:
    model, _ = toy_model()
    sd = dict(model.state_dict())
    sd["img_emb.proj.0.weight"] = torch.ones(3)
    sd["blocks.0.cross_attn.k_img.weight"] = torch.ones(3)
    save_file(sd, tmp_path / "i2v.safetensors")
    assert import_weights(toy_model()[0], tmp_path / "i2v.safetensors").ignored == [
        "blocks.0.cross_attn.k_img.weight",
        "img_emb.proj.0.weight",
    ]
    sd["mystery.weight"] = torch.ones(3)
    del sd["blocks.3.ffn.0.bias"]
    save_file(sd, tmp_path / "bad.safetensors")
    expected = r"missing keys \(1\): blocks.3.ffn.0.bias; unexpected keys \(1\): mystery.weight$"
    with pytest.raises(CheckpointError, match=expected):
        import_weights(model, tmp_path / "bad.safetensors")
    with torch.device("meta"):
        meta = WanDiT(model.cfg)
    with pytest.raises(CheckpointError, match="meta"):
        import_weights(meta, tmp_path / "i2v.safetensors")


# ---- diffusers ----
# The tiny diffusers transformer of tiny_diffusers(2, 12, 32, 32, 2): 16 input channels, no audio.
TINY = DiTConfig(
    dim=24,
    ffn_dim=32,
    num_heads=2,
    num_layers=2,
    in_dim=16,
    out_dim=16,
    text_dim=32,
    use_audio=False,
    audio_feature_dim=8,
    audio_frames_per_latent=4,
)


def test_diffusers_mapping_covers_every_key_with_the_right_shape() -> None:
    tr = tiny_diffusers(2, 12, 32, 32, 2)
    assert detect_layout(tr.state_dict()) == "diffusers"
    mapped = diffusers_to_wan(tr.state_dict())
    ours = WanDiT(TINY).state_dict()
    assert detect_layout(ours) == "wan"
    assert mapped.keys() == ours.keys()
    assert all(mapped[k].shape == ours[k].shape for k in ours)
    assert torch.equal(mapped["blocks.1.norm3.weight"], tr.blocks[1].norm2.weight)  # the affine cross norm
    assert torch.equal(mapped["head.modulation"], tr.scale_shift_table)


def test_diffusers_weights_give_the_same_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tr = tiny_diffusers(2, 12, 32, 32, 2)
    tr.save_pretrained(tmp_path)
    model = WanDiT(TINY, causal=False).eval()
    report = import_weights(model, tmp_path)
    assert report.layout == "diffusers" and report.loaded == len(tr.state_dict())
    torch.manual_seed(2)
    x, ctx, t = torch.randn(2, 16, 5, 16, 16), torch.randn(2, 8, 32), torch.tensor([500.0, 937.5])
    with torch.no_grad():
        want = tr(hidden_states=x, timestep=t, encoder_hidden_states=ctx).sample
        got = model(x, t, ctx, torch.zeros(2, 0, 5, 16, 16))
        assert (want - got).abs().max() < 2e-5  # measured 3.4e-6 for outputs of magnitude ~3
        # The remaining gap is the timestep embedding: Wan computes it in float64, diffusers in float32.
        from diffusers.models.embeddings import get_timestep_embedding

        monkeypatch.setattr(
            dit,
            "sinusoidal_embedding",
            lambda dim, tt: get_timestep_embedding(tt.flatten(), dim, flip_sin_to_cos=True, downscale_freq_shift=0),
        )
        assert (want - model(x, t, ctx, torch.zeros(2, 0, 5, 16, 16))).abs().max() < 3e-6  # measured 7e-7


def test_diffusers_t2v_into_the_audio_model_starts_as_the_base_model(tmp_path: Path) -> None:
    tr = tiny_diffusers(4, 32, 256, 64, 6)  # the toy preset's transformer, without audio and 16 channels
    tr.save_pretrained(tmp_path)
    # Wan's own latent layout (16 channels, 2x2 patches), not the toy's 4-channel one
    model, _ = toy_model(**{"model.in_dim": 33, "model.out_dim": 16, "model.patch_size": "[1,2,2]", "vae.z_dim": 16})
    model.causal = False
    audio_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("audio")}
    report = import_weights(model, tmp_path)
    assert report.layout == "diffusers" and report.loaded == len(tr.state_dict())
    assert report.adapted == ["patch_embedding.weight"] and report.ignored == []
    assert report.initialised == sorted(audio_before) and len(report.initialised) == 4 + 2 * 2
    assert all(torch.equal(model.state_dict()[k], v) for k, v in audio_before.items())
    patch = model.patch_embedding.weight
    assert torch.equal(patch[:, :16], tr.patch_embedding.weight) and not patch[:, 16:].any()
    torch.manual_seed(3)
    x, y, ctx = torch.randn(1, 16, 6, 8, 8), torch.randn(1, 17, 6, 8, 8), torch.randn(1, 5, 64)
    t = torch.tensor([700.0])
    with torch.no_grad():
        want = tr(hidden_states=x, timestep=t, encoder_hidden_states=ctx).sample
        assert (want - model(x, t, ctx, y)).abs().max() < 2e-5  # y and silent audio add nothing yet


# ---- LiveTalk's key hash ----
def test_key_hash_follows_livetalk_string_format() -> None:
    sd = {"b": torch.zeros(4), "a": torch.zeros(2, 3)}
    assert livetalk_key_hash(sd) == hashlib.md5(b"a,a:2_3,b,b:4").hexdigest()
    assert livetalk_key_hash(sd, with_shape=False) == hashlib.md5(b"a,b").hexdigest()


@pytest.mark.parametrize(
    ("preset", "expected", "count"),
    [
        ("wan-1.3b", "2bf9513c7a3e908015f11a800fc9b820", 857),
        ("wan-14b", "883a90b12576b9b8693a08cf690998dd", 1137),
    ],
)
def test_meta_model_matches_livetalk_merged_omniavatar_hash(preset: str, expected: str, count: int) -> None:
    cfg = load_config(preset)
    with torch.device("meta"):
        sd = WanDiT(cfg.model).state_dict()
    assert len(sd) == count
    assert livetalk_key_hash(sd) == expected
