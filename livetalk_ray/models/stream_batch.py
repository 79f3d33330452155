"""Cross-session batching of the cached forward: several streams, each with its own KV cache, prompt and
position, run one block together as one batch.

Streams may sit at different points (block index, window fill): windows shorter than the longest are
zero-padded at the end and masked out, and prompts of different kept lengths are zero-padded and masked by
their logit bias, so one batch serves any mix of sessions. A single stream reads its own cache, unpadded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from livetalk_ray.models.kv_cache import CacheView, KVCache


def stack_per_row(per_stream: list[torch.Tensor], rows: list[slice]) -> torch.Tensor:
    """Stack each stream's tensor [N, D] once per batch row it owns: [B, N, D]."""
    return torch.cat(
        [t[None].expand(owned.stop - owned.start, -1, -1) for t, owned in zip(per_stream, rows, strict=True)]
    )


@dataclass
class CachedWindow:
    """What the cached forward of a batch of streams hands every layer: each stream's cache and view, the
    batch rows it owns, and the padding mask of the window its queries read."""

    caches: list[KVCache]
    views: list[CacheView]
    rows: list[slice]
    window_tokens: int  # N: the longest window of earlier frames
    mask: torch.Tensor | None  # [B, 1, 1, N + S] True where a key exists; None when no row is padded

    def exchange(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this block's rotated keys and values [B, heads, S, head_dim] into each stream's slots;
        return the keys and values [B, heads, N + S, head_dim] the block attends to."""
        for cache, view, rows in zip(self.caches, self.views, self.rows, strict=True):
            k_cache, v_cache = cache.k[layer], cache.v[layer]
            end = view.write_start + k.shape[2]
            k_cache[:, :, view.write_start : end] = k[rows].detach().to(k_cache.dtype)
            v_cache[:, :, view.write_start : end] = v[rows].detach().to(v_cache.dtype)
        if len(self.caches) == 1 and not (k.requires_grad or v.requires_grad):
            # Nothing to differentiate: the filled prefix of the cache is the whole window, this block included
            # (attention does not care about key order), read as a slice without a copy.
            cache, n = self.caches[0], self.views[0].filled_tokens
            return cache.k[layer][:, :, :n].to(k.dtype), cache.v[layer][:, :, :n].to(v.dtype)
        pasts_k, pasts_v = [], []
        for cache, view in zip(self.caches, self.views, strict=True):
            pad = (0, 0, 0, self.window_tokens - len(view.read_tokens))
            pasts_k.append(F.pad(cache.k[layer][:, :, view.read_tokens], pad))
            pasts_v.append(F.pad(cache.v[layer][:, :, view.read_tokens], pad))
        # the block's own keys stay live (they carry the gradient of a training rollout)
        k = torch.cat([torch.cat(pasts_k).to(k.dtype), k], dim=2)
        return k, torch.cat([torch.cat(pasts_v).to(v.dtype), v], dim=2)


def batch_window(
    caches: list[KVCache], views: list[CacheView], rows: list[slice], q_ropes: list[torch.Tensor], query_tokens: int
) -> tuple[torch.Tensor, CachedWindow]:
    """The query rotations of the batch (one stream: its own [S, head_dim/2]; several: per row) and the window
    every layer reads, with a padding mask where the streams' windows differ in length."""
    n = max(len(view.read_tokens) for view in views)
    mask = None
    if len(caches) == 1:
        q_rope = q_ropes[0]
    else:  # per-row rotations; shorter windows are zero-padded at the end and masked out
        q_rope = stack_per_row(q_ropes, rows)
        if any(len(view.read_tokens) < n for view in views):
            keys = torch.arange(n + query_tokens, device=q_rope.device)
            valid = [((keys < len(view.read_tokens)) | (keys >= n))[:, None] for view in views]
            mask = stack_per_row(valid, rows)[:, :, 0][:, None, None]
    return q_rope, CachedWindow(caches, views, rows, n, mask)


def merge_text_kvs(caches: list[KVCache]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Per layer, the text K/V of every stream stacked in batch order (one stream: its own, no copy);
    prompts of different kept lengths are zero-padded and their padding masked out by the bias."""
    if len(caches) == 1:
        return caches[0].cross
    n = max(c.cross[0][0].shape[2] for c in caches)
    merged = []
    for layer in range(len(caches[0].cross)):
        ks, vs, biases = [], [], []
        for cache in caches:
            k, v, bias = cache.cross[layer]
            missing = n - k.shape[2]
            ks.append(F.pad(k, (0, 0, 0, missing)))
            vs.append(F.pad(v, (0, 0, 0, missing)))
            bias = k.new_zeros(k.shape[0], 1, 1, k.shape[2], dtype=torch.float32) if bias is None else bias
            biases.append(F.pad(bias, (0, missing), value=float("-inf")))
        merged.append((torch.cat(ks), torch.cat(vs), torch.cat(biases)))
    return merged
