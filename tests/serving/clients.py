"""A session client for the Serve tests: creates a session, reads its WebSocket like a browser (every block and
event, with arrival times) until told to stop or until it has `blocks` blocks, then deletes it."""

from __future__ import annotations

import json
import threading
import time

import httpx
from websockets.sync.client import connect

from livetalk_ray.serving.protocol import decode_block


class SessionClient(threading.Thread):
    def __init__(self, base: str, form: dict, headers: dict | None = None, blocks: int | None = None) -> None:
        super().__init__(daemon=True)
        self.base, self.form, self.headers, self.max_blocks = base, form, headers or {}, blocks
        self.created: httpx.Response | None = None
        self.blocks: dict[int, tuple[list[bytes], bytes]] = {}  # index → (JPEG frames, sound bytes)
        self.arrivals: dict[int, float] = {}
        self.events: list[dict] = []
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.connected = threading.Event()

    def run(self) -> None:
        try:
            self.created = httpx.post(self.base + "/v1/sessions", data=self.form, headers=self.headers, timeout=120)
            if self.created.status_code not in (201, 202):
                return
            reply = self.created.json()
            url = self.base.replace("http", "ws", 1).split("/", 3)
            with connect(f"{url[0]}//{url[2]}{reply['ws']}", additional_headers=self.headers) as ws:
                self.connected.set()
                while not self.stop.is_set() and (self.max_blocks is None or len(self.blocks) < self.max_blocks):
                    message = ws.recv(timeout=300)  # a queued session hears nothing until its place changes
                    if isinstance(message, str):
                        self.events.append(json.loads(message))
                        if self.events[-1]["type"] == "closed":
                            return
                        continue
                    header, jpegs, sound = decode_block(message)
                    self.blocks[header["index"]] = (jpegs, sound.tobytes())
                    self.arrivals[header["index"]] = time.monotonic()
            httpx.delete(self.base + f"/v1/sessions/{reply['session_id']}", headers=self.headers, timeout=30)
        except BaseException as exc:  # noqa: BLE001 - the test asserts on it
            self.error = exc
        finally:
            self.connected.set()

    @property
    def session_id(self) -> str:
        return self.created.json()["session_id"]

    def events_of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["type"] == kind]

    def gaps(self, first: int = 1) -> list[float]:
        """Seconds between consecutive blocks from block `first` on (block 0 → 1 includes priming)."""
        indices = sorted(i for i in self.arrivals if i >= first)
        return [self.arrivals[b] - self.arrivals[a] for a, b in zip(indices, indices[1:], strict=False)]


def wait_for_placement(app: str, denoisers: int, timeout_s: float = 60.0) -> dict:
    """Placement's view once `denoisers` Denoiser replicas have reported to it (each does within a second of
    starting; the app answers /healthz as soon as one replica of each stage is up)."""
    from ray import serve

    placement = serve.get_deployment_handle("Placement", app)
    deadline = time.monotonic() + timeout_s
    while True:
        status = placement.status.remote().result()
        if len(status["replicas"]["Denoiser"]) >= denoisers or time.monotonic() > deadline:
            assert len(status["replicas"]["Denoiser"]) >= denoisers, status
            return status
        time.sleep(0.2)


def scaling_denoiser(downscale_delay_s: float, sessions_per_replica: int | None = None) -> dict:
    """Denoiser options that start at 2 replicas and let SessionLoad autoscaling scale in to 1 after
    `downscale_delay_s` (from the app's start) once the sessions fit one replica: a Serve scale-in for the tests."""
    env = {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1"}  # Serve's default push: every 10 s
    policy = {"policy_function": "livetalk_ray.serving.autoscaling:SessionLoad"}
    if sessions_per_replica is not None:
        policy["policy_kwargs"] = {"sessions_per_replica": sessions_per_replica}
    return {
        "ray_actor_options": {"num_cpus": 0.05, "runtime_env": {"env_vars": env}},
        "autoscaling_config": {
            "min_replicas": 1,
            "initial_replicas": 2,
            "max_replicas": 2,
            "downscale_delay_s": downscale_delay_s,
            "policy": policy,
        },
    }
