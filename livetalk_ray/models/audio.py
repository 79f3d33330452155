"""wav2vec2 features per video frame (LiveTalk/OmniAvatar semantics): file loading, whole clip, streaming.

Video frame k sits at time k/fps; a clip of N frames spans (N-1)/fps s of audio (LiveTalk: 4F-3 frames,
(4F-4)/fps s). The ~50 Hz CNN features are resampled to the frame rate *before* the transformer.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

from livetalk_ray.audio_timeline import SampleBuffer, sample_at_frame
from livetalk_ray.config import AudioEncoderConfig
from livetalk_ray.media import AudioError, load_audio

__all__ = ["AudioEncoder", "AudioError", "StreamingAudioFeatures", "build_audio_encoder", "load_audio"]


def _tiny_wav2vec2_config(cfg: AudioEncoderConfig) -> Wav2Vec2Config:
    return Wav2Vec2Config(
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        conv_dim=(32,) * 7,  # small CNN, but the standard strides/kernels keep the ~50 Hz frame rate
        conv_stride=(5, 2, 2, 2, 2, 2, 2),
        conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        feat_extract_norm="group",  # wav2vec2-base-960h layout
        do_stable_layer_norm=False,
        mask_time_prob=0.0,  # no SpecAugment parameter: this model is only ever used frozen, in eval
    )


class AudioEncoder:
    """Frozen wav2vec2 giving `feature_dim` features per video frame."""

    def __init__(
        self,
        model: Wav2Vec2Model,
        feature_extractor: Wav2Vec2FeatureExtractor,
        cfg: AudioEncoderConfig,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.feature_extractor = feature_extractor
        self.sample_rate = int(feature_extractor.sampling_rate)
        # CNN geometry: receptive field (400 samples, also the shortest usable input) and hop (320 = 20 ms).
        self.receptive_field, self.hop = 1, 1
        for k, s in zip(model.config.conv_kernel, model.config.conv_stride, strict=True):
            self.receptive_field += (k - 1) * self.hop
            self.hop *= s

    @property
    def feature_dim(self) -> int:
        return self.model.config.hidden_size * (self.model.config.num_hidden_layers + 2)

    def normalize(self, wave: torch.Tensor | np.ndarray) -> torch.Tensor:
        """The feature extractor's zero-mean/unit-variance step, in fp32 torch on `device`."""
        x = torch.as_tensor(wave).to(self.device, torch.float32)
        if x.ndim != 1:
            raise AudioError(f"expected a 1-D mono waveform, got shape {tuple(x.shape)}")
        if x.numel() == 0:
            raise AudioError("empty waveform")
        if not torch.isfinite(x).all():
            raise AudioError("waveform contains NaN or inf")
        if self.feature_extractor.do_normalize:
            x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)
        return x

    @torch.no_grad()
    def encode(self, wave: torch.Tensor | np.ndarray, num_frames: int) -> torch.Tensor:
        """LiveTalk semantics: the whole wave is stretched onto num_frames → [num_frames, feature_dim]."""
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        x = self.normalize(wave)
        x = F.pad(x, (0, max(0, self.receptive_field - x.numel())))  # too short for the CNN: add silence
        feats = self._cnn(x)
        # Resample the ~50 Hz CNN features to the video frame count *before* the transformer.
        feats = F.interpolate(feats, size=num_frames, mode="linear", align_corners=True)
        return self._transformer(feats)

    @torch.no_grad()
    def encode_frames(
        self, wave: torch.Tensor | np.ndarray, fps: float, f0: int, f1: int, offset: int = 0
    ) -> torch.Tensor:
        """Time-exact encoding of the video frames [f0, f1) → [f1 - f0, feature_dim].

        Frame k sits at sample (k/fps + audio.frame_offset_s)*sr, `wave[0]` is sample `offset`, audio outside
        `wave` is silence.
        CNN frames lie on one absolute 20 ms grid and are linearly interpolated at the exact frame times
        (still to the window's frame count, before the transformer), so windows of a stream and a whole
        clip encoded this way differ only through context. `encode`'s align_corners mapping instead puts
        frames at clip-length-dependent sub-hop phases, which would swamp any block-vs-clip comparison.
        """
        if f1 <= f0:
            raise ValueError(f"bad frame range [{f0}, {f1})")
        times = self._frame_samples(torch.arange(f0, f1, dtype=torch.float64), fps) / self.hop
        p_lo, p_hi = math.floor(times[0].item()), math.ceil(times[-1].item())
        a, b = self.span_samples(p_lo, p_hi)
        lo, hi = min(max(a - offset, 0), len(wave)), min(max(b - offset, 0), len(wave))
        # Normalise with the window's real audio only, then pad silence (zeros after normalisation).
        if hi > lo:
            x = F.pad(self.normalize(wave[lo:hi]), (lo + offset - a, b - hi - offset))
        else:  # the window lies wholly outside the audio (e.g. a stream running on past its speech)
            x = torch.zeros(b - a, device=self.device)
        feats = self._cnn(x)  # [1, C, p_hi - p_lo + 1]
        pos = (times - p_lo).to(self.device)
        i0 = pos.floor().long().clamp(max=feats.shape[-1] - 1)
        i1 = (i0 + 1).clamp(max=feats.shape[-1] - 1)
        w = (pos - i0).float()
        return self._transformer(feats[..., i0] * (1 - w) + feats[..., i1] * w)

    @torch.no_grad()
    def encode_timed(self, wave: torch.Tensor | np.ndarray, fps: float, num_frames: int) -> torch.Tensor:
        """A whole clip in the time-exact convention of `encode_frames` (frames [0, num_frames))."""
        return self.encode_frames(wave, fps, 0, num_frames)

    def _frame_samples(self, frames: torch.Tensor, fps: float) -> torch.Tensor:
        return frames * (self.sample_rate / fps) + self.cfg.frame_offset_s * self.sample_rate

    def span_samples(self, p_lo: int, p_hi: int) -> tuple[int, int]:
        """Absolute samples [a, b) feeding CNN grid frames p_lo..p_hi (frame p centred on sample hop*p)."""
        half = self.receptive_field // 2
        return self.hop * p_lo - half, self.hop * p_hi - half + self.receptive_field

    def last_sample_needed(self, fps: float, frame: int) -> int:
        """Samples that must exist to encode `frame` with real audio (its time plus CNN margin)."""
        position = float(self._frame_samples(torch.tensor(float(frame), dtype=torch.float64), fps)) / self.hop
        return self.span_samples(0, math.ceil(position))[1]

    def _cnn(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.feature_extractor(x[None].to(self.dtype)).float()  # [1, C, T] at ~50 Hz

    def _transformer(self, feats: torch.Tensor) -> torch.Tensor:
        """[1, C, T] CNN features → [T, hidden*(layers+2)] = last_hidden_state ‖ all hidden states."""
        hidden, _ = self.model.feature_projection(feats.to(self.dtype).transpose(1, 2))
        # The encoder's own loop, unrolled so every hidden state is kept without hooks (thread-safe), in
        # the order HF reports them: embedding output, then each layer's output.
        enc = self.model.encoder
        hidden = hidden + enc.pos_conv_embed(hidden)
        stable = self.model.config.do_stable_layer_norm
        if not stable:
            hidden = enc.layer_norm(hidden)
        states = [hidden]
        for layer in enc.layers:
            hidden = layer(hidden, attention_mask=None)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            states.append(hidden)
        last = enc.layer_norm(hidden) if stable else hidden
        return torch.cat([last, *states], dim=-1)[0]


def build_audio_encoder(
    cfg: AudioEncoderConfig,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> AudioEncoder:
    """Tiny seeded random wav2vec2 when `cfg.path` is None, else weights + extractor from a local dir."""
    if cfg.path is None:
        with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
            torch.manual_seed(seed)
            model = Wav2Vec2Model(_tiny_wav2vec2_config(cfg))
        extractor = Wav2Vec2FeatureExtractor(
            feature_size=1, sampling_rate=cfg.sample_rate, padding_value=0.0, do_normalize=True
        )
    else:
        path = Path(cfg.path)
        if not path.is_dir():
            raise AudioError(f"audio.path is not a local directory: {path}")
        model = Wav2Vec2Model.from_pretrained(str(path), dtype=dtype)
        extractor = Wav2Vec2FeatureExtractor.from_pretrained(str(path))
        got = (model.config.hidden_size, model.config.num_hidden_layers)
        if got != (cfg.hidden_size, cfg.num_hidden_layers):
            raise AudioError(
                f"{path} has hidden_size/num_hidden_layers {got} but the config says "
                f"{(cfg.hidden_size, cfg.num_hidden_layers)}; fix audio.* so feature_dim matches"
            )
    if int(extractor.sampling_rate) != cfg.sample_rate:
        raise AudioError(f"feature extractor expects {extractor.sampling_rate} Hz, config {cfg.sample_rate}")
    return AudioEncoder(model, extractor, cfg, device=device, dtype=dtype)


class StreamingAudioFeatures:
    """Per-block features from a growing waveform, each block encoded in its own context window.

    Frames [f0, f1) are encoded (`AudioEncoder.encode_frames`) inside the window [f0 - L, f1 + A) of video
    frames, L/A being the left context and lookahead in frames, and only the block's frames are kept.
    - Start: the window is clipped at frame 0, so early blocks just have less left context.
    - Audio not pushed yet is silence, so `features` never fails and frames past the end of the audio
      get silence features. `ready`/`samples_needed` say when waiting would no longer change a block.
    - After `finish()` the lookahead stops at the last frame that has audio: silence past the end would
      only dilute the window (a whole-clip encoding has none either).
    """

    def __init__(
        self,
        encoder: AudioEncoder,
        fps: float,
        *,
        left_context_s: float | None = None,
        lookahead_s: float | None = None,
        latent_frames_per_block: int = 3,
        frames_per_latent: int = 4,
        wave: torch.Tensor | np.ndarray | None = None,
    ) -> None:
        cfg = encoder.cfg
        self.encoder = encoder
        self.fps = float(fps)
        self.left_frames = round((cfg.left_context_s if left_context_s is None else left_context_s) * fps)
        self.lookahead_frames = round((cfg.lookahead_s if lookahead_s is None else lookahead_s) * fps)
        self.latent_frames_per_block = latent_frames_per_block
        self.frames_per_latent = frames_per_latent
        self.heard = SampleBuffer()  # bounded by `forget_before`
        self._forgotten = 0  # frames before this can no longer be requested
        self.finished = False
        if wave is not None:  # a whole clip: push it and close the stream
            self.push(wave)
            self.finish()

    def push(self, samples: torch.Tensor | np.ndarray) -> None:
        """Append 16 kHz mono samples (any length, including 0)."""
        if self.finished:
            raise AudioError("push after finish()")
        x = torch.as_tensor(samples).detach().float().cpu().numpy().reshape(-1)
        if not np.isfinite(x).all():
            raise AudioError("pushed audio contains NaN or inf")
        self.heard.push(x)

    def finish(self) -> None:
        """No more audio will come."""
        self.finished = True

    @property
    def num_samples(self) -> int:
        return self.heard.pushed

    def sample_index(self, frame: int) -> int:
        """Absolute sample at the time of video frame `frame`."""
        return sample_at_frame(frame, self.encoder.sample_rate, self.fps)

    def samples_between(self, s0: int, s1: int) -> np.ndarray:
        """Pushed audio at absolute samples [s0, s1), zeros where none was pushed (e.g. for muxing)."""
        return self.heard.between(s0, s1)

    def window(self, f0: int, f1: int) -> tuple[int, int]:
        w0, w1 = max(0, f0 - self.left_frames), f1 + self.lookahead_frames
        if self.finished:  # lookahead stops at the last frame whose time lies inside the audio
            w1 = max(f1, min(w1, math.floor(self.heard.pushed * self.fps / self.encoder.sample_rate) + 1))
        return w0, w1

    def samples_needed(self, f0: int, f1: int) -> int:
        """Total samples pushed before frames [f0, f1) get their full lookahead."""
        return self.encoder.last_sample_needed(self.fps, f1 - 1 + self.lookahead_frames)

    def block_frames(self, k: int) -> tuple[int, int]:
        """Video frames of latent block k (latent 0 = frame 0; latent j>=1 = frames r*j-r+1 .. r*j)."""
        r, n = self.frames_per_latent, self.latent_frames_per_block
        return (0 if k == 0 else r * k * n - (r - 1)), r * (k + 1) * n - (r - 1)

    def samples_needed_for_block(self, k: int) -> int:
        return self.samples_needed(*self.block_frames(k))

    def ready(self, k: int) -> bool:
        return self.finished or self.heard.pushed >= self.samples_needed_for_block(k)

    def features(self, f0: int, f1: int) -> torch.Tensor:
        """[f1 - f0, feature_dim] for video frames [f0, f1); missing audio counts as silence."""
        if not 0 <= f0 < f1:
            raise ValueError(f"bad frame range [{f0}, {f1})")
        if f0 < self._forgotten:
            raise ValueError(f"audio for frame {f0} was dropped by forget_before({self._forgotten})")
        w0, w1 = self.window(f0, f1)
        out = self.encoder.encode_frames(self.heard.samples, self.fps, w0, w1, offset=self.heard.base)
        return out[f0 - w0 : f1 - w0]

    def block(self, k: int) -> torch.Tensor:
        return self.features(*self.block_frames(k))

    def forget_before(self, frame: int) -> None:
        """Drop audio that no window for frames >= `frame` needs (bounded memory on long streams)."""
        enc = self.encoder
        self._forgotten = max(self._forgotten, frame)
        w0 = self.window(frame, frame + 1)[0]
        keep_from = enc.span_samples(math.floor(w0 * enc.sample_rate / self.fps / enc.hop), 0)[0]
        self.heard.drop_before(keep_from)
