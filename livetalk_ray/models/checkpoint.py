"""Checkpoints for WanDiT: our own format, plus importing base Wan / diffusers / Self-Forcing weights.

Our format is a directory with `model.safetensors` (original Wan key layout, the layout of LiveTalk's
released file) and `config.yaml` (the resolved `LiveTalkConfig`), so a checkpoint rebuilds itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from livetalk_ray.config import ConfigError, LiveTalkConfig, load_config
from livetalk_ray.models.dit import WanDiT

MODEL_FILE, CONFIG_FILE = "model.safetensors", "config.yaml"
# Whole-key prefixes added by training wrappers (WanDiffusionWrapper, DDP, torch.compile, ComfyUI).
_WRAPPER_PREFIXES = ("model.", "module.", "_orig_mod.", "diffusion_model.")
# Segments inserted mid-key by torch.compile / FSDP / activation checkpointing; never real module names.
_WRAPPER_SEGMENTS = re.compile(r"(?:^|(?<=\.))(?:_orig_mod|_fsdp_wrapped_module|_checkpoint_wrapped_module)\.")
# Keys of base checkpoints the model has no use for (Wan I2V / FLF2V image branch).
_IGNORABLE = re.compile(r"img_emb\..*|blocks\.\d+\.cross_attn\.(?:k_img|v_img|norm_k_img)\..*")
# Keys a base (non-audio) checkpoint lacks; they keep the model's own initialisation.
_AUDIO = re.compile(r"(?:audio_proj|audio_cond_projs)\..*")

# diffusers WanTransformer3DModel name → original Wan name, checked against a built model in the tests.
_DIFFUSERS_TOP = [
    (r"condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"condition_embedder\.time_proj\.", "time_projection.1."),
    (r"condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"condition_embedder\.image_embedder\.norm1\.", "img_emb.proj.0."),
    (r"condition_embedder\.image_embedder\.ff\.net\.0\.proj\.", "img_emb.proj.1."),
    (r"condition_embedder\.image_embedder\.ff\.net\.2\.", "img_emb.proj.3."),
    (r"condition_embedder\.image_embedder\.norm2\.", "img_emb.proj.4."),
    (r"condition_embedder\.image_embedder\.pos_embed$", "img_emb.emb_pos"),
    (r"scale_shift_table$", "head.modulation"),
    (r"proj_out\.", "head.head."),
    (r"patch_embedding\.", "patch_embedding."),
]
_DIFFUSERS_ATTN = {
    "attn1": "self_attn",
    "attn2": "cross_attn",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "o",
    "norm_q": "norm_q",
    "norm_k": "norm_k",
    "add_k_proj": "k_img",
    "add_v_proj": "v_img",
    "norm_added_k": "norm_k_img",
}
_DIFFUSERS_BLOCK = re.compile(
    r"blocks\.(\d+)\.(?:(attn[12])\.(to_q|to_k|to_v|to_out\.0|norm_q|norm_k|add_k_proj|add_v_proj|norm_added_k)"
    r"\.(weight|bias)|(norm2\.|ffn\.net\.0\.proj\.|ffn\.net\.2\.|scale_shift_table$)(.*))"
)
_DIFFUSERS_BLOCK_REST = {
    "norm2.": "norm3.",
    "ffn.net.0.proj.": "ffn.0.",
    "ffn.net.2.": "ffn.2.",
    "scale_shift_table": "modulation",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the one-line message says why."""


@dataclass
class ImportReport:
    layout: Literal["wan", "diffusers"]
    loaded: int  # checkpoint tensors copied into the model (adapted ones included)
    initialised: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def _shape(shape: torch.Size | tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) or "scalar"


def _listing(what: str, keys: list[str], limit: int = 5) -> str:
    more = f", … (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{what} ({len(keys)}): {', '.join(keys[:limit])}{more}"


def livetalk_key_hash(state_dict: dict[str, Any], with_shape: bool = True) -> str:
    """LiveTalk's `hash_state_dict_keys`: md5 of the sorted ","-joined "key:d0_d1…" and bare "key" entries.

    Nested dicts contribute "key|<their own joined string>", as in LiveTalk, so any dict hashes the same."""

    def entries(sd: dict[str, Any]) -> str:
        out = []
        for key, value in sd.items():
            if not isinstance(key, str):
                continue
            if isinstance(value, torch.Tensor):
                if with_shape:
                    out.append(key + ":" + "_".join(map(str, value.shape)))
                out.append(key)
            elif isinstance(value, dict):
                out.append(key + "|" + entries(value))
        return ",".join(sorted(out))

    return hashlib.md5(entries(state_dict).encode("utf-8")).hexdigest()


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = {_WRAPPER_SEGMENTS.sub("", k): v for k, v in sd.items()}
    while sd:
        prefix = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in sd)), None)
        if prefix is None:
            return sd
        sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def _read_file(path: Path, use_ema: bool) -> dict[str, torch.Tensor]:
    with path.open("rb") as fh:
        head = fh.read(9)
    # Sniff the content rather than trusting the suffix: torch files are zip (PK) or pickle (0x80).
    if head[:2] == b"PK" or head[:1] == b"\x80":
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for corrupt or unsafe pickles
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0].split(". ")[0]  # torch's are long
            raise CheckpointError(f"{path}: cannot load torch checkpoint ({reason})") from None
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path}: torch checkpoint holds a {type(obj).__name__}, not a state dict")
        # Self-Forcing/CausVid save {"generator", "critic", "generator_ema"}; others wrap in model/state_dict.
        for name in (["generator_ema"] if use_ema else []) + ["generator", "model", "state_dict"]:
            if isinstance(obj.get(name), dict):
                obj = obj[name]
                break
        return obj
    if len(head) == 9 and head[8:9] == b"{":
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a valid safetensors file ({exc})") from None
    raise CheckpointError(f"{path}: not a safetensors or torch checkpoint")


