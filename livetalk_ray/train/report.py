"""What a training run shows its users at each checkpoint: the loss curve and sample clips.

Samples are generated for fixed conditions (held-out ones from `train.eval_data`, else the first training
clips), decoded with the VAE and saved as a PNG grid: the reference image, then every other video frame.
On the toy preset each sample is also scored with the toy world's lip-sync measure (correlation of the
measured mouth opening with the speech envelope), so "does the mouth follow the audio" is a number in
report.json rather than a judgement call.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from livetalk_ray.config import LiveTalkConfig
from livetalk_ray.data.reader import first_batch
from livetalk_ray.diffusion.clips import EVAL_COLUMNS, SAMPLE_SEED
from livetalk_ray.models.dit import WanDiT
from livetalk_ray.models.image import frame_grid


def plot_loss(records: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r["step"] for r in records])
    loss = np.array([r["loss"] for r in records])
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    ax.plot(steps, loss, lw=0.6, alpha=0.35, label="per step")
    if len(loss) >= 10:
        k = max(5, len(loss) // 50)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, lw=1.6, label=f"mean of {k}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


class Reporter:
    def __init__(self, cfg: LiveTalkConfig, stage, run_dir: Path, data_dir: str) -> None:
        self.cfg, self.stage, self.run_dir = cfg, stage, run_dir
        self.eval_dir = cfg.train.eval_data or data_dir
        self.history_path = run_dir / "report.json"
        self.history: list[dict] = json.loads(self.history_path.read_text()) if self.history_path.exists() else []
        self._batch: dict | None = None
        self._vae = None

    @property
    def latest(self) -> dict:
        return self.history[-1] if self.history else {}

    def eval_batch(self) -> dict:
        if self._batch is None:
            self._batch = first_batch(self.eval_dir, self.cfg, EVAL_COLUMNS, self.cfg.train.report_clips)
        return self._batch

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        from livetalk_ray.models.vae import WanVAE

        if self._vae is None:
            self._vae = WanVAE(self.cfg.vae, device=latents.device)
        return self._vae.decode_frames(latents)

    def report(self, model: WanDiT, directory: Path, records: list[dict], plateau) -> dict:
        """Loss curve, sample grid and (toy) lip-sync for the checkpoint in `directory`."""
        if records:
            plot_loss(records, self.run_dir / "loss.png", f"{self.stage.name} loss")
        batch = self.eval_batch()
        was_training = model.training
        model.eval()
        latents = self.stage.sample(model, self.cfg, batch, SAMPLE_SEED)
        model.train(was_training)
        frames = self.decode(latents)
        from PIL import Image

        Image.fromarray(frame_grid(frames, batch["ref_image"].numpy())).save(directory / "samples.png")
        entry: dict = {"step": int(directory.name.split("_")[-1]), "converged_at": plateau.converged_at}
        if records:
            tail = [r["loss"] for r in records[-50:]]
            entry["loss_mean_last_50"] = float(np.mean(tail))
            entry["train_s"] = records[-1].get("train_s")
        if self.cfg.preset == "toy":
            from livetalk_ray.toyworld.measure import lip_sync_scores

            entry["lipsync"] = lip_sync_scores(frames, batch["audio"].numpy(), self.cfg.video.fps)
            entry["lipsync_mean"] = float(np.mean(entry["lipsync"]))
        self.history = [h for h in self.history if h["step"] < entry["step"]] + [entry]
        self.history_path.write_text(json.dumps(self.history, indent=2))
        return entry
