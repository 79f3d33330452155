"""Clip-level decode and curation, pure functions of one clip (no Ray): the pipeline maps them.

probe (container header) → decode (decord frames at the preset fps, audio at 16 kHz mono) →
curate (black / frozen / blur / silence / audio-visual offset) → reference frame and caption.
Every failure raises `Rejected(stage, reason, detail)`; the pipeline turns it into a quarantine row.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from livetalk_ray.config import LiveTalkConfig
from livetalk_ray.data.sources import ClipSource
from livetalk_ray.models.image import resize_cover_crop


class Rejected(Exception):
    def __init__(self, stage: str, reason: str, detail: str = "") -> None:
        super().__init__(f"{stage}/{reason}: {detail}")
        self.stage, self.reason, self.detail = stage, reason, detail


@dataclass
class CuratedClip:
    clip_id: str
    source: str
    frames: np.ndarray  # [T, H, W, 3] uint8 at the preset fps and resolution
    audio: np.ndarray  # [T * sr / fps] float32, 16 kHz mono, aligned with the frames
    ref_image: np.ndarray  # [H, W, 3] uint8
    ref_source: str  # "sidecar" | "sharpest_frame"
    caption: str  # normalised, motion-focused prompt
    raw_caption: str
    quality: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ probe
@dataclass
class VideoInfo:
    fps: float
    width: int
    height: int
    seconds: float
    has_audio: bool


def probe(path: str, cfg: LiveTalkConfig) -> VideoInfo:
    """Header facts via PyAV, checked before any frame is decoded (huge frames never are)."""
    import av

    p = Path(path)
    if not p.is_file() or p.stat().st_size == 0:
        raise Rejected("probe", "unreadable_video", "file is missing or empty")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise Rejected("probe", "no_video_stream", "the container has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else 0.0
            seconds = (
                float(stream.duration * stream.time_base)
                if stream.duration
                else (container.duration / 1e6 if container.duration else 0.0)
            )
            info = VideoInfo(
                fps, stream.codec_context.width, stream.codec_context.height, seconds, bool(container.streams.audio)
            )
    except Rejected:
        raise
    except Exception as exc:  # noqa: BLE001 - anything the demuxer raises means the file is unusable
        raise Rejected("probe", "unreadable_video", f"{type(exc).__name__}: {exc}") from None
    d = cfg.data
    if info.width * info.height > d.max_frame_pixels:
        raise Rejected("probe", "resolution_too_large", f"{info.width}x{info.height} > {d.max_frame_pixels} px")
    if min(info.width, info.height) < d.min_side:
        raise Rejected("probe", "resolution_too_small", f"{info.width}x{info.height}, min side {d.min_side}")
    if not d.min_fps <= info.fps <= d.max_fps:
        raise Rejected("probe", "fps_out_of_range", f"{info.fps:.2f} fps not in [{d.min_fps}, {d.max_fps}]")
    if not info.has_audio:
        raise Rejected("probe", "no_audio", "the container has no audio stream")
    need = d.num_frames / cfg.video.fps
    if info.seconds and info.seconds + 0.5 / info.fps < need:
        raise Rejected("probe", "too_short", f"{info.seconds:.2f} s < {need:.2f} s")
    if info.seconds > d.max_seconds:
        raise Rejected("probe", "too_long", f"{info.seconds:.0f} s > {d.max_seconds:.0f} s")
    return info


# ------------------------------------------------------------------------------------------ decode
def decode_frames(path: str, info: VideoInfo, cfg: LiveTalkConfig) -> np.ndarray:
    """The first `num_frames` frames at the preset fps (nearest source frame), resized: [T, H, W, 3]."""
    import decord

    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0))
        available = len(reader)
        times = np.arange(cfg.data.num_frames) / cfg.video.fps
        index = np.minimum(np.round(times * info.fps).astype(int), available - 1)
        if index[-1] > available - 1 or available < 1:
            raise Rejected("decode", "too_short", f"{available} frames decoded")
        raw = reader.get_batch(index.tolist()).asnumpy()  # [T, H, W, 3] uint8
    except Rejected:
        raise
    except Exception as exc:  # noqa: BLE001 - decoder failures on one file quarantine that file
        raise Rejected("decode", "decode_error", f"{type(exc).__name__}: {exc}") from None
    frames = torch.from_numpy(raw).permute(0, 3, 1, 2).float()
    frames = resize_cover_crop(frames, cfg.video.height, cfg.video.width)
    return frames.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def decode_audio(path: str, cfg: LiveTalkConfig) -> np.ndarray:
    """16 kHz mono samples under the clip's frames; decord first, PyAV (via load_audio) as fallback."""
    sr = cfg.audio.sample_rate
    want = round(cfg.data.num_frames * sr / cfg.video.fps)
    try:
        import decord

        wave = decord.AudioReader(path, ctx=decord.cpu(0), sample_rate=sr, mono=True).asnumpy()[0]
    except Exception:  # noqa: BLE001 - decord cannot read some codecs; PyAV can
        from livetalk_ray.media import AudioError, load_audio

        try:
            wave = load_audio(path, sr)
        except AudioError as exc:
            raise Rejected("decode", "unreadable_audio", str(exc)) from None
    wave = np.asarray(wave, np.float32)
    if len(wave) < want * 0.9:
        raise Rejected("decode", "too_short", f"audio has {len(wave) / sr:.2f} s, need {want / sr:.2f} s")
    return np.pad(wave[:want], (0, max(0, want - len(wave))))


