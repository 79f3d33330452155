"""The Serve application: Ingress → (LLM, Speech, Denoiser, VAEDecoder), wired with handles.

`build_app(cfg, checkpoint)` for Python (`livetalk serve`, tests); `build(args)` is the application builder
that `serve run` / `serve deploy` / a RayService import (`livetalk_ray.serving.app:build`, args below).
Code defaults fit one CPU machine; serve_apps/*.yaml override replicas, resources and autoscaling per
deployment for real clusters (Ray's own deployment options, by deployment name).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ray import serve
from ray.serve.config import RequestRouterConfig

from livetalk_ray.assets import with_embedded_weights
from livetalk_ray.config import LiveTalkConfig, load_config
from livetalk_ray.serving.denoiser import Denoiser
from livetalk_ray.serving.ingress import Ingress, app
from livetalk_ray.serving.llm import Chat
from livetalk_ray.serving.speech import Speech
from livetalk_ray.serving.vae_decoder import VAEDecoder

# Every call of a session goes to the replica holding its state; no fallback replica, since a replica
# without the session could only answer "lost" (the driver then re-primes).
STICKY = RequestRouterConfig(
    request_router_class="ray.serve.experimental.consistent_hash_router.ConsistentHashRouter",
    request_router_kwargs={"num_virtual_nodes": 100, "num_fallback_replicas": 0},
)
SESSION_DRAIN_S = 120  # a replica scaled in gets this long to finish its sessions' calls (Serve's default: 20 s)


class LLM:
    """Chat with memory per session (serving/llm.py); sticky, so a session's history stays on one replica."""

    def __init__(self, cfg: dict) -> None:
        config = LiveTalkConfig.model_validate(cfg)
        self.chat = Chat(config.serve.llm, config.runtime)

    async def open(self, session_id: str, persona: str) -> None:
        self.chat.open(session_id, persona)

    async def reply(self, session_id: str, text: str):
        async for sentence in self.chat.reply(session_id, text):
            yield sentence

    async def close(self, session_id: str) -> None:
        self.chat.close(session_id)


class SpeechSynth:
    """Text → 16 kHz speech (serving/speech.py); stateless, any replica will do."""

    def __init__(self, cfg: dict) -> None:
        config = LiveTalkConfig.model_validate(cfg)
        self.speech = Speech(config.serve.speech, config.audio.sample_rate)

    async def synthesize(self, text: str) -> np.ndarray:
        import asyncio

        return await asyncio.to_thread(self.speech.synthesize, text)


def build_app(cfg: LiveTalkConfig, checkpoint: str | Path | None = None) -> serve.Application:
    cfg, checkpoint = with_embedded_weights(cfg, Path(checkpoint) if checkpoint else None)
    data, ckpt = cfg.model_dump(mode="json"), str(checkpoint) if checkpoint else None
    drain = {"graceful_shutdown_timeout_s": SESSION_DRAIN_S}
    denoiser = serve.deployment(
        Denoiser, name="Denoiser", request_router_config=STICKY, max_ongoing_requests=8, **drain
    ).options(ray_actor_options={"num_cpus": 0.5})
    decoder = serve.deployment(
        VAEDecoder, name="VAEDecoder", request_router_config=STICKY, max_ongoing_requests=8, **drain
    ).options(ray_actor_options={"num_cpus": 0.5})
    llm = serve.deployment(LLM, name="LLM", request_router_config=STICKY, max_ongoing_requests=16, **drain).options(
        ray_actor_options={"num_cpus": 0.25}
    )
    speech = serve.deployment(SpeechSynth, name="Speech", max_ongoing_requests=16).options(
        ray_actor_options={"num_cpus": 0.25}
    )
    # A WebSocket holds an ingress slot for its whole life: the limit counts connections, not calls.
    ingress = serve.deployment(serve.ingress(app)(Ingress), name="Ingress", max_ongoing_requests=200).options(
        ray_actor_options={"num_cpus": 0.25}
    )
    return ingress.bind(data, denoiser.bind(data, ckpt), decoder.bind(data), llm.bind(data), speech.bind(data))


def build(args: dict) -> serve.Application:
    """Application builder. args: `preset` (default toy), `config` (a YAML file), `set` (a list of
    `a.b=value` overrides), `checkpoint` (a DMD student export; default: the shipped toy weights)."""
    cfg = load_config(args.get("preset"), args.get("config"), list(args.get("set", [])))
    return build_app(cfg, args.get("checkpoint"))
