"""A tiny causal decoder from Wan latents to frames (TAEHV's decoder architecture), streamed block by block.

The full Wan decoder is most of a served block's compute (bench/sampler.py). TAEHV (madebyollin/taehv) decodes
the same latents with 2D convolutions only: each `MemBlock` sees its input at this latent/frame step and at the
step before (its only memory across time), `TGrow` turns one time step into `stride` (4x in all for Wan), and
`Upsample` doubles the size three times (8x). This module keeps TAEHV's layer order, so a published TAEHV file
(`taew2_1.safetensors` for Wan 2.1 latents) loads key for key, and adds what serving needs:

- streaming: a stream keeps the last input of every MemBlock; decoding a block with that memory equals decoding
  the whole clip at once (the first block drops the `4 - 1` frames before frame 0, as TAEHV and Wan do);
- batching: streams past their start decode together along the batch (memories stacked), as `decode_many` does
  for the full decoder;
- our conventions: normalised latents in (the DiT's), video [B, 3, T, H, W] in [-1, 1] out.

TAEHV decodes raw Wan latents (the VAE's `latents_mean`/`latents_std` undone) to [0, 1] frames.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from livetalk_ray.config import VAEConfig
from livetalk_ray.models.image import tensor_to_uint8

TAEHV_WIDTHS = (256, 128, 64, 64)  # taew2_1's decoder widths (the importer reads them from the file)


class TinyDecoderError(ValueError):
    """A tiny-decoder file that cannot be used; the message names the file and what is wrong."""


def _conv(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp of the raw latents to about ±3."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """A residual block over this time step's features concatenated with the previous step's."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv(n_in * 2, n_out),
            nn.ReLU(inplace=True),
            _conv(n_out, n_out),
            nn.ReLU(inplace=True),
            _conv(n_out, n_out),
        )
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(torch.cat([x, past], 1)) + self.skip(x))


