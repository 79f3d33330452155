"""The streaming avatar pipeline: reference image + prompt + audio in, decoded video blocks out.

`AvatarPipeline` holds the frozen components (DiT, VAE, wav2vec2, umT5); `AvatarStream` is one session:
it primes the KV cache with the reference latent, then per block computes the audio window, runs the
StreamingSampler and decodes the block with its own VAE decoder state. `livetalk generate` and the
serving deployments are thin layers over these two classes.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from livetalk_ray.config import TOY_INIT_SEED, LiveTalkConfig
from livetalk_ray.diffusion.sampler import StreamingSampler
from livetalk_ray.models.audio import StreamingAudioFeatures
from livetalk_ray.models.checkpoint import load_checkpoint
from livetalk_ray.models.conditioning import build_conditioners
from livetalk_ray.models.dit import WanDiT
from livetalk_ray.models.image import tensor_to_uint8
from livetalk_ray.models.vae import frame_decoder


@dataclass
class LatentBlock:
    """The denoising half of a block (what a Denoiser replica hands to a VAE decoder)."""

    index: int
    first_frame: int
    num_frames: int  # video frames these latents decode to
    latents: torch.Tensor  # [1, C, fpb, h, w]
    audio: np.ndarray  # float32 16 kHz samples under exactly these frames
    timings: dict[str, float]  # seconds: audio, denoise, refill; batch: streams denoised together


@dataclass
class BlockOutput:
    index: int
    first_frame: int  # index of the block's first video frame in the stream
    frames: np.ndarray  # [T, H, W, 3] uint8
    audio: np.ndarray  # float32 16 kHz samples covering exactly these frames
    timings: dict[str, float]  # seconds: audio, denoise, refill, decode


class AvatarPipeline:
    def __init__(self, cfg: LiveTalkConfig, checkpoint: str | Path | None = None) -> None:
        self.cfg = cfg
        encoders = build_conditioners(cfg)
        self.vae, self.audio_encoder, self.text_encoder = encoders.vae, encoders.audio, encoders.text
        self.device, self.dtype = encoders.device, encoders.dtype
        if checkpoint is not None:
            self.dit, _ = load_checkpoint(checkpoint, device=self.device, dtype=self.dtype)
        else:  # no weights: a seeded random model of the preset (the toy default until weights ship)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(TOY_INIT_SEED)
                self.dit = WanDiT(cfg.model, frames_per_block=cfg.cache.frames_per_block)
            self.dit.to(self.device, self.dtype)
        self.dit.eval().requires_grad_(False)
        self.sampler = StreamingSampler(self.dit, cfg)

    @functools.cached_property
    def frame_decoder(self):
        """What turns latents into frames here (`vae.decoder`): the VAE already loaded, or the tiny decoder
        (made at the first decode: a Denoiser replica never decodes)."""
        if self.cfg.vae.decoder == "full":
            return self.vae
        return frame_decoder(self.cfg.vae, device=self.device, dtype=self.dtype, seed=TOY_INIT_SEED)

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        return self.text_encoder.encode([prompt])

    def open_stream(self, image: torch.Tensor, prompt: str, seed: int | None = None) -> AvatarStream:
        """Prime a session from a reference image [3, H, W] in [-1, 1] and a motion prompt."""
        return AvatarStream(self, image, prompt, self.cfg.runtime.seed if seed is None else seed)

    def restore_stream(self, snapshot: dict) -> AvatarStream:
        """A stream continued from `AvatarStream.snapshot()` (taken here or on another replica of the same model
        and config): its next blocks are the ones the original would have made."""
        return AvatarStream.restore(self, snapshot)


SNAPSHOT_FORMAT = 1


class AvatarStream:
    def __init__(self, pipe: AvatarPipeline, image: torch.Tensor, prompt: str, seed: int) -> None:
        ref_latent = pipe.vae.encode(image[None, :, None])  # [1, z, 1, h, w]
        self._setup(pipe, ref_latent, pipe.encode_prompt(prompt), seed)

    def _setup(self, pipe: AvatarPipeline, ref_latent: torch.Tensor, text: torch.Tensor, seed: int) -> None:
        self.pipe = pipe
        cfg = pipe.cfg
        self.ref_latent = ref_latent
        self.state = pipe.sampler.start(ref_latent, text, seed)
        self.audio = StreamingAudioFeatures(
            pipe.audio_encoder,
            cfg.video.fps,
            latent_frames_per_block=cfg.cache.frames_per_block,
            frames_per_latent=cfg.model.audio_frames_per_latent,
        )
        self.decoder = None  # the VAE's streaming state, made by the first next_block (a Denoiser never decodes)
        self.frames_out = 0

    # -- moving a stream between replicas
    def snapshot(self) -> dict:
        """Everything the stream carries between blocks (the KV cache with its sinks and frame positions, the text
        condition, the noise generator, the audio window, the frame count) as CPU tensors and plain values:
        picklable, so Ray's object store can carry it to another replica. Text cross-attention K/V are left out:
        they are recomputed from the text, identically."""
        st, cache, heard = self.state, self.state.cache, self.audio.heard
        return {
            "format": SNAPSHOT_FORMAT,
            "ref_latent": self.ref_latent.cpu(),
            "text": st.text.cpu(),
            "generator": st.generator.get_state(),
            "block_index": st.block_index,
            "kv": {
                "k": [x.cpu() for x in cache.k],
                "v": [x.cpu() for x in cache.v],
                "slot_frame": cache.slot_frame.clone(),
                "next_frame": cache.next_frame,
            },
            "audio": {
                "samples": heard.samples.copy(),
                "base": heard.base,
                "pushed": heard.pushed,
                "forgotten": self.audio._forgotten,
                "finished": self.audio.finished,
            },
            "frames_out": self.frames_out,
        }

    @classmethod
    def restore(cls, pipe: AvatarPipeline, snapshot: dict) -> AvatarStream:
        if snapshot.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"stream snapshot format {snapshot.get('format')!r}; this version reads {SNAPSHOT_FORMAT}")
        stream = cls.__new__(cls)
        device, dtype = pipe.device, pipe.dtype
        stream._setup(pipe, snapshot["ref_latent"].to(device, dtype), snapshot["text"], 0)
        st, cache, kv = stream.state, stream.state.cache, snapshot["kv"]
        if len(kv["k"]) != len(cache.k) or kv["k"][0].shape != cache.k[0].shape:
            raise ValueError(
                f"the snapshot's KV cache ({len(kv['k'])} layers of {tuple(kv['k'][0].shape)}) does not fit "
                f"this model's ({len(cache.k)} layers of {tuple(cache.k[0].shape)}): use the same preset and config"
            )
        cache.k = [x.to(device, cache.k[0].dtype) for x in kv["k"]]
        cache.v = [x.to(device, cache.v[0].dtype) for x in kv["v"]]
        cache.slot_frame, cache.next_frame = kv["slot_frame"].clone(), kv["next_frame"]
        st.generator.set_state(snapshot["generator"])
        st.block_index = snapshot["block_index"]
        audio, heard = snapshot["audio"], stream.audio.heard
        heard.samples, heard.base, heard.pushed = audio["samples"].copy(), audio["base"], audio["pushed"]
        stream.audio._forgotten, stream.audio.finished = audio["forgotten"], audio["finished"]
        stream.frames_out = snapshot["frames_out"]
        return stream

    # -- audio in
    def push_audio(self, samples: np.ndarray | torch.Tensor) -> None:
        self.audio.push(samples)

    def finish_audio(self) -> None:
        self.audio.finish()

    def set_prompt(self, prompt: str) -> None:
        self.pipe.sampler.set_prompt(self.state, self.pipe.encode_prompt(prompt))

    # -- video out
    def _block_audio(self, k: int) -> torch.Tensor:
        """Per-video-frame features of block k grouped per latent frame: [1, fpb, 4, D]."""
        feats = self.audio.block(k)
        r = self.pipe.cfg.model.audio_frames_per_latent
        if k == 0:  # latent frame 0 sees video frame 0 repeated, as the VAE's first frame does
            feats = torch.cat([feats[:1].expand(r - 1, -1), feats])
        return feats.view(1, -1, r, feats.shape[-1]).to(self.pipe.device, self.pipe.dtype)

    def next_latents(self) -> LatentBlock:
        """Denoise the next block. Audio not pushed yet counts as silence; `self.audio.ready(k)` says when more
        audio would no longer change block k."""
        return next_latents_many([self])[0]

    def _finish_block(self, latents: torch.Tensor, timings: dict[str, float]) -> LatentBlock:
        k = self.state.block_index - 1
        first, count = self.frames_out, self.pipe.cfg.block_video_frames(k)
        self.frames_out += count
        samples = self._audio_samples(first, self.frames_out)
        self.audio.forget_before(self.frames_out)  # bounded memory on endless streams
        return LatentBlock(k, first, count, latents, samples, {**timings, **self.state.timings})

    def next_block(self) -> BlockOutput:
        """Denoise and decode the next block in this process."""
        t0 = time.perf_counter()
        block = self.next_latents()
        t1 = time.perf_counter()
        if self.decoder is None:
            self.decoder = self.pipe.frame_decoder.stream()
        frames = tensor_to_uint8(self.decoder.decode_block(block.latents)[0])
        t2 = time.perf_counter()
        assert frames.shape[0] == block.num_frames, (frames.shape, block.num_frames)
        timings = {**block.timings, "decode": t2 - t1, "total": t2 - t0}
        return BlockOutput(block.index, block.first_frame, frames, block.audio, timings)

    def _audio_samples(self, f0: int, f1: int) -> np.ndarray:
        """The pushed audio under video frames [f0, f1) (silence past the end), for muxing."""
        return self.audio.samples_between(self.audio.sample_index(f0), self.audio.sample_index(f1))


def next_latents_many(streams: list[AvatarStream]) -> list[LatentBlock]:
    """Denoise the next block of several streams of one pipeline in one batch (cross-session batching);
    each stream's block is the one it would get alone, up to float reassociation."""
    pipe = streams[0].pipe
    if any(s.pipe is not pipe for s in streams):
        raise ValueError("streams of different pipelines cannot share a batch")
    t0 = time.perf_counter()
    audios = [s._block_audio(s.state.block_index) for s in streams] if pipe.cfg.model.use_audio else None
    audio_s = time.perf_counter() - t0
    latents = pipe.sampler.next_blocks([s.state for s in streams], audios)
    timings = {"audio": audio_s, "batch": float(len(streams))}
    return [s._finish_block(x, timings) for s, x in zip(streams, latents, strict=True)]
