"""umT5 text encoder with Wan semantics: fixed-length prompts, embeddings past each prompt's end zeroed."""

from __future__ import annotations

import html
import re
from pathlib import Path

import torch
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

from livetalk_ray.config import TextEncoderConfig


class TextError(ValueError):
    """A text encoder that cannot be built or a prompt batch that cannot be encoded."""


class ByteTokenizer:
    """File-free UTF-8 byte tokenizer for the tiny random encoder: pad=0, eos=1, unk=2, byte b → b + 3.

    Called like a Hugging Face tokenizer (the subset `TextEncoder` uses) and, like umT5's, it appends EOS
    and keeps it when truncating.
    """

    pad_token_id, eos_token_id, unk_token_id, offset = 0, 1, 2, 3
    vocab_size = 256 + offset

    def __call__(
        self,
        texts: str | list[str],
        *,
        max_length: int,
        padding: str | bool = "max_length",
        truncation: bool = True,
        return_tensors: str = "pt",
        **_: object,  # add_special_tokens, return_attention_mask ...: always on here
    ) -> dict[str, torch.Tensor]:
        if padding not in ("max_length", True) or return_tensors != "pt":
            raise ValueError("ByteTokenizer only pads to max_length and returns torch tensors")
        texts = [texts] if isinstance(texts, str) else texts
        ids = torch.full((len(texts), max_length), self.pad_token_id, dtype=torch.long)
        for i, text in enumerate(texts):
            tokens = [b + self.offset for b in text.encode("utf-8")]
            if len(tokens) + 1 > max_length and not truncation:
                raise ValueError(f"prompt {i} has {len(tokens) + 1} tokens > max_length {max_length}")
            tokens = tokens[: max_length - 1] + [self.eos_token_id]
            ids[i, : len(tokens)] = torch.tensor(tokens)
        return {"input_ids": ids, "attention_mask": (ids != self.pad_token_id).long()}


def clean_prompt(text: str) -> str:
    """Wan's 'whitespace' cleaning (minus ftfy): unescape HTML entities and collapse whitespace."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


class TextEncoder:
    """Frozen umT5 encoder: prompts → [B, max_length, d_model], zero past each prompt's true length."""

    def __init__(
        self,
        model: UMT5EncoderModel,
        tokenizer: ByteTokenizer | object,
        cfg: TextEncoderConfig,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, both [B, max_length], on `device`."""
        if isinstance(prompts, str) or not prompts:
            raise TextError("prompts must be a non-empty list of strings")
        batch = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            truncation=True,
            max_length=self.cfg.max_length,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self.encode_with_lengths(prompts)[0]

    @torch.no_grad()
    def encode_with_lengths(self, prompts: list[str]) -> tuple[torch.Tensor, list[int]]:
        """(embeddings [B, max_length, d_model], true token count of each prompt)."""
        ids, mask = self.tokenize(prompts)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        # Wan keeps only each prompt's true length and pads back with zeros (not with the pad embeddings).
        return hidden.masked_fill(~mask.bool()[..., None], 0.0), mask.sum(dim=1).tolist()


def _tiny_umt5_config(cfg: TextEncoderConfig) -> UMT5Config:
    if cfg.d_model % cfg.num_heads:
        raise TextError(f"text.d_model {cfg.d_model} is not divisible by text.num_heads {cfg.num_heads}")
    return UMT5Config(
        vocab_size=ByteTokenizer.vocab_size + 1,  # one spare id, never produced
        d_model=cfg.d_model,
        d_kv=cfg.d_model // cfg.num_heads,
        d_ff=cfg.d_ff,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        feed_forward_proj="gated-gelu",  # umT5-XXL's FFN
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=ByteTokenizer.pad_token_id,
        eos_token_id=ByteTokenizer.eos_token_id,
    )


def build_text_encoder(
    cfg: TextEncoderConfig,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TextEncoder:
    """Tiny seeded random umT5 + byte tokenizer when `cfg.path` is None, else both from a local dir.

    `cfg.path` may be an HF model dir holding the tokenizer too, or a diffusers Wan root with
    `text_encoder/` and `tokenizer/` subfolders.
    """
    if cfg.path is None:
        with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
            torch.manual_seed(seed)
            model = UMT5EncoderModel(_tiny_umt5_config(cfg))
        return TextEncoder(model, ByteTokenizer(), cfg, device=device, dtype=dtype)
    root = Path(cfg.path)
    if not root.is_dir():
        raise TextError(f"text.path is not a local directory: {root}")
    model_dir = root / "text_encoder" if (root / "text_encoder").is_dir() else root
    tok_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else root
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        model = UMT5EncoderModel.from_pretrained(str(model_dir), dtype=dtype)
    except OSError as exc:
        raise TextError(f"cannot load umT5 encoder/tokenizer from {root}: {exc}") from None
    if model.config.d_model != cfg.d_model:
        raise TextError(f"{model_dir} has d_model {model.config.d_model} but text.d_model is {cfg.d_model}")
    return TextEncoder(model, tokenizer, cfg, device=device, dtype=dtype)
