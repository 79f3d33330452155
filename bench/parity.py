"""LiveTalk parity: our DiT against LiveTalk's own goldens, and against LiveTalk's own classes for speed.

    .venv/bin/python bench/parity.py [--livetalk-src DIR] [--rounds 9] [--threads 2] [--out bench/results/parity.json]

Part 1 checks the goldens in tests/goldens (LiveTalk's outputs for the same weights and inputs): the bidirectional
forward and the streamed blocks of both step lists, as relative L2.

Part 2 times, at dim 512 / 4 heads / 4 layers / 32x32 latents (256 tokens per frame), fp32, one batch row:
the bidirectional forward over 9 latent frames, and one cached streaming step of a 3-frame block attending to a
full 15-frame window (9 sinks + ring). The text is a 64-token prompt padded with zeros to umT5's 512 rows, as
Wan's text encoder hands it over. With `--livetalk-src` pointing at a local clone of GAIR-NLP/LiveTalk, its
`OmniAvatarWanModel` and `CausalWanModel` run the same work with the same weights, interleaved round by round
with ours (medians; the machine is noisy). Their code is imported from that clone, never copied here; modules
they import only for multi-GPU sequence parallelism (`xfuser`) are replaced by single-process stand-ins.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.goldens: the goldens and how our config is built for them

from livetalk_ray.config import load_config  # noqa: E402
from livetalk_ray.models.dit import WanDiT, group_audio_frames  # noqa: E402
from tests.goldens import livetalk_case_a as case  # noqa: E402

SIZES = {"dim": 512, "num_heads": 4, "num_layers": 4, "ffn_dim": 2048}
LATENT_SIDE, TEXT_TOKENS, PROMPT_TOKENS, BIDIR_FRAMES = 32, 512, 64, 9
FPB, WINDOW, SINKS = 3, 15, 9


def check_goldens() -> dict:
    out = {}
    cfg = case.config()
    net = case.model(cfg, causal=False)
    bidir = case.bidirectional()
    errors = [case.relative_l2(case.bidirectional_output(net, bidir, i), bidir[f"{i}.out"]) for i in range(3)]
    out["bidirectional"] = max(errors)
    goldens = case.stream()
    for tag in case.TAGS:
        cfg = case.config(tag)
        blocks = case.streamed_blocks(case.model(cfg, causal=True), cfg, goldens, tag)
        out[f"stream_{tag}"] = max(case.relative_l2(b, goldens[f"{tag}.x0.{i}"]) for i, b in enumerate(blocks))
    return out


def bench_config():
    overrides = [f"model.{k}={v}" for k, v in SIZES.items()]
    side = LATENT_SIDE * 8
    overrides += [f"video.height={side}", f"video.width={side}", f"cache.local_attn_size={WINDOW}"]
    overrides += [f"cache.sink_size={SINKS}", f"cache.frames_per_block={FPB}", f"text.max_length={TEXT_TOKENS}"]
    return load_config("wan-1.3b", overrides=overrides)


def inputs(cfg, frames: int, generator: torch.Generator) -> dict:
    c, s = cfg.model.out_dim, LATENT_SIDE
    context = torch.randn(1, TEXT_TOKENS, cfg.model.text_dim, generator=generator)
    context[:, PROMPT_TOKENS:] = 0  # umT5 output as Wan pads it: the prompt's tokens, then zeros to 512
    return {
        "x": torch.randn(1, c, frames, s, s, generator=generator),
        "y": torch.randn(1, c + 1, frames, s, s, generator=generator),
        "context": context,
        "audio": torch.randn(1, 4 * frames - 3, cfg.model.audio_feature_dim, generator=generator),
    }


class Ours:
    def __init__(self, cfg, state: dict) -> None:
        self.cfg = cfg
        self.bidir = WanDiT(cfg.model, causal=False).eval()
        self.bidir.load_state_dict(state)
        self.causal = WanDiT(cfg.model, causal=True, frames_per_block=FPB).eval()
        self.causal.load_state_dict(state)

    @torch.no_grad()
    def forward(self, d: dict) -> torch.Tensor:
        return self.bidir(d["x"], torch.tensor([500.0]), d["context"], d["y"], group_audio_frames(d["audio"]))

    @torch.no_grad()
    def fill(self, d: dict) -> None:
        """Stream blocks 0..4 (the window is then full) and keep the cache for `step`."""
        cfg = self.cfg
        self.cache = self.causal.new_cache(1, cfg.tokens_per_frame, WINDOW, SINKS, cfg.cache.rope_positions)
        self.audio = group_audio_frames(d["audio"])
        for b in range(WINDOW // FPB):
            self._block(d, b)

    def _block(self, d: dict, b: int) -> torch.Tensor:
        sl = slice(b * FPB, (b + 1) * FPB)
        t = torch.full((1, FPB), 624.0)
        x, y, audio = d["x"][:, :, sl], d["y"][:, :, sl], self.audio[:, sl]
        return self.causal.forward_cached(x, t, d["context"], y, self.cache, b * FPB, audio)

    @torch.no_grad()
    def step(self, d: dict) -> torch.Tensor:
        """One denoising step of block 5 (its first call evicts; reruns attend to the same full window)."""
        return self._block(d, WINDOW // FPB)


def import_livetalk(src: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """LiveTalk's two model modules from a local clone (its `model/__init__` pulls in the whole trainer)."""
    if not (src / "model" / "causal_wan_video_dit_omniavatar.py").is_file():
        raise SystemExit(f"{src} is not a GAIR-NLP/LiveTalk checkout (no model/causal_wan_video_dit_omniavatar.py)")
    sys.path.insert(0, str(src))
    package = types.ModuleType("model")
    package.__path__ = [str(src / "model")]
    sys.modules["model"] = package
    distributed = types.ModuleType("xfuser.core.distributed")  # sequence parallelism only; one process here
    distributed.get_sequence_parallel_rank = lambda: 0
    distributed.get_sequence_parallel_world_size = lambda: 1
    distributed.get_sp_group = lambda: None
    for name in ("xfuser", "xfuser.core"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["xfuser.core.distributed"] = distributed
    bidir = importlib.import_module("model.wan_video_dit_omniavatar")
    causal = importlib.import_module("model.causal_wan_video_dit_omniavatar")
    return bidir, causal


class Theirs:
    def __init__(self, cfg, state: dict, src: Path) -> None:
        bidir_module, causal_module = import_livetalk(src)
        m = cfg.model
        kwargs = dict(
            dim=m.dim, in_dim=m.in_dim, ffn_dim=m.ffn_dim, out_dim=m.out_dim, text_dim=m.text_dim, freq_dim=m.freq_dim,
            eps=m.eps, patch_size=list(m.patch_size), num_heads=m.num_heads, num_layers=m.num_layers,
            has_image_input=False, use_audio=True, audio_hidden_size=m.audio_hidden_size,
        )  # fmt: skip
        self.bidir = bidir_module.OmniAvatarWanModel(**kwargs).eval()
        self.bidir.load_state_dict(state, strict=True)
        self.causal = causal_module.CausalWanModel(**kwargs, local_attn_size=WINDOW, sink_size=SINKS).eval()
        self.causal.load_state_dict(state, strict=True)
        self.tokens_per_frame = cfg.tokens_per_frame

    @torch.no_grad()
    def forward(self, d: dict) -> torch.Tensor:
        return self.bidir(d["x"], torch.tensor([500.0]), d["context"], y=d["y"], audio_emb=d["audio"])

    @torch.no_grad()
    def fill(self, d: dict) -> None:
        net, m = self.causal, self.causal
        dim = m.dim
        size = WINDOW * self.tokens_per_frame
        self.kv = [
            {
                "k": torch.zeros(1, size, dim),
                "v": torch.zeros(1, size, dim),
                "global_end_index": torch.tensor([0]),
                "local_end_index": torch.tensor([0]),
            }
            for _ in range(m.num_layers)
        ]
        self.cross = [{"k": None, "v": None, "is_init": False} for _ in range(m.num_layers)]
        # LiveTalk projects a clip's audio once, before streaming (scripts/inference_example.py)
        audio = d["audio"].permute(0, 2, 1)[:, :, :, None, None]
        audio = torch.cat([audio[:, :, :1].repeat(1, 1, 3, 1, 1), audio], 2)
        audio = net.audio_proj(audio)
        self.audio = torch.concat([proj(audio) for proj in net.audio_cond_projs], 0)
        for b in range(WINDOW // FPB):
            self._block(d, b)

    def _block(self, d: dict, b: int) -> torch.Tensor:
        sl = slice(b * FPB, (b + 1) * FPB)
        return self.causal(
            d["x"][:, :, sl],
            torch.full((1, FPB), 624.0),
            d["context"],
            y=d["y"][:, :, sl],
            audio_emb=self.audio[:, sl],
            kv_cache=self.kv,
            crossattn_cache=self.cross,
            current_start=b * FPB * self.tokens_per_frame,
        )

    @torch.no_grad()
    def step(self, d: dict) -> torch.Tensor:
        return self._block(d, WINDOW // FPB)


def timed(fn, d: dict) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn(d)
    return time.perf_counter() - start, out


def measure(cfg, rounds: int, src: Path | None) -> dict:
    gen = torch.Generator().manual_seed(0)
    state = {k: v.normal_(0, 0.05, generator=gen) for k, v in WanDiT(cfg.model, causal=False).state_dict().items()}
    ours = Ours(cfg, state)
    theirs = Theirs(cfg, state, src) if src else None
    bidir_in = inputs(cfg, BIDIR_FRAMES, gen)
    stream_in = inputs(cfg, WINDOW + FPB, gen)
    models = {"ours": ours, **({"livetalk": theirs} if theirs else {})}
    for model in models.values():
        model.fill(stream_in)
        model.forward(bidir_in)  # warm-up
        model.step(stream_in)
    times: dict[str, dict[str, list[float]]] = {name: {"bidirectional": [], "cached_step": []} for name in models}
    outs: dict[str, dict[str, torch.Tensor]] = {name: {} for name in models}
    for _ in range(rounds):  # interleaved so that drifts of this machine hit both alike
        for name, model in models.items():
            seconds, outs[name]["bidirectional"] = timed(model.forward, bidir_in)
            times[name]["bidirectional"].append(seconds)
            seconds, outs[name]["cached_step"] = timed(model.step, stream_in)
            times[name]["cached_step"].append(seconds)
    result = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}
    result["samples"] = times
    if theirs:
        result["ratio_ours_over_livetalk"] = {
            k: result["ours"][k] / result["livetalk"][k] for k in ("bidirectional", "cached_step")
        }
        result["agreement_relative_l2"] = {
            k: case.relative_l2(outs["ours"][k], outs["livetalk"][k]) for k in ("bidirectional", "cached_step")
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--livetalk-src", type=Path, default=None, help="local clone of GAIR-NLP/LiveTalk")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "parity.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    goldens = check_goldens()
    table = Table(title="LiveTalk goldens (relative L2; must stay below 1e-5)")
    table.add_column("case")
    table.add_column("relative L2", justify="right")
    for k, v in goldens.items():
        table.add_row(k, f"{v:.1e}")
    console.print(table)

    cfg = bench_config()
    timing = measure(cfg, args.rounds, args.livetalk_src)
    table = Table(title=f"median seconds over {args.rounds} interleaved rounds, {args.threads} threads, fp32")
    for col in ("path", "ours", "livetalk", "ours / livetalk", "outputs rel. L2"):
        table.add_column(col, justify="right")
    for k in ("bidirectional", "cached_step"):
        row = [k, f"{timing['ours'][k]:.4f}"]
        if "livetalk" in timing:
            row += [f"{timing['livetalk'][k]:.4f}", f"{timing['ratio_ours_over_livetalk'][k]:.3f}"]
            row += [f"{timing['agreement_relative_l2'][k]:.1e}"]
        table.add_row(*row)
    console.print(table)
    result = {
        "what": __doc__.strip().splitlines()[0],
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads},
        "shape": {
            **SIZES,
            "latent_side": LATENT_SIDE,
            "tokens_per_frame": cfg.tokens_per_frame,
            "text_tokens": TEXT_TOKENS,
            "prompt_tokens": PROMPT_TOKENS,
            "bidirectional_frames": BIDIR_FRAMES,
            "window_frames": WINDOW,
            "sink_frames": SINKS,
            "frames_per_block": FPB,
        },
        "goldens_relative_l2": goldens,
        "timing": timing,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
