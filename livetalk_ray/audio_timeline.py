"""A stream's pushed speech on an absolute sample timeline (numpy only: the torch-free Ingress uses it too).

The Denoiser's audio features and the session that publishes each block's sound read the same samples at the
same times, so both keep one of these: samples pushed in order, older ones dropped once nothing needs them.
"""

from __future__ import annotations

import numpy as np


def sample_at_frame(frame: int, sample_rate: int, fps: float) -> int:
    """Absolute sample at the time of video frame `frame`."""
    return round(frame * sample_rate / fps)


class SampleBuffer:
    """Mono float32 samples pushed in order; `between` reads absolute ranges (silence where none was pushed)."""

    def __init__(self) -> None:
        self.samples = np.zeros(0, np.float32)  # bounded by `drop_before`, so appending by copy is cheap
        self.base = 0  # absolute index of samples[0]
        self.pushed = 0  # absolute end of the pushed audio

    def push(self, samples: np.ndarray) -> None:
        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        self.samples = np.concatenate([self.samples, x])
        self.pushed += len(x)

    def between(self, s0: int, s1: int) -> np.ndarray:
        """Samples [s0, s1), zeros past the pushed audio."""
        if s0 < self.base:
            raise ValueError(f"samples before {self.base} were dropped")
        out = np.zeros(max(0, s1 - s0), np.float32)
        got = self.samples[s0 - self.base : max(s0, s1) - self.base]
        out[: len(got)] = got
        return out

    def drop_before(self, sample: int) -> None:
        """Forget samples before absolute index `sample`."""
        drop = min(max(0, sample - self.base), len(self.samples))
        self.samples, self.base = self.samples[drop:], self.base + drop
