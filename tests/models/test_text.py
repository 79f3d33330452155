"""Text encoder: Wan semantics (fixed length, zeros past each prompt's end), determinism, tokenizer."""

from __future__ import annotations

import pytest
import torch

from livetalk_ray.config import load_config
from livetalk_ray.models.text import ByteTokenizer, TextError, build_text_encoder, clean_prompt

PROMPTS = ["a woman talks to the camera", "a man nods and smiles, calm lighting", ""]


@pytest.fixture(scope="module")
def cfg():
    return load_config("toy").text


@pytest.fixture(scope="module")
def enc(cfg):
    return build_text_encoder(cfg, seed=0)


def test_shape_and_dtype(enc, cfg):
    out = enc.encode(PROMPTS)
    assert out.shape == (3, cfg.max_length, cfg.d_model) == (3, 32, load_config("toy").model.text_dim)
    assert out.dtype == torch.float32 and not out.requires_grad and torch.isfinite(out).all()


def test_positions_past_true_length_are_exactly_zero(enc, cfg):
    long_prompt = "talking " * 20  # longer than max_length: truncated (EOS kept), no padding at all
    out = enc.encode([*PROMPTS, long_prompt])
    lengths = [min(len(clean_prompt(p).encode()) + 1, cfg.max_length) for p in [*PROMPTS, long_prompt]]
    for row, n in zip(out, lengths, strict=True):
        assert (row[n:] == 0).all()
        assert (row[:n].abs().sum(-1) > 0).all()  # every real token (+ EOS) is non-zero
    _, mask = enc.tokenize([*PROMPTS, long_prompt])
    assert mask.sum(1).tolist() == lengths == [28, 32, 1, 32]


def test_different_prompts_differ_and_batching_is_consistent(enc):
    out = enc.encode(PROMPTS)
    assert not torch.allclose(out[0], out[1])
    alone = enc.encode([PROMPTS[1]])
    assert torch.allclose(alone[0], out[1], atol=1e-5)  # no leakage across the batch


def test_deterministic(cfg):
    torch.manual_seed(7)
    expected = torch.rand(2)
    torch.manual_seed(7)
    a, b = build_text_encoder(cfg, seed=0), build_text_encoder(cfg, seed=0)
    assert torch.equal(torch.rand(2), expected)  # the caller's RNG is untouched
    assert torch.equal(a.encode(PROMPTS), b.encode(PROMPTS))
    assert not torch.allclose(a.encode(PROMPTS[:1]), build_text_encoder(cfg, seed=1).encode(PROMPTS[:1]))


def test_byte_tokenizer():
    tok = ByteTokenizer()
    batch = tok(["hé", ""], max_length=6)
    assert batch["input_ids"].tolist() == [[ord("h") + 3, 0xC3 + 3, 0xA9 + 3, 1, 0, 0], [1, 0, 0, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0]]
    assert tok(["abcdefgh"], max_length=4)["input_ids"].tolist() == [[100, 101, 102, 1]]  # EOS kept
    with pytest.raises(ValueError):
        tok(["abcdefgh"], max_length=4, truncation=False)
    assert clean_prompt("  a \n\t b &amp; c ") == "a b & c"


def test_errors(enc, cfg, tmp_path):
    with pytest.raises(TextError):
        enc.encode([])
    with pytest.raises(TextError):
        enc.encode("not a list")  # type: ignore[arg-type]
    missing = tmp_path / "no-such-umt5"
    with pytest.raises(TextError, match=str(missing)):
        build_text_encoder(cfg.model_copy(update={"path": str(missing)}))
    with pytest.raises(TextError, match="divisible"):
        build_text_encoder(cfg.model_copy(update={"num_heads": 3}))


def test_loads_a_diffusers_style_local_directory(enc, cfg, tmp_path):
    # A word-level fast tokenizer built in memory stands in for umT5's (no downloads in tests).
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = "a man talks calmly".split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    specials = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
    fast.save_pretrained(tmp_path / "tokenizer")
    enc.model.save_pretrained(tmp_path / "text_encoder")
    loaded = build_text_encoder(cfg.model_copy(update={"path": str(tmp_path)}))
    ids, mask = loaded.tokenize(["a man  talks", "calmly"])
    assert ids[0, :4].tolist() == [3, 4, 5, 1] and mask.sum(1).tolist() == [4, 2]
    out = loaded.encode(["a man  talks", "calmly"])
    assert out.shape == (2, cfg.max_length, cfg.d_model)
    assert (out[0, 4:] == 0).all() and (out[1, 2:] == 0).all() and (out[0, :4] != 0).any(-1).all()
    with pytest.raises(TextError, match="d_model"):
        build_text_encoder(cfg.model_copy(update={"path": str(tmp_path), "d_model": 128, "num_heads": 2}))
