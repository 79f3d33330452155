"""WanDiT: LiveTalk's audio-conditioned Wan diffusion transformer, bidirectional or block-causal.

One readable file: embeddings, attention, block, head, then the two forward paths — the masked
full-sequence forward (training, teacher, critic) and the cached block-by-block forward (streaming); how
several streams' caches share one batch lives beside the KV cache, in `stream_batch`.
Parameter names are the original Wan layout of LiveTalk's released `model.safetensors`; the module holds
no persistent buffers, so `state_dict()` is exactly the released tensors.

Shapes: latents are [B, C, F, H, W] (Wan's order); `y` is the reference latent repeated over frames plus
a mask channel [B, C+1, F, H, W]; `context` is raw text-encoder output [B, L, text_dim]; `audio` is
wav2vec2 features grouped per latent frame [B, F, 4, audio_feature_dim] (see `group_audio_frames`).
The output is the flow prediction v = noise - x0.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from livetalk_ray.config import DiTConfig
from livetalk_ray.models.kv_cache import CacheView, KVCache
from livetalk_ray.models.stream_batch import CachedWindow, batch_window, merge_text_kvs


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """Wan's timestep embedding: cos then sin, computed in float64 from the raw timestep in [0, 1000] and
    returned in the timestep's own precision (a bf16 timestep gives a bf16-rounded embedding, as in
    LiveTalk's released inference)."""
    half = dim // 2
    freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device).div(half))
    angles = torch.outer(t.flatten().to(torch.float64), freqs)
    out = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    return out.to(t.dtype if t.is_floating_point() else torch.float32)


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Wan splits each head into time / height / width parts (128 → 44, 42, 42)."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


Rope = torch.Tensor  # unit complex64 rotations [S, head_dim/2] (or per row [B, S, head_dim/2]) on the model's device


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
    return _unit_rotations(angles, device)


def _unit_rotations(angles: torch.Tensor, device) -> Rope:
    """cos + i·sin of float64 angles, each part rounded to float32."""
    return torch.complex(torch.cos(angles).float(), torch.sin(angles).float()).to(device)


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate consecutive channel pairs of head-major x [B, heads, S, head_dim] (Wan's complex-pair layout) by
    one complex multiplication in float32; the rotations are shared [S, head_dim/2] or per row [B, S, head_dim/2].
    The result is contiguous, as attention reads it best."""
    rotations = rope[None, None] if rope.dim() == 2 else rope[:, None]
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * rotations).flatten(-2).to(x.dtype)


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


TextKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # keys, values [B, heads, L, hd]; logit bias


def drop_text_padding(context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text rows past each prompt's end are zeros (Wan pads umT5 output so), hence identical keys and values:
    keep one of them per prompt and weight it by how many it stands for, a logit bias of log(count).
    Attention over the kept rows equals attention over all of them (exactly, up to float rounding) at a
    fraction of the cost. Returns the kept context [B, L', D] and the bias [B, 1, 1, L'] (None: nothing to drop)."""
    b, length, _ = context.shape
    if context.is_meta:  # shapes only (FLOP counts, `model info`): no values to find padding in
        return context, None
    positions = torch.arange(length, device=context.device)
    real = context.detach().abs().amax(dim=-1) > 0
    lengths = torch.where(real, positions + 1, 0).amax(dim=-1)  # [B]: rows up to the last non-zero one
    keep = int(lengths.max()) + 1
    if keep >= length:
        return context, None
    ratio = (length - lengths).double() / (keep - lengths).double()  # padded rows each kept row stands for
    pad = positions[None, :keep] >= lengths[:, None]
    bias = torch.where(pad, ratio.log()[:, None], 0.0).to(torch.float32)
    return context[:, :keep], bias[:, None, None, :]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def time_shift_rope(head_dim: int, theta: float, frames: int, device) -> Rope:
    """The rotation that moves a rotated key `frames` latent frames in time (height and width unchanged)."""
    t_dim = rope_axis_dims(head_dim)[0]
    inv = 1.0 / theta ** (torch.arange(0, t_dim, 2, dtype=torch.float64) / t_dim)
    angles = torch.cat([frames * inv, torch.zeros(head_dim // 2 - t_dim // 2, dtype=torch.float64)])[None]
    return _unit_rotations(angles, device)


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
        heads = (self.num_heads, self.head_dim)  # attention runs head-major: [B, heads, S, head_dim]
        q = apply_rope(self.norm_q(self.q(x)).unflatten(-1, heads).transpose(1, 2), q_rope)
        k = apply_rope(self.norm_k(self.k(x)).unflatten(-1, heads).transpose(1, 2), q_rope)
        v = self.v(x).unflatten(-1, heads).transpose(1, 2)
        if cache is not None:  # rotated keys go into this block's slots; the window comes back as stored
            window, layer = cache
            k, v = window.exchange(layer, k, v)
            mask = window.mask
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(out.transpose(1, 2).flatten(2))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def text_kv(self, context: torch.Tensor, bias: torch.Tensor | None) -> TextKV:
        """Text keys and values, head-major [B, heads, L, head_dim] and contiguous (kept per prompt)."""
        heads = (self.num_heads, self.head_dim)
        k = self.norm_k(self.k(context)).unflatten(-1, heads).transpose(1, 2).contiguous()
        return k, self.v(context).unflatten(-1, heads).transpose(1, 2).contiguous(), bias

    def forward(self, x: torch.Tensor, kv: TextKV) -> torch.Tensor:
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        k, v, bias = kv
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))
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
        _, dim, f, h, w = tokens.shape
        # one copy into token-major order: every residual add and norm after this runs on contiguous memory
        tokens = tokens.flatten(2).transpose(1, 2).contiguous().view(B, f, h * w, dim)  # [B, F, HW, dim]
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

    def text_kvs(self, context: torch.Tensor) -> list[TextKV]:
        context, bias = drop_text_padding(context)
        ctx = self.text_embedding(context.to(self.text_embedding[0].weight.dtype))
        return [block.cross_attn.text_kv(ctx, bias) for block in self.blocks]

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
        rows, views, q_ropes, start = [], [], [], 0
        for context, cache, frame_start in zip(contexts, caches, frame_starts, strict=True):
            if cache.cross[0] is None:
                cache.cross = self.text_kvs(context)
            view = cache.prepare(frame_start, f)
            if view.ring_shift:
                self._shift_ring(cache, view)
            views.append(replace(view, read_tokens=view.read_tokens.to(x.device)))
            b = cache.k[0].shape[0]
            rows.append(slice(start, start + b))
            start += b
            q_ropes.append(rope_table(head_dim, self.cfg.rope_theta, view.query_positions, h, w, x.device))
        if start != x.shape[0]:
            raise ValueError(f"the caches hold {start} rows but the batch has {x.shape[0]}")
        text_kvs = merge_text_kvs(caches)
        q_rope, window = batch_window(caches, views, rows, q_ropes, f * h * w)
        tokens = self._run_blocks(tokens, t_mod, text_kvs, audio_per_layer, q_rope, None, window)
        return self._unpatchify(self.head(tokens, t_emb), grid)

    def _shift_ring(self, cache: KVCache, view: CacheView) -> None:
        """`rebased` eviction: every ring frame moves one block down in the window's order, so its stored
        key turns back by `view.ring_shift` frames in time (once per block, in place, every layer)."""
        head_dim = self.cfg.dim // self.cfg.num_heads
        rope = time_shift_rope(head_dim, self.cfg.rope_theta, -view.ring_shift, cache.k[0].device)
        for k in cache.k:
            ring = k[:, :, view.ring_start :]
            ring.copy_(apply_rope(ring, rope))

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
