"""Per-layer KV cache for block-causal streaming with Anchor-Heavy Identity Sinks.

The cache holds `window_frames` latent frames per layer. The first `sink_frames` (whole blocks, frame 0 =
the reference latent) are permanent identity anchors; the remaining slots form a ring of blocks that
always holds the most recent ones. Keys are stored *after* rotary embedding (as LiveTalk stores them), so
a cached forward reads them as they are: filled slots form a prefix of the cache, and a block that needs no
gradient attends to that prefix as one slice, its own keys included. RoPE angles are computed from positions,
never sliced from a fixed table, so a stream can run forever. Two position modes:

- `absolute` (LiveTalk as released): every frame keeps its absolute index, anchors stay at 0..8 while
  queries keep growing.
- `rebased`: cached frames are numbered 0..n-1 in time order, so anchors and queries stay at the distances
  the model saw in training however long the stream runs. Each eviction moves every remaining ring frame one
  block down in that order; the cached forward then turns their stored keys back by one block in time
  (`CacheView.ring_shift`), once per block rather than at every read.

While the window is not exceeded both modes give exactly the block-causal masked forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

PositionMode = Literal["absolute", "rebased"]


@dataclass(frozen=True)
class CacheView:
    """What one cached forward pass writes and reads (the same for every layer)."""

    write_start: int  # first token slot of the block being written
    read_tokens: torch.Tensor  # token slots of the earlier cached frames the block attends to
    query_positions: torch.Tensor  # RoPE time index of each query frame (its keys are stored rotated so)
    read_positions: torch.Tensor  # RoPE time index each earlier cached frame's stored key carries
    filled_tokens: int  # the filled prefix of the cache once this block is written: everything it attends to
    ring_shift: int  # frames every ring key must move back in time before this block reads (rebased eviction)
    ring_start: int  # first token slot of the ring


class KVCache:
    def __init__(
        self,
        *,
        num_layers: int,
        batch_size: int,
        num_heads: int,
        head_dim: int,
        tokens_per_frame: int,
        frames_per_block: int,
        window_frames: int,
        sink_frames: int,
        position_mode: PositionMode = "absolute",
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if window_frames % frames_per_block or sink_frames % frames_per_block:
            raise ValueError("window_frames and sink_frames must be multiples of frames_per_block")
        if window_frames < sink_frames + frames_per_block:
            raise ValueError("the window must hold the sinks plus at least one block")
        self.tokens_per_frame = tokens_per_frame
        self.frames_per_block = frames_per_block
        self.window_frames = window_frames
        self.sink_blocks = sink_frames // frames_per_block
        self.ring_blocks = (window_frames - sink_frames) // frames_per_block
        self.position_mode: PositionMode = position_mode
        shape = (batch_size, num_heads, window_frames * tokens_per_frame, head_dim)  # head-major, as attention reads
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        # Absolute latent-frame index held by each frame slot; -1 marks an empty slot.
        self.slot_frame = torch.full((window_frames,), -1, dtype=torch.long)
        self.next_frame = 0
        # Text cross-attention K/V per layer, computed once per prompt (see `reset_text`).
        self.cross: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None] = [None] * num_layers
        self.num_layers = num_layers

    # ---- bookkeeping shared by all layers of one forward pass ----
    def block_slot(self, block_index: int) -> int:
        """First frame slot of a block: sinks fill first, later blocks cycle through the ring."""
        if block_index < self.sink_blocks:
            return block_index * self.frames_per_block
        ring = (block_index - self.sink_blocks) % self.ring_blocks
        return (self.sink_blocks + ring) * self.frames_per_block

    def prepare(self, frame_start: int, num_frames: int) -> CacheView:
        """Claim the slots of the block at `frame_start` and say what its queries read.

        A block is written once per denoising step and once more by the clean-context refill; every
        rerun overwrites the same slots. A new block must follow the last one."""
        fpb = self.frames_per_block
        if frame_start % fpb or num_frames != fpb:
            raise ValueError(
                f"a cached forward takes one whole block of {fpb} frames at a block boundary; "
                f"got {num_frames} frames at frame {frame_start}"
            )
        if frame_start not in (self.next_frame - fpb, self.next_frame):
            raise ValueError(
                f"blocks must arrive in order: expected frame {self.next_frame} (or a rerun of "
                f"{self.next_frame - fpb}), got {frame_start}"
            )
        new_block = frame_start == self.next_frame
        self.next_frame = frame_start + fpb
        slot = self.block_slot(frame_start // fpb)
        evicts = new_block and bool(self.slot_frame[slot] >= 0)
        self.slot_frame[slot : slot + fpb] = torch.arange(frame_start, frame_start + fpb)
        # The block's own keys are used live (they carry gradient); the cache supplies the rest.
        others = ((self.slot_frame >= 0) & (self.slot_frame < frame_start)).nonzero().flatten()
        frames = self.slot_frame[others]
        if self.position_mode == "absolute":
            read_pos, query_pos = frames, torch.arange(frame_start, frame_start + fpb)
        else:  # renumber the window in time order; the block comes last
            read_pos = torch.argsort(torch.argsort(frames))
            query_pos = torch.arange(len(frames), len(frames) + fpb)
        tpf = self.tokens_per_frame
        read_tokens = (others[:, None] * tpf + torch.arange(tpf)[None, :]).flatten()
        filled = int((self.slot_frame >= 0).sum()) * tpf
        shift = fpb if evicts and self.position_mode == "rebased" else 0
        return CacheView(slot * tpf, read_tokens, query_pos, read_pos, filled, shift, self.sink_blocks * fpb * tpf)

    def reset_text(self) -> None:
        """Forget the text K/V so the next forward re-encodes a new prompt (e.g. a new motion prompt)."""
        self.cross = [None] * self.num_layers

    @property
    def num_cached_frames(self) -> int:
        return int((self.slot_frame >= 0).sum())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
