"""Wan VAE through diffusers' `AutoencoderKLWan`, with a per-stream decoder state.

The Wan decoder is causal in time and keeps a feature cache across latent frames, so a stream can decode
one latent block as soon as it exists and get exactly the frames a whole-clip decode would give: the
first latent frame yields 1 video frame, every later one 4. Latents are normalised per channel
((z - mean) / std), as the DiT sees them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import patchify, unpatchify

from livetalk_ray.config import VAEConfig
from livetalk_ray.models.image import tensor_to_uint8


class VAEError(ValueError):
    """A VAE path that cannot be loaded; the message names the path and why."""


def _build_from_config(cfg: VAEConfig, seed: int) -> AutoencoderKLWan:
    kwargs = {}
    if cfg.z_dim != 16:  # diffusers' defaults are Wan 2.1's 16 channels; an untrained VAE of another width
        kwargs.update(latents_mean=[0.0] * cfg.z_dim, latents_std=[1.0] * cfg.z_dim)  # starts unnormalised
    if cfg.latents_mean is not None:
        kwargs["latents_mean"] = cfg.latents_mean
    if cfg.latents_std is not None:
        kwargs["latents_std"] = cfg.latents_std
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKLWan(
            base_dim=cfg.base_dim,
            z_dim=cfg.z_dim,
            dim_mult=cfg.dim_mult,
            num_res_blocks=cfg.num_res_blocks,
            temperal_downsample=cfg.temperal_downsample,
            attn_scales=[],
            patch_size=cfg.patch_size,
            in_channels=3 * (cfg.patch_size or 1) ** 2,
            out_channels=3 * (cfg.patch_size or 1) ** 2,
            decoder_base_dim=cfg.decoder_base_dim,
            scale_factor_spatial=cfg.spatial_factor,
            scale_factor_temporal=cfg.temporal_factor,
            **kwargs,
        )


def _load_from_path(path: Path) -> AutoencoderKLWan:
    """A diffusers directory (or one with a `vae/` subfolder), or Wan's original `Wan2.1_VAE.pth`."""
    if not path.exists():
        raise VAEError(f"VAE path not found: {path}")
    if path.is_dir():
        sub = "vae" if (path / "vae" / "config.json").is_file() else None
        if sub is None and not (path / "config.json").is_file():
            raise VAEError(f"{path} is not a diffusers VAE directory (no config.json)")
        return AutoencoderKLWan.from_pretrained(path, subfolder=sub)
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad file for the user
        raise VAEError(f"cannot read VAE weights {path}: {exc}") from None
    vae = AutoencoderKLWan()  # diffusers' defaults are the Wan 2.1 VAE architecture
    missing, unexpected = vae.load_state_dict(convert_wan_vae_to_diffusers(state), strict=False)
    if missing or unexpected:
        raise VAEError(f"{path} is not a Wan 2.1 VAE: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return vae


class WanVAE:
    def __init__(self, cfg: VAEConfig, *, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
        self.model = (_load_from_path(Path(cfg.path)) if cfg.path else _build_from_config(cfg, seed)).eval()
        self.model.requires_grad_(False)
        self.model.to(device=device)
        if dtype != self.model.dtype:  # diffusers warns on any dtype cast, so cast only when needed
            self.model.to(dtype=dtype)
        self.device, self.dtype = torch.device(device), dtype
        shape = (1, -1, 1, 1, 1)
        self.mean = torch.tensor(self.model.config.latents_mean, device=device, dtype=torch.float32).view(shape)
        self.std = torch.tensor(self.model.config.latents_std, device=device, dtype=torch.float32).view(shape)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video [B, 3, 1+4k, H, W] in [-1, 1] → normalised latent mean [B, z, 1+k, H/8, W/8]."""
        if (video.shape[2] - 1) % 4:
            raise ValueError(f"video frame count {video.shape[2]} is not 4k+1")
        z = self.model.encode(video.to(self.device, self.dtype)).latent_dist.mode().float()
        return (z - self.mean) / self.std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Whole-clip decode: normalised latents [B, z, F, h, w] → video [B, 3, 1+4(F-1), H, W] in [-1, 1]."""
        z = (latents.float() * self.std + self.mean).to(self.dtype)
        return self.model.decode(z).sample.float()

    @torch.no_grad()
    def decode_frames(self, latents: torch.Tensor) -> np.ndarray:
        """Whole-clip decode to viewable frames: normalised latents [B, z, F, h, w] → [B, T, H, W, 3] uint8."""
        return np.stack([tensor_to_uint8(clip) for clip in self.decode(latents.to(self.device))])

    def stream(self) -> VAEDecodeStream:
        return VAEDecodeStream(self)


def temporal_factor(model: AutoencoderKLWan) -> int:
    """Video frames per latent frame after a stream's first (the model's own architecture says)."""
    return 2 ** sum(model.config.temperal_downsample)


def new_cache(model: AutoencoderKLWan, part: str) -> list:
    """An empty feature cache of the causal encoder or decoder: one slot per causal conv."""
    return [None] * model._cached_conv_counts[part]


def detach_cache(cache: list) -> list:
    """The same cache cut from the autograd graph (truncated backpropagation through a stream)."""
    return [c.detach() if torch.is_tensor(c) else c for c in cache]


def encode_chunk(model: AutoencoderKLWan, video: torch.Tensor, cache: list, frames_in: int) -> torch.Tensor:
    """Posterior moments [B, 2z, f, h, w] of the next frames of a stream, as diffusers' whole-clip encode
    makes them: the stream's first frame alone, then groups of 4 (`video` holds 1+4k frames at the start,
    4k later). Gradients flow; the caller owns `cache` (and detaches it between training steps)."""
    if model.config.patch_size is not None:
        video = patchify(video, patch_size=model.config.patch_size)
    starts = [0] if frames_in == 0 else []
    starts += range(1 if frames_in == 0 else 0, video.shape[2], 4)
    out = []
    for i, start in enumerate(starts):
        end = 1 if (frames_in == 0 and i == 0) else start + 4
        out.append(model.encoder(video[:, :, start:end], feat_cache=cache, feat_idx=[0]))
    return model.quant_conv(torch.cat(out, dim=2))


def decode_chunk(model: AutoencoderKLWan, z: torch.Tensor, cache: list, latents_in: int) -> torch.Tensor:
    """Frames [B, 3, T, H, W] (unclamped) of the next raw latent frames of a stream; T = 4f, or 4f-3 at the
    stream's start. Equal to diffusers' whole-clip decode of the same latents, frame for frame."""
    x = model.post_quant_conv(z)
    outs = [
        model.decoder(x[:, :, i : i + 1], feat_cache=cache, feat_idx=[0], first_chunk=latents_in + i == 0)
        for i in range(x.shape[2])
    ]
    out = torch.cat(outs, dim=2)
    if model.config.patch_size is not None:
        out = unpatchify(out, patch_size=model.config.patch_size)
    return out


class VAEDecodeStream:
    """Decoder state of one stream: feed latent blocks in order, get their video frames at once."""

    def __init__(self, vae: WanVAE) -> None:
        self.vae = vae
        self.feat_cache: list = new_cache(vae.model, "decoder")
        self.frames_in = 0

    @torch.no_grad()
    def decode_block(self, latents: torch.Tensor) -> torch.Tensor:
        """Latent frames [B, z, f, h, w] → video frames [B, 3, T, H, W] in [-1, 1] (T = 4f, or 4f-3 first)."""
        z = (latents.float() * self.vae.std + self.vae.mean).to(self.vae.dtype)
        out = decode_chunk(self.vae.model, z, self.feat_cache, self.frames_in)
        self.frames_in += latents.shape[2]
        return out.clamp(-1.0, 1.0).float()

    def snapshot(self) -> dict:
        """The decoder state (causal-conv caches, frames decoded), picklable; `restore` continues it exactly."""
        cache = [c.cpu() if torch.is_tensor(c) else c for c in self.feat_cache]
        return {"kind": "vae", "frames_in": self.frames_in, "cache": cache}

    def restore(self, snapshot: dict) -> VAEDecodeStream:
        if snapshot.get("kind") != "vae" or len(snapshot["cache"]) != len(self.feat_cache):
            raise ValueError("this decoder state was made by another decoder (vae.decoder and the VAE must match)")
        device = self.vae.device
        self.feat_cache = [c.to(device) if torch.is_tensor(c) else c for c in snapshot["cache"]]
        self.frames_in = snapshot["frames_in"]
        return self


def latent_statistics(cfg: VAEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's per-channel latent mean and std [1, z, 1, 1, 1], without loading its weights: the config's,
    else those in the diffusers directory's config.json, else diffusers' Wan 2.1 defaults (16 channels) or 0 / 1."""
    import inspect
    import json

    mean, std = cfg.latents_mean, cfg.latents_std
    path = Path(cfg.path) if cfg.path else None
    if path is not None and path.is_dir() and (mean is None or std is None):
        config_file = path / "vae" / "config.json" if (path / "vae" / "config.json").is_file() else path / "config.json"
        saved = json.loads(config_file.read_text())
        mean, std = mean or saved.get("latents_mean"), std or saved.get("latents_std")
    if mean is None or std is None:
        defaults = inspect.signature(AutoencoderKLWan.__init__).parameters
        z = cfg.z_dim if path is None else 16  # a .pth file is Wan 2.1's VAE
        mean = mean or (defaults["latents_mean"].default if z == 16 else [0.0] * z)
        std = std or (defaults["latents_std"].default if z == 16 else [1.0] * z)
    shape = (1, -1, 1, 1, 1)
    return torch.tensor(mean, dtype=torch.float32).view(shape), torch.tensor(std, dtype=torch.float32).view(shape)


def frame_decoder(cfg: VAEConfig, *, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """What `vae.decoder` selects to turn latents into frames: the Wan VAE, or the tiny decoder (from
    `vae.tiny.path`, else seeded random). Both decode whole clips (`decode`) and streams (`stream()`)."""
    if cfg.decoder == "full":
        return WanVAE(cfg, device=device, dtype=dtype, seed=seed)
    from livetalk_ray.models.tiny_decoder import TinyVAEDecoder, build_tiny_decoder

    return TinyVAEDecoder(build_tiny_decoder(cfg, seed), *latent_statistics(cfg), device=device, dtype=dtype)


def decode_many(streams: list, latents: list[torch.Tensor]) -> list[torch.Tensor]:
    """`decode_block` of several streams of one VAE in one batch (cross-session batching).

    Streams past their first latent frame have feature caches of one shape, so they are stacked along
    the batch, decoded together and split back; a stream still at its start decodes alone. Besides fewer,
    larger kernels this moves CPU batches onto oneDNN: PyTorch picks its slow native conv3d for small
    single-sample inputs, and a batch of 2 costs about what 1 does on the toy VAE."""
    from livetalk_ray.models.tiny_decoder import TinyDecodeStream, decode_many_tiny

    if streams and isinstance(streams[0], TinyDecodeStream):
        return decode_many_tiny(streams, latents)
    outputs: list[torch.Tensor | None] = [None] * len(streams)
    ready = [i for i, s in enumerate(streams) if s.frames_in > 0 and all(torch.is_tensor(c) for c in s.feat_cache)]
    groups: dict[tuple, list[int]] = {}
    for i in ready:  # same cache shapes and latent frames → one batch
        key = (tuple(latents[i].shape[1:]), tuple(tuple(c.shape[1:]) for c in streams[i].feat_cache))
        groups.setdefault(key, []).append(i)
    for members in groups.values():
        if len(members) == 1:
            continue
        merged = VAEDecodeStream(streams[members[0]].vae)
        merged.frames_in = streams[members[0]].frames_in
        merged.feat_cache = [torch.cat(parts) for parts in zip(*(streams[i].feat_cache for i in members), strict=True)]
        out = merged.decode_block(torch.cat([latents[i] for i in members]))
        sizes = [latents[i].shape[0] for i in members]
        for i, video, *caches in zip(
            members, out.split(sizes), *(c.split(sizes) for c in merged.feat_cache), strict=True
        ):
            outputs[i] = video
            streams[i].feat_cache = list(caches)
            streams[i].frames_in += latents[i].shape[2]
    for i, stream in enumerate(streams):
        if outputs[i] is None:
            outputs[i] = stream.decode_block(latents[i])
    return outputs
