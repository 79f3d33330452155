"""The Serve application: Ingress → (ASR, LLM, Speech, Denoiser, VAEDecoder), wired with handles, and Placement
(one replica), which every Ingress asks where a session may stream and the stage replicas report to.

`build_app(cfg, checkpoint)` for Python (`livetalk serve`, tests); `build(args)` is the application builder
that `serve run` / `serve deploy` / a RayService import (`livetalk_ray.serving.app:build`, args below).
Code defaults fit one CPU machine; serve_apps/*.yaml override replicas, resources and autoscaling per
deployment for real clusters (Ray's own deployment options, by deployment name).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
from ray import serve
from ray.serve.config import RequestRouterConfig

from livetalk_ray import metrics
from livetalk_ray.assets import with_embedded_weights
from livetalk_ray.config import ConfigError, LiveTalkConfig, load_config, resolve_device
from livetalk_ray.serving.asr import SAMPLE_RATE, Listener, VoiceActivity, make_recognizer
from livetalk_ray.serving.autoscaling import SESSIONS_METRIC
from livetalk_ray.serving.denoiser import Denoiser
from livetalk_ray.serving.ingress import Ingress, token_digest
from livetalk_ray.serving.llm import Chat
from livetalk_ray.serving.placement import Placement
from livetalk_ray.serving.replica_ports import bind_replica_server_to_node_address
from livetalk_ray.serving.sessions import SessionTable, reap_forever, replica_actor_name
from livetalk_ray.serving.speech import Speech
from livetalk_ray.serving.vae_decoder import VAEDecoder

# Every call of a session goes to the replica holding its state, placed on the least loaded replica at the
# session's first call (serving/routing.py); no fallback replica, since a replica without the session could
# only answer "lost" (the driver then re-primes).
STICKY = RequestRouterConfig(
    request_router_class="livetalk_ray.serving.routing.SessionRouter",
    request_router_kwargs={"num_virtual_nodes": 100, "num_fallback_replicas": 0},
)
SESSION_DRAIN_S = 120  # a replica scaled in gets this long to move its sessions (Serve's default: 20 s)
# How often a stopping replica checks that its last calls have ended (Serve's default: 2 s): its sessions wait
# for the move (serving/sessions.py) from the moment routers stop sending it their calls.
DRAIN_CHECK_S = 0.05


class LLM:
    """Chat with memory per session (serving/llm.py); sticky, so a session's history stays on one replica."""

    def __init__(self, cfg: dict) -> None:
        bind_replica_server_to_node_address()
        config = LiveTalkConfig.model_validate(cfg)
        self.chat = Chat(config.serve.llm, config.runtime)
        self.idle_s, self.sample_rate = config.serve.session_idle_s, config.audio.sample_rate
        self.reaper: asyncio.Task | None = None

    async def open(self, session_id: str, persona: str, history: list[tuple[str, str]] = ()) -> None:
        if self.reaper is None:  # the replica's event loop runs by now
            self.reaper = asyncio.create_task(reap_forever(self.chat.sessions, self.idle_s))
        self.chat.open(session_id, persona, history)

    async def reply(self, session_id: str, text: str, audio: np.ndarray | None = None):
        """Sentences (str), or `SpokenSentence`s from a model that speaks; `audio`: the user's turn itself."""
        asked, first = time.monotonic(), True
        async for sentence in self.chat.reply(session_id, text, audio, self.sample_rate):
            if first:
                metrics.record(metrics.SERVE_LLM_FIRST_SENTENCE_SECONDS, time.monotonic() - asked)
                first = False
            metrics.record(metrics.SERVE_LLM_SENTENCES)
            yield sentence

    async def close(self, session_id: str) -> None:
        self.chat.close(session_id)

    async def replica_name(self) -> str:
        return replica_actor_name()

    async def ping(self) -> bool:  # the Ingress's readiness check: the model is loaded once this answers
        return True


class SpeechSynth:
    """Text → 16 kHz speech (serving/speech.py); stateless, any replica will do."""

    def __init__(self, cfg: dict) -> None:
        bind_replica_server_to_node_address()
        config = LiveTalkConfig.model_validate(cfg)
        self.speech = Speech(config.serve.speech, config.audio.sample_rate)

    async def synthesize(self, text: str) -> np.ndarray:
        started = time.monotonic()
        samples = await asyncio.to_thread(self.speech.synthesize, text)
        metrics.record(metrics.SERVE_SPEECH_SECONDS, time.monotonic() - started)
        return samples

    async def ping(self) -> bool:
        return True