class TGrow(nn.Module):
    """One time step → `stride` consecutive ones (a 1x1 conv to stride × channels, split in time)."""

    def __init__(self, n_f: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f, n_f * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, c, h, w = x.shape
        return self.conv(x).reshape(-1, c, h, w)


class TinyDecoder(nn.Module):
    """TAEHV's decoder: raw latents [N, T, C, h, w] → frames [N, T·4, 3, 8h, 8w] in [0, 1] before the trim."""

    def __init__(
        self,
        latent_channels: int = 16,
        widths: tuple[int, ...] = TAEHV_WIDTHS,
        time_upscale: tuple[bool, ...] = (False, True, True),
        image_channels: int = 3,
    ) -> None:
        super().__init__()
        n = list(widths)
        layers: list[nn.Module] = [Clamp(), _conv(latent_channels, n[0]), nn.ReLU(inplace=True)]
        for stage in range(3):
            layers += [MemBlock(n[stage], n[stage]) for _ in range(3)]
            layers += [nn.Upsample(scale_factor=2), TGrow(n[stage], 2 if time_upscale[stage] else 1)]
            layers += [_conv(n[stage], n[stage + 1], bias=False)]
        layers += [nn.ReLU(inplace=True), _conv(n[3], image_channels)]
        self.decoder = nn.Sequential(*layers)
        self.latent_channels, self.widths, self.time_upscale = latent_channels, tuple(n), tuple(time_upscale)
        self.temporal_factor = 2 ** sum(time_upscale)

    def forward(self, latents: torch.Tensor, memory: list[torch.Tensor] | None = None):
        """Decode raw latents [N, T, C, h, w] after `memory` (per MemBlock: its input at the step before, [N, 1,
        C, H, W]); returns untrimmed frames [N, T', 3, H, W] in [0, 1] and the memory after them."""
        n, t = latents.shape[:2]
        x = latents.flatten(0, 1)
        after: list[torch.Tensor] = []
        for layer in self.decoder:
            if isinstance(layer, MemBlock):
                steps = x.view(n, t, *x.shape[1:])
                before = memory[len(after)] if memory is not None else torch.zeros_like(steps[:, :1])
                past = torch.cat([before, steps[:, :-1]], 1).flatten(0, 1)
                after.append(steps[:, -1:].clone())  # only the last step: not the whole block
                x = layer(x, past)
            elif isinstance(layer, TGrow):
                x, t = layer(x), t * layer.stride
            else:
                x = layer(x)
        return x.view(n, t, *x.shape[1:]).clamp(0, 1), after


def _taehv_widths(state: dict[str, torch.Tensor]) -> dict:
    """Latent channels and widths of a TAEHV decoder, read from its weights' shapes. Time upscaling is not
    readable there (older files keep stride-wide TGrow convs where a stage does not upscale): it is given."""
    first = state["decoder.1.weight"]  # conv(latent_channels → widths[0])
    widths = [first.shape[0], *(state[f"decoder.{i}.weight"].shape[0] for i in (8, 14, 20))]
    return {"latent_channels": first.shape[1], "widths": tuple(widths)}


def load_taehv(path: str | Path, time_upscale: tuple[bool, ...] = (False, True, True)) -> tuple[TinyDecoder, list[str]]:
    """A TinyDecoder from a TAEHV-format file (.safetensors or .pth; encoder weights are ignored), with a report:
    one line per decoder tensor ("decoder.1.weight 256x16x3x3") and one for what was left out. `time_upscale`
    per stage: TAEHV's for Wan 2.1 latents (4x in all) by default."""
    path = Path(path)
    if not path.is_file():
        raise TinyDecoderError(f"tiny decoder file not found: {path} (e.g. taew2_1.safetensors from madebyollin/taehv)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad file for the user
        raise TinyDecoderError(f"cannot read {path}: {exc}") from None
    decoder_state = {k: v for k, v in state.items() if k.startswith("decoder.")}
    try:
        model = TinyDecoder(**_taehv_widths(decoder_state), time_upscale=time_upscale)
    except KeyError as exc:
        raise TinyDecoderError(f"{path} is not a TAEHV decoder: it has no {exc.args[0]}") from None
    own = model.state_dict()
    for key, tensor in list(decoder_state.items()):
        # Older TAEHV files keep stride-wide TGrow convs where no time upscaling happens: the last step's rows.
        if key in own and tensor.shape[0] > own[key].shape[0] and key.endswith(".conv.weight"):
            decoder_state[key] = tensor[-own[key].shape[0] :]
    missing = sorted(set(own) - set(decoder_state))
    unexpected = sorted(set(decoder_state) - set(own))
    wrong = [k for k in own if k in decoder_state and decoder_state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise TinyDecoderError(
            f"{path} does not fit a TAEHV decoder of widths {model.widths}: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, other shapes {wrong[:3]}"
        )
    model.load_state_dict(decoder_state)
    report = [f"{k} {'x'.join(map(str, v.shape))}" for k, v in decoder_state.items()]
    ignored = len(state) - len(decoder_state)
    report.append(f"ignored: {ignored} tensors outside the decoder (the TAEHV encoder)" if ignored else "ignored: none")
    return model.eval().requires_grad_(False), report


def build_tiny_decoder(cfg: VAEConfig, seed: int = 0) -> TinyDecoder:
    """`vae.tiny.path`'s decoder, or (no path) a seeded random one of `vae.tiny`'s widths."""
    if cfg.tiny.path:
        return load_taehv(cfg.tiny.path, tuple(cfg.tiny.time_upscale))[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyDecoder(cfg.z_dim, tuple(cfg.tiny.widths), tuple(cfg.tiny.time_upscale)).eval()


def save_taehv(model: TinyDecoder, path: str | Path) -> None:
    """Write the decoder in TAEHV's layout (readable by TAEHV's own code and by `load_taehv`)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


class TinyVAEDecoder:
    """The tiny decoder in our conventions: normalised latents [B, z, F, h, w] → video [B, 3, T, H, W] in [-1, 1]
    with T = 1 + 4(F - 1), like `WanVAE.decode`. `mean`/`std` are the full VAE's latent statistics."""

    def __init__(self, model: TinyDecoder, mean: torch.Tensor, std: torch.Tensor, device="cpu", dtype=torch.float32):
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.device, self.dtype = torch.device(device), dtype
        self.mean, self.std = mean.to(self.device, torch.float32), std.to(self.device, torch.float32)

    def raw(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised [B, z, F, h, w] → raw latents as TAEHV takes them, [B, F, z, h, w]."""
        z = latents.to(self.device, torch.float32) * self.std + self.mean
        return z.to(self.dtype).transpose(1, 2)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        frames, _ = self.model(self.raw(latents))
        return _to_video(frames[:, self.model.temporal_factor - 1 :])

    def decode_frames(self, latents: torch.Tensor) -> np.ndarray:
        """Whole-clip decode to viewable frames [B, T, H, W, 3] uint8 (as `WanVAE.decode_frames`)."""
        return np.stack([tensor_to_uint8(clip) for clip in self.decode(latents)])

    def stream(self) -> TinyDecodeStream:
        return TinyDecodeStream(self)


def _to_video(frames: torch.Tensor) -> torch.Tensor:
    """[B, T, 3, H, W] in [0, 1] → [B, 3, T, H, W] in [-1, 1], fp32."""
    return (frames.float() * 2 - 1).transpose(1, 2).contiguous()


class TinyDecodeStream:
    """One stream's decoder memory: feed latent blocks in order, get their frames at once (the same interface
    and frames as `VAEDecodeStream`, up to the tiny decoder's quality)."""

    def __init__(self, decoder: TinyVAEDecoder) -> None:
        self.decoder = decoder
        self.memory: list[torch.Tensor] | None = None
        self.frames_in = 0

    def decode_block(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_many_tiny([self], [latents])[0]

    def snapshot(self) -> dict:
        """The decoder memory and frames decoded, picklable; `restore` continues it exactly."""
        memory = None if self.memory is None else [m.cpu() for m in self.memory]
        return {"kind": "tiny", "frames_in": self.frames_in, "memory": memory}

    def restore(self, snapshot: dict) -> TinyDecodeStream:
        if snapshot.get("kind") != "tiny":
            raise ValueError("this decoder state was made by another decoder (vae.decoder must match)")
        memory = snapshot["memory"]
        self.memory = None if memory is None else [m.to(self.decoder.device) for m in memory]
        self.frames_in = snapshot["frames_in"]
        return self


def decode_many_tiny(streams: list[TinyDecodeStream], latents: list[torch.Tensor]) -> list[torch.Tensor]:
    """`decode_block` of several streams in one batch: streams at the same stage (starting or not, with memory or
    without: a stream without memory sees zeros as the step before) with latents of one shape decode together,
    memories stacked along the batch."""
    outputs: list[torch.Tensor | None] = [None] * len(streams)
    groups: dict[tuple, list[int]] = {}
    for i, stream in enumerate(streams):
        key = (stream.frames_in == 0, stream.memory is not None, tuple(latents[i].shape[1:]))
        groups.setdefault(key, []).append(i)
    for (starting, remembers, _), members in groups.items():
        decoder = streams[members[0]].decoder
        memory = None
        if remembers:
            memory = [torch.cat(parts) for parts in zip(*(streams[i].memory for i in members), strict=True)]
        with torch.no_grad():
            frames, after = decoder.model(decoder.raw(torch.cat([latents[i] for i in members])), memory)
        trim = decoder.model.temporal_factor - 1 if starting else 0
        sizes = [latents[i].shape[0] for i in members]
        for i, video, *memories in zip(members, frames.split(sizes), *(m.split(sizes) for m in after), strict=True):
            outputs[i] = _to_video(video[:, trim:])
            streams[i].memory = list(memories)
            streams[i].frames_in += latents[i].shape[2]
    return outputs
