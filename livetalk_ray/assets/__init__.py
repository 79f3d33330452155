"""Weights that ship inside the package, so `livetalk generate` and `livetalk serve` work out of the box.

`toy/` holds the toy preset's DMD student (`model.safetensors` in LiveTalk's layout, `config.yaml`), its
toy VAE (`vae/`, a diffusers directory carrying its latent statistics) and `manifest.json` (where the
weights came from, sha256 of every file, the eval table). `livetalk pipeline --preset toy --out DIR`
rebuilds them from scratch; `python -m livetalk_ray.assets DIR` installs DIR's result here.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from livetalk_ray.config import LiveTalkConfig, load_config

TOY_DIR = Path(__file__).parent / "toy"
TINY_DECODER_FILE = "tiny_decoder.safetensors"  # beside the toy VAE, in TAEHV's layout


def toy_weights_available() -> bool:
    return (TOY_DIR / "model.safetensors").is_file() and (TOY_DIR / "vae").is_dir()


def with_embedded_weights(cfg: LiveTalkConfig, checkpoint: Path | None) -> tuple[LiveTalkConfig, Path | None]:
    """The shipped toy student when the user names no checkpoint and runs the toy model, with the shipped VAE
    whenever the shipped student runs; otherwise the inputs unchanged (a real preset without a checkpoint
    stays a seeded random model)."""
    if checkpoint is None and toy_weights_available() and cfg.model == load_config("toy").model:
        checkpoint = TOY_DIR
    if checkpoint is None or Path(checkpoint).resolve() != TOY_DIR.resolve():
        return cfg, checkpoint
    if cfg.vae.path is None:
        cfg = cfg.model_copy(deep=True)
        cfg.vae.path = str(TOY_DIR / "vae")
    if cfg.vae.tiny.path is None and (TOY_DIR / TINY_DECODER_FILE).is_file():
        cfg = cfg.model_copy(deep=True)
        cfg.vae.tiny.path = str(TOY_DIR / TINY_DECODER_FILE)  # distilled from that VAE's decoder
    return cfg, TOY_DIR


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _copy_checkpoint(source: Path, dest: Path) -> None:
    """A checkpoint's weights and its config, without the building machine's paths."""
    import yaml

    dest.mkdir(parents=True)
    shutil.copy2(source / "model.safetensors", dest / "model.safetensors")
    config = yaml.safe_load((source / "config.yaml").read_text())
    config["vae"]["path"] = None  # filled in at load time with the VAE beside it (with_embedded_weights)
    _drop_paths(config)  # the building machine's run directories mean nothing where the weights land
    (dest / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def install_toy_weights(
    student: str | Path,
    vae: str | Path,
    eval_rows: list[dict],
    provenance: dict,
    dest: Path = TOY_DIR,
    teacher: str | Path | None = None,
    ode: str | Path | None = None,
    tiny_decoder: str | Path | None = None,
) -> dict:
    """Copy a student export, its VAE and (optionally) the teacher and ODE student it came from into `dest`
    (`teacher/`, `ode/`) and the tiny decoder distilled from that VAE, with a manifest (provenance, eval table,
    sha256 of every file)."""
    sources = {".": Path(student), **{name: Path(p) for name, p in (("teacher", teacher), ("ode", ode)) if p}}
    for path in [
        *(d / f for d in sources.values() for f in ("model.safetensors", "config.yaml")),
        Path(vae) / "config.json",
    ]:
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing")
    staging = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    _copy_checkpoint(sources.pop("."), staging)
    for name, source in sources.items():
        _copy_checkpoint(source, staging / name)
    shutil.copytree(vae, staging / "vae")
    if tiny_decoder is not None:
        shutil.copy2(tiny_decoder, staging / TINY_DECODER_FILE)
    files = sorted(p for p in staging.rglob("*") if p.is_file())
    manifest = {
        **provenance,
        "eval": eval_rows,
        "sha256": {str(p.relative_to(staging)): _sha256(p) for p in files},
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)
    return manifest


def install_tiny_decoder(source: str | Path, provenance: dict, dest: Path = TOY_DIR) -> dict:
    """Ship a tiny decoder distilled from the VAE already in `dest` (`livetalk train tiny-decoder` with
    `--vae dest/vae`): the file beside the VAE, its hash and `provenance` in the manifest."""
    from livetalk_ray.models.tiny_decoder import load_taehv

    load_taehv(source)  # refuses anything that is not a TAEHV decoder
    shutil.copy2(source, dest / TINY_DECODER_FILE)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["tiny_decoder"] = provenance
    manifest["sha256"][TINY_DECODER_FILE] = _sha256(dest / TINY_DECODER_FILE)
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def install_from_pipeline(pipeline_dir: str | Path, dest: Path = TOY_DIR) -> dict:
    """Install a finished `livetalk pipeline` run's teacher, ODE student, DMD student and VAE."""
    stages = Path(pipeline_dir) / "stages"
    missing = [s for s in ("vae", "teacher", "ode", "export", "eval") if not (stages / f"{s}.json").is_file()]
    if missing:
        raise FileNotFoundError(
            f"{pipeline_dir} is not a finished pipeline run (stages not done: {', '.join(missing)})"
        )
    mark = {s: json.loads((stages / f"{s}.json").read_text()) for s in _stage_names(stages)}
    provenance = {
        "built_by": "livetalk pipeline --preset toy",
        "stage_seconds": {s: m.get("seconds") for s, m in mark.items()},
        "eval_long": mark["eval"].get("long"),  # identity and lip-sync over long streams of held-out portraits
    }
    return install_toy_weights(
        mark["export"]["checkpoint"],
        mark["vae"]["vae_path"],
        mark["eval"]["rows"],
        provenance,
        dest,
        teacher=mark["teacher"]["checkpoint"],
        ode=mark["ode"]["checkpoint"],
        tiny_decoder=mark["tiny_decoder"]["path"] if "tiny_decoder" in mark else None,
    )


def _stage_names(stages: Path) -> list[str]:
    """Finished stages in the order they finished."""
    return [p.stem for p in sorted(stages.glob("*.json"), key=lambda p: p.stat().st_mtime)]


def _drop_paths(config: dict) -> None:
    train = config.get("train", {})
    for section, key in (("dmd", "generator_checkpoint"), ("dmd", "teacher_checkpoint"), ("ode", "teacher_checkpoint")):
        if key in train.get(section, {}):
            train[section][key] = None
    if "init_checkpoint" in train.get("teacher", {}):
        train["teacher"]["init_checkpoint"] = None
    if "eval_data" in train:
        train["eval_data"] = None