class ASR:
    """Listening (serving/asr.py): per session, voice activity, turn ends and the words; sticky, since a session's
    ear (VAD state, the turn being recognised) lives on one replica."""

    def __init__(self, cfg: dict) -> None:
        bind_replica_server_to_node_address()
        config = LiveTalkConfig.model_validate(cfg)
        if config.audio.sample_rate != SAMPLE_RATE:
            raise ConfigError(f"listening needs audio.sample_rate {SAMPLE_RATE}, not {config.audio.sample_rate}")
        self.cfg = config.serve.asr
        self.recognizer = make_recognizer(self.cfg, resolve_device(config.runtime))
        VoiceActivity()  # load silero-vad now: the first session must not wait for it
        self.sessions = SessionTable("ASR")
        self.idle_s = config.serve.session_idle_s
        self.reaper: asyncio.Task | None = None

    async def open(self, session_id: str, keep_audio: bool = False, mid_turn: bool = False) -> None:
        """`mid_turn`: re-opened after a lost listener; what the user is saying now is not heard (see Listener)."""
        if self.reaper is None:
            self.reaper = asyncio.create_task(reap_forever(self.sessions, self.idle_s))
        listener = await asyncio.to_thread(Listener, self.cfg, self.recognizer, keep_audio, mid_turn=mid_turn)
        self.sessions.put(session_id, listener)

    async def hear(self, session_id: str, samples: np.ndarray) -> list[dict]:
        listener = self.sessions.get(session_id)  # SessionLost: the caller re-opens it here
        started = time.monotonic()
        events = await asyncio.to_thread(listener.hear, samples)
        metrics.record(metrics.SERVE_STAGE_SECONDS, time.monotonic() - started, stage="listen")
        return events

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Sessions held (their listeners), for the SessionLoad autoscaling policy."""
        return {SESSIONS_METRIC: float(len(self.sessions))}

    async def check_health(self) -> None:
        metrics.record(metrics.SERVE_SESSIONS, len(self.sessions), deployment="ASR")

    async def close(self, session_id: str) -> None:
        listener = self.sessions.get(session_id)
        self.sessions.close(session_id)
        listener.close()

    async def replica_name(self) -> str:
        return replica_actor_name()

    async def ping(self) -> bool:
        return True


# Code defaults for one CPU machine; `overrides` (tests) and serve_apps/*.yaml (clusters) replace them by name.
DEFAULTS: dict[str, dict] = {
    "Denoiser": {"max_ongoing_requests": 8, "ray_actor_options": {"num_cpus": 0.5}},
    "VAEDecoder": {"max_ongoing_requests": 8, "ray_actor_options": {"num_cpus": 0.5}},
    "LLM": {"max_ongoing_requests": 16, "ray_actor_options": {"num_cpus": 0.25}},
    "Speech": {"max_ongoing_requests": 16, "ray_actor_options": {"num_cpus": 0.25}},
    "ASR": {"max_ongoing_requests": 32, "ray_actor_options": {"num_cpus": 0.25}},
    # A WebSocket holds an ingress slot for its whole life: this limit counts connections, not calls.
    "Ingress": {"max_ongoing_requests": 200, "ray_actor_options": {"num_cpus": 0.25}},
    # One replica holds the app's placement; its calls are tiny (a dict lookup), so it takes no CPU reservation.
    "Placement": {"num_replicas": 1, "max_ongoing_requests": 1000, "ray_actor_options": {"num_cpus": 0}},
}
STATEFUL = ("Denoiser", "VAEDecoder", "LLM", "ASR")  # sticky routing and a long drain for their sessions


def build_app(
    cfg: LiveTalkConfig, checkpoint: str | Path | None = None, overrides: dict[str, dict] | None = None
) -> serve.Application:
    cfg, checkpoint = with_embedded_weights(cfg, Path(checkpoint) if checkpoint else None)
    if cfg.serve.token is not None and not cfg.serve.token.startswith("sha256:"):
        cfg = cfg.model_copy(deep=True)
        cfg.serve.token = token_digest(cfg.serve.token)  # deployment arguments are readable in Ray's store
    data, ckpt = cfg.model_dump(mode="json"), str(checkpoint) if checkpoint else None

    def deployment(cls, name: str):
        options = {**DEFAULTS[name], **(overrides or {}).get(name, {})}
        if name in STATEFUL:
            drain = {"graceful_shutdown_timeout_s": SESSION_DRAIN_S, "graceful_shutdown_wait_loop_s": DRAIN_CHECK_S}
            options = {"request_router_config": STICKY, **drain, **options}
        return serve.deployment(cls, name=name, **options)

    placement = deployment(Placement, "Placement").bind(data)
    denoiser = deployment(Denoiser, "Denoiser").bind(data, ckpt, placement)
    decoder = deployment(VAEDecoder, "VAEDecoder").bind(data, placement)
    llm, speech = deployment(LLM, "LLM").bind(data), deployment(SpeechSynth, "Speech").bind(data)
    asr = deployment(ASR, "ASR").bind(data)
    return deployment(Ingress, "Ingress").bind(data, denoiser, decoder, llm, speech, asr, placement)


def build(args: dict) -> serve.Application:
    """Application builder. args: `preset` (default toy), `config` (a YAML file), `set` (a list of
    `a.b=value` overrides), `checkpoint` (a DMD student export; default: the shipped toy weights)."""
    cfg = load_config(args.get("preset"), args.get("config"), list(args.get("set", [])))
    return build_app(cfg, args.get("checkpoint"))