# ------------------------------------------------------------------------------------------ curate
def luma(frames: np.ndarray) -> np.ndarray:
    return frames[..., 0] * 0.299 + frames[..., 1] * 0.587 + frames[..., 2] * 0.114


def laplacian_variance(gray: np.ndarray) -> float:
    """Sharpness of one [H, W] 0..255 image: variance of its 4-neighbour Laplacian."""
    lap = -4 * gray[1:-1, 1:-1] + gray[:-2, 1:-1] + gray[2:, 1:-1] + gray[1:-1, :-2] + gray[1:-1, 2:]
    return float(lap.var())


def frame_envelope(audio: np.ndarray, num_frames: int) -> np.ndarray:
    """RMS of the audio under each video frame."""
    return np.sqrt(np.square(audio[: len(audio) // num_frames * num_frames]).reshape(num_frames, -1).mean(1))


def _standardise(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / (x.std() + 1e-8)


def mouth_darkness(frames_luma: np.ndarray) -> np.ndarray:
    """Per frame, the share of clearly dark pixels in the lower-centre of the crop (the face is centred by
    the cover-crop): an open mouth shows its dark interior, a closed one hardly any. Unlike frame
    differences, this ignores head motion as long as the mouth stays inside the region."""
    t, h, w = frames_luma.shape
    region = frames_luma[:, h // 2 : h * 7 // 8, w // 4 : w * 3 // 4].reshape(t, -1)
    return (region < 0.6 * np.median(region, axis=1, keepdims=True)).mean(axis=1)


def av_offset(frames_luma: np.ndarray, audio: np.ndarray, max_lag: int = 8) -> tuple[int, float, float]:
    """(best lag in frames, its correlation, the correlation in sync) between mouth darkness and the
    speech envelope. Positive lag: the video lags the audio."""
    mouth = _standardise(mouth_darkness(frames_luma))
    speech = _standardise(frame_envelope(audio, len(frames_luma)))
    corr = {}
    for lag in range(-max_lag, max_lag + 1):
        a = mouth[max(lag, 0) : len(mouth) + min(lag, 0)]
        b = speech[max(-lag, 0) : len(speech) + min(-lag, 0)]
        corr[lag] = float(np.mean(_standardise(a) * _standardise(b))) if len(a) > 4 else -1.0
    best = max(corr, key=corr.get)
    return best, corr[best], corr[0]


def curate(frames: np.ndarray, audio: np.ndarray, cfg: LiveTalkConfig) -> dict[str, float]:
    d = cfg.data
    y = luma(frames.astype(np.float32))
    mean_luma = y.mean(axis=(1, 2)) / 255
    black = float((mean_luma < d.black_luma).mean())
    if black > d.black_max_fraction:
        raise Rejected("curate", "black_frames", f"{black:.0%} of frames are black")
    sharpness = [laplacian_variance(g) for g in y[:: max(1, len(y) // 8)]]
    if max(sharpness) < d.blur_min_laplacian_var:
        raise Rejected("curate", "blurry", f"Laplacian variance {max(sharpness):.1f} < {d.blur_min_laplacian_var}")
    change = np.abs(np.diff(y, axis=0)).mean(axis=(1, 2)) / 255
    frozen = float((change < d.frozen_diff).mean()) if len(change) else 1.0
    if frozen > d.frozen_max_fraction:
        raise Rejected("curate", "frozen_frames", f"{frozen:.0%} of frame changes are below {d.frozen_diff:.4f}")
    rms = float(np.sqrt(np.mean(np.square(audio))))
    dbfs = 20 * math.log10(rms + 1e-12)
    if dbfs < d.silence_dbfs:
        raise Rejected("curate", "silence", f"audio RMS {dbfs:.1f} dBFS < {d.silence_dbfs}")
    lag, corr, corr0 = av_offset(y, audio)
    # Only a clear shifted peak is evidence of an offset: motion unrelated to speech correlates by chance.
    if abs(lag) > d.max_av_offset_frames and corr >= d.av_min_correlation and corr - corr0 >= d.av_min_margin:
        raise Rejected(
            "curate",
            "av_offset",
            f"lower-face motion lags audio by {lag} frames (corr {corr:.2f} vs {corr0:.2f} in sync)",
        )
    return {
        "black_fraction": black,
        "frozen_fraction": frozen,
        "sharpness": max(sharpness),
        "audio_dbfs": dbfs,
        "av_lag_frames": float(lag),
        "av_correlation": corr,
        "av_correlation_lag0": corr0,
    }


# ------------------------------------------------------------------------------------------ captions
_URL = re.compile(r"https?://\S+|www\.\S+")
_TAGS = re.compile(r"[#@]\w+")
_NOISE = re.compile(r"\b(4k|hd|1080p|720p|uhd|subscribe|watermark|video of|a video of|footage of)\b", re.I)
_TALKING = re.compile(
    r"\b(talk|talks|talking|speak|speaks|speaking|say|says|saying|sing|sings|singing|"
    r"explain|explains|explaining|tell|tells|telling|chat|chats|chatting)\b",
    re.I,
)
MOTION_SUFFIX = "They talk to the camera with natural lip movements and subtle head motion."


def normalise_caption(text: str, max_words: int = 60) -> str:
    """Rules for a motion-focused prompt: strip links, tags and quality words, keep at most two sentences,
    and make sure the prompt says the person is talking."""
    text = _NOISE.sub("", _TAGS.sub("", _URL.sub("", text)))
    text = re.sub(r"\s+", " ", text).strip(" ,;:-")
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
    text = " ".join(sentences[:2])
    if text and text[-1] not in ".!?":
        text += "."
    if not _TALKING.search(text):
        text = f"{text} {MOTION_SUFFIX}".strip()
    words = text.split()
    return " ".join(words[:max_words])


@functools.cache
def _rewriter(import_path: str):
    module, _, name = import_path.partition(":")
    return getattr(importlib.import_module(module), name)


def read_caption(source: ClipSource) -> str | None:
    if source.caption:
        return source.caption
    if not source.caption_file:
        return None
    p = Path(source.caption_file)
    if not p.is_file():
        return None  # a manifest may name a caption file that is not there: the caption is missing
    try:
        if p.suffix == ".json":
            data = json.loads(p.read_text())
            return str(data.get("caption") or data.get("text") or "") or None if isinstance(data, dict) else None
        return p.read_text().strip() or None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Rejected("caption", "bad_caption", f"{p.name}: {exc}") from None


# ------------------------------------------------------------------------------------------ one clip
def prepare_clip(source: ClipSource, cfg: LiveTalkConfig) -> CuratedClip:
    """All CPU stages of one clip; raises Rejected with the first failing stage and reason."""
    if source.reject_reason:
        raise Rejected("discover", source.reject_reason, source.reject_detail)
    info = probe(source.video, cfg)
    raw_caption = read_caption(source)
    if raw_caption is None and cfg.data.require_caption:
        raise Rejected("caption", "missing_caption", "no caption in the manifest and no .json/.txt sidecar")
    frames = decode_frames(source.video, info, cfg)
    audio = decode_audio(source.video, cfg)
    quality = curate(frames, audio, cfg)
    if source.ref_image:
        from livetalk_ray.media import ImageError
        from livetalk_ray.models.image import load_reference_image

        try:
            ref = load_reference_image(source.ref_image, cfg.video.height, cfg.video.width)
        except ImageError as exc:
            raise Rejected("reference", "bad_reference_image", str(exc)) from None
        ref_image, ref_source = ((ref.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy(), "sidecar"
    else:  # the sharpest frame of the clip stands in for a curated portrait
        gray = luma(frames.astype(np.float32))
        ref_image, ref_source = frames[int(np.argmax([laplacian_variance(g) for g in gray]))], "sharpest_frame"
    caption = normalise_caption(raw_caption or "")
    if cfg.data.caption_rewriter:
        caption = _rewriter(cfg.data.caption_rewriter)(caption)
    return CuratedClip(
        source.clip_id, source.path, frames, audio, ref_image, ref_source, caption, raw_caption or "", quality
    )
