"""WanDiT: LiveTalk's audio-conditioned Wan diffusion transformer, bidirectional or block-causal.

One readable file: embeddings, attention, block, head, then the two forward paths — the masked
full-sequence forward (training, teacher, critic) and the cached block-by-block forward (streaming).
Parameter names are the original Wan layout of LiveTalk's released `model.safetensors`; the module holds
no persistent buffers, so `state_dict()` is exactly the released tensors.

Shapes: latents are [B, C, F, H, W] (Wan's order); `y` is the reference latent repeated over frames plus
a mask channel [B, C+1, F, H, W]; `context` is raw text-encoder output [B, L, text_dim]; `audio` is
wav2vec2 features grouped per latent frame [B, F, 4, audio_feature_dim] (see `group_audio_frames`).
The output is the flow prediction v = noise - x0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from livetalk_ray.config import DiTConfig
from livetalk_ray.models.kv_cache import CacheView, KVCache


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """Wan's timestep embedding: cos then sin, computed in float64 from the raw timestep in [0, 1000]."""
    half = dim // 2
    freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device).div(half))
    angles = torch.outer(t.flatten().to(torch.float64), freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Wan splits each head into time / height / width parts (128 → 44, 42, 42)."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each [S, head_dim/2] float32 on the model's device


def rope_table(head_dim: int, theta: float, t_pos: torch.Tensor, h: int, w: int, device) -> Rope:
    """Rotations for frames at time indices `t_pos` on an h x w grid, one row per token.

    Computed from positions (in float64, then cast) rather than sliced from a table, so positions are
    unbounded; built once per forward and shared by every layer."""
    dims = rope_axis_dims(head_dim)
    positions = (t_pos.to(torch.float64), torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64))
    per_axis = []
    for d, pos in zip(dims, positions, strict=True):
        inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        per_axis.append(torch.outer(pos, inv))
    f = len(t_pos)
    angles = torch.cat(
        [
            per_axis[0][:, None, None].expand(f, h, w, -1),
            per_axis[1][None, :, None].expand(f, h, w, -1),
            per_axis[2][None, None, :].expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(f * h * w, head_dim // 2)
    return torch.cos(angles).to(device, torch.float32), torch.sin(angles).to(device, torch.float32)


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate consecutive channel pairs of x [B, S, heads, head_dim] (Wan's complex-pair layout); the
    rotations are shared [S, head_dim/2] or per row [B, S, head_dim/2]."""
    cos, sin = (r[None, :, None] if r.dim() == 2 else r[:, :, None] for r in rope)
    pairs = x.float().unflatten(-1, (-1, 2))
    re, im = pairs[..., 0], pairs[..., 1]
    out = torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(-2)
    return out.to(x.dtype)


def block_causal_mask(num_frames: int, frames_per_block: int, tokens_per_frame: int, device) -> torch.Tensor:
    """Boolean [S, S] mask: a query sees every key of its own block and of all earlier blocks."""
    block = torch.arange(num_frames, device=device) // frames_per_block
    block = block.repeat_interleave(tokens_per_frame)
    return block[None, :] <= block[:, None]


def group_audio_frames(features: torch.Tensor, frames_per_latent: int = 4) -> torch.Tensor:
    """Per-video-frame features [B, T, D] (T = 4k+1) → per-latent-frame groups [B, k+1, 4, D].

    Frame 0 is repeated so latent frame 0 sees video frame 0 four times and latent frame j sees video
    frames 4j-3 … 4j, matching the Wan VAE's causal temporal grouping."""
    if (features.shape[1] - 1) % frames_per_latent:
        raise ValueError(f"audio frame count {features.shape[1]} is not {frames_per_latent}k+1")
    padded = torch.cat([features[:, :1].expand(-1, frames_per_latent - 1, -1), features], dim=1)
    return padded.unflatten(1, (-1, frames_per_latent))


def _rows(per_stream: list[tuple[torch.Tensor, ...]], item: int, rows: list[slice], length: int) -> torch.Tensor:
    """Stack item `item` [N_i, D] of each stream once per batch row it owns, zero-padded to `length` rows."""
    parts = []
    for tensors, owned in zip(per_stream, rows, strict=True):
        t = tensors[item]
        t = F.pad(t, (0, 0, 0, max(length - t.shape[0], 0)))
        parts.append(t[None].expand(owned.stop - owned.start, -1, -1))
    return torch.cat(parts)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


@dataclass
class CachedWindow:
    """What the cached forward of a batch of streams hands every layer: each stream's cache and view, the
    batch rows it owns, and the rotations and padding mask of the window its queries read.

    Streams may sit at different points (block index, window fill): windows shorter than the longest are
    zero-padded and masked, so one batch serves any mix of sessions."""

    caches: list[KVCache]
    views: list[CacheView]
    rows: list[slice]
    k_rope: Rope  # [B, N, head_dim/2]: N = the longest window
    mask: torch.Tensor | None  # [B, 1, 1, N + S] True where a key exists; None when no row is padded

    def exchange(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this block's un-rotated keys/values into each stream's slots; return the cached window
        [B, N, heads, head_dim] of every row."""
        pasts_k, pasts_v = [], []
        n = self.k_rope[0].shape[-2]  # the longest window, in tokens
        for cache, view, rows in zip(self.caches, self.views, self.rows, strict=True):
            k_cache, v_cache = cache.k[layer], cache.v[layer]
            end = view.write_start + k.shape[1]
            k_cache[:, view.write_start : end] = k[rows].detach().to(k_cache.dtype)
            v_cache[:, view.write_start : end] = v[rows].detach().to(v_cache.dtype)
            pad = (0, 0, 0, 0, 0, n - len(view.read_tokens))
            pasts_k.append(F.pad(k_cache[:, view.read_tokens], pad))
            pasts_v.append(F.pad(v_cache[:, view.read_tokens], pad))
        if len(pasts_k) == 1:
            return pasts_k[0].to(k.dtype), pasts_v[0].to(v.dtype)
        return torch.cat(pasts_k).to(k.dtype), torch.cat(pasts_v).to(v.dtype)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def forward(
        self,
        x: torch.Tensor,
        q_rope: Rope,
        mask: torch.Tensor | None = None,
        cache: tuple[CachedWindow, int] | None = None,
    ) -> torch.Tensor:
        heads = (self.num_heads, self.head_dim)
        q = self.norm_q(self.q(x)).unflatten(-1, heads)
        k = self.norm_k(self.k(x)).unflatten(-1, heads)
        v = self.v(x).unflatten(-1, heads)
        if cache is not None:
            # Un-rotated keys go into this block's slots; RoPE is applied at read time from positions.
            window, layer = cache
            past_k, past_v = window.exchange(layer, k, v)
            k = torch.cat([apply_rope(past_k, window.k_rope), apply_rope(k, q_rope)], dim=1)
            v = torch.cat([past_v, v], dim=1)
            mask = window.mask
        else:
            k = apply_rope(k, q_rope)
        q = apply_rope(q, q_rope)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return self.o(out.transpose(1, 2).flatten(2))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def text_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        heads = (self.num_heads, self.head_dim)
        return self.norm_k(self.k(context)).unflatten(-1, heads), self.v(context).unflatten(-1, heads)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, self.head_dim))
        k, v = kv
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o(out.transpose(1, 2).flatten(2))


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        dim = cfg.dim
        self.self_attn = SelfAttention(dim, cfg.num_heads, cfg.eps)
        self.cross_attn = CrossAttention(dim, cfg.num_heads, cfg.eps)
        self.norm1 = nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.norm3 = nn.LayerNorm(dim, eps=cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x, t_mod, text_kv, q_rope, mask=None, cache=None) -> torch.Tensor:
        # x [B, F, HW, dim]; t_mod [B, F, 6, dim]: each frame carries its own noise level.
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (self.modulation.unsqueeze(1) + t_mod).chunk(
            6, dim=2
        )
        h = self.norm1(x) * (1 + scale_msa) + shift_msa
        x = x + self.self_attn(h.flatten(1, 2), q_rope, mask, cache).view_as(x) * gate_msa
        x = x + self.cross_attn(self.norm3(x).flatten(1, 2), text_kv).view_as(x)
        h = self.norm2(x) * (1 + scale_mlp) + shift_mlp
        return x + self.ffn(h) * gate_mlp


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation.unsqueeze(1) + t_emb.unsqueeze(2)).chunk(2, dim=2)
        return self.head(self.norm(x) * (1 + scale) + shift)


class AudioPack(nn.Module):
    """Packs the 4 video frames of a latent frame into one vector (frame-major) → Linear → LayerNorm."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(cfg.audio_feature_dim * cfg.audio_frames_per_latent, cfg.audio_hidden_size)
        self.norm_out = nn.LayerNorm(cfg.audio_hidden_size)

    def forward(self, grouped: torch.Tensor) -> torch.Tensor:
        return self.norm_out(self.proj(grouped.flatten(2)))


class WanDiT(nn.Module):
    def __init__(self, cfg: DiTConfig, *, causal: bool = True, frames_per_block: int = 3) -> None:
        super().__init__()
        self.cfg, self.causal, self.frames_per_block = cfg, causal, frames_per_block
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        if cfg.use_audio:
            self.audio_proj = AudioPack(cfg)
            # Audio is added to the residual stream before blocks 2 … L/2.
            self.audio_cond_projs = nn.ModuleList(
                nn.Linear(cfg.audio_hidden_size, dim) for _ in range(cfg.num_layers // 2 - 1)
            )
        self.init_weights()

    def init_weights(self) -> None:
        """Wan's initialisation, covering every parameter so that a model materialised from the meta
        device with `to_empty` is fully defined (a no-op on the meta device itself)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            elif isinstance(m, (DiTBlock, Head)):
                nn.init.normal_(m.modulation, std=self.cfg.dim**-0.5)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        nn.init.zeros_(self.patch_embedding.bias)
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)

    @classmethod
    def materialize(cls, cfg: DiTConfig, *, device="cpu", dtype=torch.float32, **kwargs) -> WanDiT:
        """Build straight in `dtype` on `device` (a 14B model in bf16 never exists in fp32)."""
        with torch.device("meta"):
            model = cls(cfg, **kwargs).to(dtype)
        model.to_empty(device=device)
        model.init_weights()
        return model

    # ---- shared pieces of both forward paths ----
    def _embed(self, x, t, y, audio):
        """Patchify and embed; returns tokens [B, F, HW, dim], time modulation, audio per layer, grid."""
        B, _, nf, _, _ = x.shape
        tokens = self.patch_embedding(torch.cat([x, y.to(x.dtype)], dim=1))
        _, _, f, h, w = tokens.shape
        tokens = tokens.flatten(3).transpose(1, 2).transpose(2, 3)  # [B, F, HW, dim]
        t = t.expand(B, nf) if t.dim() == 2 else t[:, None].expand(B, nf)
        wdtype = self.time_embedding[0].weight.dtype
        t_emb = self.time_embedding(sinusoidal_embedding(self.cfg.freq_dim, t).to(wdtype)).unflatten(0, (B, nf))
        t_mod = self.time_projection(t_emb).unflatten(2, (6, self.cfg.dim))
        audio_per_layer = None
        if self.cfg.use_audio:
            if audio is None:  # the "no audio" branch of CFG: zero features, as OmniAvatar/LiveTalk
                audio = x.new_zeros(B, nf, self.cfg.audio_frames_per_latent, self.cfg.audio_feature_dim)
            packed = self.audio_proj(audio.to(wdtype))  # [B, F, hidden]
            audio_per_layer = [proj(packed)[:, :, None] for proj in self.audio_cond_projs]
        return tokens, t_emb, t_mod, audio_per_layer, (f, h, w)

    def _run_blocks(
        self, tokens, t_mod, text_kvs, audio_per_layer, q_rope, mask=None, window: CachedWindow | None = None
    ):
        for i, block in enumerate(self.blocks):
            if audio_per_layer is not None and 2 <= i <= len(self.blocks) // 2:
                tokens = tokens + audio_per_layer[i - 2]
            tokens = block(tokens, t_mod, text_kvs[i], q_rope, mask, None if window is None else (window, i))
        return tokens

    def _unpatchify(self, out: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        f, h, w = grid
        pt, ph, pw = self.cfg.patch_size
        out = out.reshape(out.shape[0], f, h, w, pt, ph, pw, self.cfg.out_dim)
        return out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(out.shape[0], self.cfg.out_dim, f * pt, h * ph, w * pw)

    def text_kvs(self, context: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        ctx = self.text_embedding(context.to(self.text_embedding[0].weight.dtype))
        return [block.cross_attn.text_kv(ctx) for block in self.blocks]

    # ---- forward paths ----
    def forward(self, x, t, context, y, audio=None, frame_start: int = 0) -> torch.Tensor:
        """Full-sequence forward: block-causal mask if `self.causal`, otherwise bidirectional.

        `t` is [B] or per frame [B, F]; `frame_start` offsets the RoPE time index of the first frame."""
        tokens, t_emb, t_mod, audio_per_layer, grid = self._embed(x, t, y, audio)
        f, h, w = grid
        frames = torch.arange(frame_start, frame_start + f)
        rope = rope_table(self.cfg.dim // self.cfg.num_heads, self.cfg.rope_theta, frames, h, w, x.device)
        mask = block_causal_mask(f, self.frames_per_block, h * w, x.device) if self.causal else None
        tokens = self._run_blocks(tokens, t_mod, self.text_kvs(context), audio_per_layer, rope, mask)
        return self._unpatchify(self.head(tokens, t_emb), grid)

    def forward_cached(self, x, t, context, y, cache: KVCache, frame_start: int, audio=None) -> torch.Tensor:
        """One block through the KV cache: its keys/values are written, then it attends to the window.

        Text K/V are computed on the first call and reused until `cache.reset_text()`."""
        return self.forward_cached_many(x, t, [context], y, [cache], [frame_start], audio)

    def forward_cached_many(
        self, x, t, contexts: list, y, caches: list[KVCache], frame_starts: list[int], audio=None
    ) -> torch.Tensor:
        """One block of several streams in one batch (cross-session batching): stream i owns the next
        `caches[i]`-batch rows of x, its own prompt `contexts[i]` and its block at `frame_starts[i]`.

        The same as `forward_cached` per stream, up to float reassociation in the batched kernels."""
        if not self.causal:
            raise ValueError("the cached forward needs a block-causal model (causal=True)")
        tokens, t_emb, t_mod, audio_per_layer, grid = self._embed(x, t, y, audio)
        f, h, w = grid
        head_dim = self.cfg.dim // self.cfg.num_heads
        rows, views, q_ropes, k_ropes, start = [], [], [], [], 0
        for context, cache, frame_start in zip(contexts, caches, frame_starts, strict=True):
            if cache.cross[0] is None:
                cache.cross = self.text_kvs(context)
            view = cache.prepare(frame_start, f)
            views.append(replace(view, read_tokens=view.read_tokens.to(x.device)))
            b = cache.k[0].shape[0]
            rows.append(slice(start, start + b))
            start += b
            q_ropes.append(rope_table(head_dim, self.cfg.rope_theta, view.query_positions, h, w, x.device))
            k_ropes.append(rope_table(head_dim, self.cfg.rope_theta, view.read_positions, h, w, x.device))
        if start != x.shape[0]:
            raise ValueError(f"the caches hold {start} rows but the batch has {x.shape[0]}")
        text_kvs, mask = self._merge_text(caches), None
        if len(caches) == 1:
            q_rope, k_rope = q_ropes[0], k_ropes[0]
        else:  # per-row rotations; shorter windows are zero-padded at the end and masked out
            n = max(len(r[0]) for r in k_ropes)
            q_rope = (_rows(q_ropes, 0, rows, 0), _rows(q_ropes, 1, rows, 0))
            k_rope = (_rows(k_ropes, 0, rows, n), _rows(k_ropes, 1, rows, n))
            if any(len(r[0]) < n for r in k_ropes):
                keys = torch.arange(n + f * h * w, device=x.device)
                valid = [((keys < len(r[0])) | (keys >= n))[:, None] for r in k_ropes]
                mask = _rows([(v,) for v in valid], 0, rows, 0)[:, :, 0][:, None, None]
        window = CachedWindow(caches, views, rows, k_rope, mask)
        tokens = self._run_blocks(tokens, t_mod, text_kvs, audio_per_layer, q_rope, None, window)
        return self._unpatchify(self.head(tokens, t_emb), grid)

    @staticmethod
    def _merge_text(caches: list[KVCache]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the text K/V of every stream stacked in batch order (one stream: its own, no copy)."""
        if len(caches) == 1:
            return caches[0].cross
        return [
            (torch.cat([c.cross[i][0] for c in caches]), torch.cat([c.cross[i][1] for c in caches]))
            for i in range(len(caches[0].cross))
        ]

    def new_cache(
        self,
        batch_size: int,
        tokens_per_frame: int,
        window_frames: int,
        sink_frames: int,
        position_mode="absolute",
        device=None,
        dtype=None,
    ) -> KVCache:
        p = next(self.parameters())
        return KVCache(
            num_layers=self.cfg.num_layers,
            batch_size=batch_size,
            num_heads=self.cfg.num_heads,
            head_dim=self.cfg.dim // self.cfg.num_heads,
            tokens_per_frame=tokens_per_frame,
            frames_per_block=self.frames_per_block,
            window_frames=window_frames,
            sink_frames=sink_frames,
            position_mode=position_mode,
            device=device or p.device,
            dtype=dtype or p.dtype,
        )