def _read_directory(path: Path) -> dict[str, torch.Tensor]:
    for name in (MODEL_FILE, "diffusion_pytorch_model.safetensors"):
        if (path / name).is_file():
            return _read_file(path / name, use_ema=False)
    indexes = sorted(path.glob("*.safetensors.index.json")) or sorted(path.glob("*.index.json"))
    if len(indexes) != 1:
        found = "several index files" if indexes else f"no {MODEL_FILE}, diffusion_pytorch_model.safetensors"
        raise CheckpointError(f"{path}: {found} or a single *.index.json of safetensors shards")
    try:
        weight_map: dict[str, str] = json.loads(indexes[0].read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{indexes[0]}: not a shard index with a weight_map ({exc})") from None
    sd: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if not (path / shard).is_file():
            raise CheckpointError(f"{indexes[0]}: shard {shard} is missing")
        sd.update(_read_file(path / shard, use_ema=False))
    absent = sorted(set(weight_map) - set(sd))
    if absent:
        raise CheckpointError(f"{indexes[0]}: " + _listing("keys in the index but in no shard", absent))
    return sd


def read_state_dict(path: str | os.PathLike[str], *, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, a (sharded) model directory or a torch `.pt/.pth/.bin`, on the CPU.

    Wrapper prefixes (`model.`, `module.`, `_orig_mod.`) are stripped; `use_ema` picks `generator_ema`."""
    path = Path(path)
    if path.is_dir():
        sd = _read_directory(path)
    elif path.is_file():
        sd = _read_file(path, use_ema)
    else:
        raise CheckpointError(f"checkpoint not found: {path}")
    bad = [str(k) for k, v in sd.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise CheckpointError(f"{path}: " + _listing("entries that are not named tensors", bad))
    if not sd:
        raise CheckpointError(f"{path}: holds no tensors")
    return _strip_prefixes(sd)


def detect_layout(state_dict: dict[str, torch.Tensor]) -> Literal["wan", "diffusers"]:
    keys = list(state_dict)
    if any(
        k.startswith(("condition_embedder.", "proj_out."))
        or k == "scale_shift_table"
        or re.match(r"blocks\.\d+\.(attn1|attn2|scale_shift_table)", k)
        for k in keys
    ):
        return "diffusers"
    if any(
        k.startswith(("patch_embedding.", "time_embedding.", "head.head."))
        or re.match(r"blocks\.\d+\.(self_attn|cross_attn|modulation)", k)
        for k in keys
    ):
        return "wan"
    raise CheckpointError(
        f"unknown checkpoint layout (neither Wan nor diffusers; first keys: {keys[:4]}): import the weights of a "
        "Wan 2.1 DiT (LiveTalk, OmniAvatar, Self-Forcing or diffusers WanTransformer3DModel), not a VAE, text or "
        "audio encoder; `livetalk model info --keys` lists the keys this model expects"
    )


def _diffusers_key(key: str) -> str:
    if m := _DIFFUSERS_BLOCK.fullmatch(key):
        n, attn, proj, param, part, rest = m.groups()
        if attn:
            return f"blocks.{n}.{_DIFFUSERS_ATTN[attn]}.{_DIFFUSERS_ATTN[proj]}.{param}"
        return f"blocks.{n}.{_DIFFUSERS_BLOCK_REST[part]}{rest}"
    for pattern, replacement in _DIFFUSERS_TOP:
        if m := re.match(pattern, key):
            return replacement + key[m.end() :]
    raise CheckpointError(f"diffusers key {key!r} has no Wan equivalent (unsupported Wan variant?)")


def diffusers_to_wan(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename diffusers `WanTransformer3DModel` keys to the original Wan layout (tensors unchanged).

    Note diffusers' `norm2` is the affine cross-attention norm, which Wan calls `norm3`."""
    return {_diffusers_key(k): v for k, v in state_dict.items()}


def _fit_problems(
    sd: dict[str, torch.Tensor],
    target: dict[str, torch.Tensor],
    missing: list[str],
    unexpected: list[str],
    skip: Collection[str] = (),
) -> str | None:
    problems = [
        f"{k}: checkpoint has {_shape(sd[k].shape)}, model expects {_shape(target[k].shape)}"
        for k in sd
        if k in target and k not in skip and sd[k].shape != target[k].shape
    ]
    if missing:
        problems.append(_listing("missing keys", missing))
    if unexpected:
        problems.append(_listing("unexpected keys", unexpected))
    return "; ".join(problems) or None


def save_checkpoint(model: WanDiT, cfg: LiveTalkConfig, directory: str | os.PathLike[str]) -> Path:
    """Write `model.safetensors` (dtype kept) and the resolved `config.yaml`; returns the directory."""
    if model.cfg != cfg.model:
        raise CheckpointError("cfg.model does not describe this model; the checkpoint could not be rebuilt")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    # Write then rename, so a crash never leaves a half-written model.safetensors behind.
    tmp = directory / (MODEL_FILE + ".tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, directory / MODEL_FILE)
    cfg.save(directory / CONFIG_FILE)
    return directory


def load_checkpoint(
    directory: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    causal: bool = True,
    overrides: list[str] | None = None,
) -> tuple[WanDiT, LiveTalkConfig]:
    """Rebuild a model saved by `save_checkpoint`, strictly, without allocating random weights first."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {directory} (pass a checkpoints/step_NNNNNN directory)")
    if not (directory / CONFIG_FILE).is_file():
        raise CheckpointError(
            f"{directory}: no {CONFIG_FILE}, so not a livetalk-ray checkpoint: pass a run's checkpoints/step_NNNNNN "
            "directory, or turn released weights into one with `livetalk model import WEIGHTS --out DIR`"
        )
    try:
        cfg = load_config(config_file=directory / CONFIG_FILE, overrides=overrides)
    except ConfigError as exc:
        raise CheckpointError(f"{directory / CONFIG_FILE}: {exc}") from None
    if not (directory / MODEL_FILE).is_file():
        raise CheckpointError(f"{directory}: no {MODEL_FILE}")
    sd = read_state_dict(directory / MODEL_FILE)
    # Meta parameters cost no memory and no RNG; assign=True then adopts the loaded tensors as they are.
    with torch.device("meta"):
        model = WanDiT(cfg.model, causal=causal, frames_per_block=cfg.cache.frames_per_block)
    target = model.state_dict()
    problem = _fit_problems(sd, target, sorted(set(target) - set(sd)), sorted(set(sd) - set(target)))
    if problem:
        raise CheckpointError(f"{directory / MODEL_FILE} does not fit the configured model: {problem}")
    model.load_state_dict(sd, strict=True, assign=True)
    return model.to(device=device, dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype), cfg


def import_weights(model: WanDiT, source_path: str | os.PathLike[str], *, use_ema: bool = True) -> ImportReport:
    """Copy a Wan / diffusers / Self-Forcing / LiveTalk checkpoint into an existing (materialised) model.

    Tolerated only: audio modules absent from a base checkpoint (kept as initialised), the image branch
    of I2V checkpoints (ignored), and a narrower `patch_embedding` (widened, see below). Anything else
    that does not fit raises CheckpointError before any parameter is touched."""
    sd = read_state_dict(source_path, use_ema=use_ema)
    layout = detect_layout(sd)
    if layout == "diffusers":
        sd = diffusers_to_wan(sd)
    target = model.state_dict(keep_vars=True)
    if any(t.is_meta for t in target.values()):
        raise CheckpointError("import_weights needs a materialised model, not one on the meta device")
    missing = sorted(set(target) - set(sd))
    initialised = [k for k in missing if _AUDIO.fullmatch(k)]
    unexpected = sorted(set(sd) - set(target))
    ignored = [k for k in unexpected if _IGNORABLE.fullmatch(k)]
    # A 16-channel T2V patch embedding in front of our 33-channel input (latent + reference + mask).
    pw, tw = sd.get("patch_embedding.weight"), target["patch_embedding.weight"]
    widen = (
        pw is not None
        and pw.dim() == 5
        and pw.shape[1] < tw.shape[1]
        and pw.shape[:1] + pw.shape[2:] == tw.shape[:1] + tw.shape[2:]
    )
    adapted = ["patch_embedding.weight"] if widen else []
    problem = _fit_problems(
        sd, target, [k for k in missing if k not in initialised], [k for k in unexpected if k not in ignored], adapted
    )
    if problem:
        raise CheckpointError(
            f"{source_path} ({layout} layout) does not fit the model (use the --preset or --set model.* these "
            f"weights were made for): {problem}"
        )
    loaded = 0
    with torch.no_grad():
        for key, value in sd.items():
            if key not in target:
                continue
            if key == "patch_embedding.weight" and widen:
                # Zero weights on the extra reference/mask channels: the imported model then computes
                # exactly what the base T2V model computes, and training learns to use the new inputs.
                target[key].zero_()
                target[key][:, : value.shape[1]].copy_(value)
            else:
                target[key].copy_(value)
            loaded += 1
    return ImportReport(layout, loaded, initialised, adapted, ignored)
