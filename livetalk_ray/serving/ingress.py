"""The Ingress deployment: HTTP + WebSocket API, the web page, and one SessionDriver per live session.

    POST   /v1/sessions                 reference image (upload or a bundled portrait) + persona → session
    GET    /v1/sessions/{id}            status
    WS     /v1/sessions/{id}/ws         text / PCM / "say" in; per-block JPEG frames + PCM and events out
    GET    /v1/sessions/{id}/stream     MJPEG of the same stream (an <img> can show it)
    DELETE /v1/sessions/{id}            release everywhere
    GET    /v1/portraits[/{name}.png]   bundled portraits;  GET /healthz;  GET / the page;  /docs OpenAPI

Sessions live in the ingress replica that created them (drivers only relay; the Denoiser, VAEDecoder and
LLM replicas, which hold the heavy state, are the ones that scale). With auth on, every /v1 call needs
`Authorization: Bearer TOKEN` (a browser's WebSocket or <img> may pass `?token=TOKEN`).
"""

# No `from __future__ import annotations`: FastAPI must see real classes (Request, UploadFile) in route signatures.
import asyncio
import hashlib
import secrets
from importlib import resources
from typing import Literal

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile, WebSocket
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from ray import serve

from livetalk_ray import metrics
from livetalk_ray.config import LiveTalkConfig
from livetalk_ray.media import ImageError, read_image
from livetalk_ray.serving.live import Live
from livetalk_ray.serving.placement import PlacementClient
from livetalk_ray.serving.portraits import model_note, portrait_png, portraits
from livetalk_ray.serving.protocol import (
    close_code,
    decode_block,
)
from livetalk_ray.serving.replica_ports import bind_replica_server_to_node_address
from livetalk_ray.serving.session import RELEASE_TIMEOUT_S, SessionSpec
from livetalk_ray.serving.sessions import replica_actor_name
from livetalk_ray.serving.stage import StageLost

app = FastAPI(title="livetalk-ray", description="Real-time talking avatars (LiveTalk recipe) on Ray Serve")
# With a token, these need it too; the page, its script and /healthz stay open (a browser loads the page first).
PROTECTED_PREFIXES = ("/v1/", "/docs", "/redoc", "/openapi.json")


def token_digest(token: str) -> str:
    """What the replicas hold instead of the token: Serve keeps deployment arguments in Ray's key-value store,
    which anyone who reaches the cluster could read."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def token_ok(request: Request | WebSocket, expected: str | None) -> bool:
    """The bearer token (header, or `?token=` for a browser's WebSocket and <img>) against `expected` (a token or
    its `token_digest`), in constant time on bytes: any value, ASCII or not, is a plain mismatch, never an error."""
    if expected is None:
        return True
    header = request.headers.get("authorization", "")
    given = header[len("Bearer ") :].strip() if header.startswith("Bearer ") else request.query_params.get("token")
    if not given:
        return False
    if expected.startswith("sha256:"):
        return secrets.compare_digest(token_digest(given), expected)
    return secrets.compare_digest(given.encode(), expected.encode())


@app.middleware("http")
async def auth_before_body(request: Request, call_next):
    """Refuse an unauthenticated call before its body is read (FastAPI parses forms and uploads before a route
    runs, so the route's own check would come after a 8 MB upload was taken in)."""
    path, root = request.scope["path"], request.scope.get("root_path", "")
    path = path[len(root) :] if root and path.startswith(root) else path
    token = getattr(request.app.state, "token", None)
    if path.startswith(PROTECTED_PREFIXES) and not token_ok(request, token):
        headers = {"WWW-Authenticate": "Bearer"}
        return JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401, headers=headers)
    return await call_next(request)


SEND_TIMEOUT_S = 10.0  # a viewer whose connection takes no message for this long is dropped (too_slow)


async def _send_all(ws: WebSocket, subscriber) -> None:
    """A session's blocks and events to one WebSocket, until its `closed` event (then the close code that says
    why) or until the connection stops taking messages."""
    while True:
        item = await subscriber.get()
        try:
            if isinstance(item, bytes):
                await asyncio.wait_for(ws.send_bytes(item), SEND_TIMEOUT_S)
                continue
            await asyncio.wait_for(ws.send_json(item), SEND_TIMEOUT_S)
        except TimeoutError:
            metrics.record(metrics.SERVE_SESSION_ERRORS, reason="too_slow")
            await _close(ws, 4408, "this viewer took no message for too long")
            return
        if item["type"] == "closed":
            await _close(ws, close_code(item), item.get("reason", "ended"))
            return


async def _close(ws: WebSocket, code: int, reason: str) -> None:
    try:
        await asyncio.wait_for(ws.close(code=code, reason=reason[:120]), SEND_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - the client is gone already: nothing left to tell it
        pass


# Decorated here, at import, and last in the module: Serve rewrites the routes for the class and freezes
# the app right away (by value), so everything the routes use must exist by then, in every replica.
@serve.ingress(app)
class Ingress:
    """Serve deployment class (made a deployment in serving/app.py)."""

    def __init__(self, cfg: dict, denoiser, decoder, llm, speech, asr, placement=None) -> None:
        bind_replica_server_to_node_address()
        self.cfg = LiveTalkConfig.model_validate(cfg)
        self.handles = {"denoiser": denoiser, "decoder": decoder, "llm": llm, "speech": speech, "asr": asr}
        timeout = self.cfg.serve.stage_timeout_s
        self.placement = PlacementClient(placement, timeout) if placement is not None else None
        self.holder = replica_actor_name() if placement is not None else "local"  # names this Ingress's leases
        self.sessions: dict[str, Live] = {}
        self.reaper: asyncio.Task | None = None
        self.renewer: asyncio.Task | None = None
        self.releasing: set[asyncio.Task] = set()  # stage releases of ended sessions, still running
        self.starting = 0  # sessions being created: counted against the cap before the first await
        self.ready = False  # every stage has answered once (see /healthz)
        app.state.token = self.cfg.serve.token  # for the auth middleware, which runs before a body is read

    async def check_health(self) -> None:
        """Serve's periodic health check (every 10 s) also refreshes the sessions gauge."""
        metrics.record(metrics.SERVE_SESSIONS, len(self.sessions), deployment="Ingress")

    # ---------------------------------------------------------------- helpers
    async def _stages_waiting(self, timeout_s: float = 1.0) -> list[str]:
        """The stages that have not answered a call yet (still loading their models, or unable to start)."""
        h = self.handles
        calls = {
            "Denoiser": h["denoiser"].session_count.remote(),
            "VAEDecoder": h["decoder"].session_count.remote(),
            "LLM": h["llm"].ping.remote(),
            "Speech": h["speech"].ping.remote(),
            "ASR": h["asr"].ping.remote(),
        }
        if self.placement is not None:  # it answers at once, but has no slots until each stage has reported
            calls["Placement"] = self._placement_ready()

        async def answers(call) -> bool:
            try:
                await asyncio.wait_for(call, timeout_s)
                return True
            except Exception:  # noqa: BLE001 - still starting (or broken): not ready either way
                return False

        done = await asyncio.gather(*(answers(call) for call in calls.values()))

        return [stage for stage, ok in zip(calls, done, strict=True) if not ok]

    def _auth(self, request: Request | WebSocket) -> None:
        if not token_ok(request, self.cfg.serve.token):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    def _origin_ok(self, ws: WebSocket) -> bool:
        """A browser page may open a session's WebSocket only from this server's own origin or an allowed one
        (cross-site WebSocket hijacking); clients that send no Origin (not browsers) are not affected."""
        origin = ws.headers.get("origin")
        if origin is None:
            return True
        own = {f"http://{ws.headers.get('host', '')}", f"https://{ws.headers.get('host', '')}"}
        return origin in own or origin in self.cfg.serve.allowed_origins

    def _live(self, session_id: str) -> Live:
        live = self.sessions.get(session_id)
        if live is None:
            raise HTTPException(404, f"unknown session {session_id}")
        return live

    async def _placement_ready(self) -> None:
        if not await self.placement.call("ready"):
            raise RuntimeError("no replica of a stage has reported to Placement yet")

    def _ensure_reaper(self) -> None:
        if self.reaper is None:
            self.reaper = asyncio.create_task(self._reap_forever())
            if self.placement is not None:
                self.renewer = asyncio.create_task(self._renew_forever())

    async def _reap_forever(self) -> None:
        """Release sessions nobody uses: no client message and no read by any viewer for `session_idle_s` (a
        connected viewer that stopped reading counts as gone; checked often enough that it is released within
        `session_idle_s` of its last sign of life), and ended sessions no viewer is reading."""
        idle_s = self.cfg.serve.session_idle_s
        every = min(max(idle_s / 10, 0.5), 15.0)
        while True:
            await asyncio.sleep(every)
            for sid, live in list(self.sessions.items()):
                ended = live.driver.closed.is_set() and not live.driver.subscribers
                if ended or live.driver.idle_s() > idle_s - every:
                    await self._release(sid)

    async def _renew_forever(self) -> None:
        """This Ingress's heartbeat to Placement: the leases of the sessions it streams (a lease not renewed for
        `lease_ttl_s` is freed: its Ingress died). Queued sessions keep their place by asking for it."""
        every = self.cfg.serve.admission.lease_ttl_s / 3
        while True:
            await asyncio.sleep(every)
            leases = {sid: live.leased() for sid, live in self.sessions.items() if live.queue is None}
            try:
                await self.placement.call("renew", self.holder, leases)
            except Exception:  # noqa: BLE001 - Placement restarting: the next renewal rebuilds its leases
                pass

    async def _release(self, session_id: str, reason: str = "ended") -> None:
        """End a session at once for its viewers; its stages are freed in the background (a busy replica answers
        only after its current batch), so DELETE returns in well under a second."""
        live = self.sessions.pop(session_id, None)
        if live is None:
            return
        await live.stop(reason)
        task = asyncio.create_task(live.release())
        self.releasing.add(task)
        task.add_done_callback(self.releasing.discard)

    async def end_sessions(self, reason: str = "server_shutdown") -> int:
        """End every session of this replica (before the server stops): viewers get `closed` and a close code
        instead of a dropped connection. Returns how many there were."""
        ids = list(self.sessions)
        await asyncio.gather(*(self._release(sid, reason) for sid in ids))
        if self.releasing:
            await asyncio.wait(set(self.releasing), timeout=RELEASE_TIMEOUT_S)
        return len(ids)

    # ---------------------------------------------------------------- routes
    @app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """200 once every stage has answered a call (a load balancer, `livetalk serve` and the load test send
        no session to an app whose models are still loading), 503 until then, naming the stages not ready."""
        if not self.ready:
            waiting = await self._stages_waiting()
            self.ready = not waiting
            if waiting:
                return JSONResponse({"status": "starting", "waiting_for": waiting}, status_code=503)
        return JSONResponse({"status": "ok"})  # no session count: /healthz answers anyone

    @app.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(resources.files("livetalk_ray.serving").joinpath("web/index.html").read_text())

    @app.get("/app.js")
    async def script(self) -> Response:
        body = resources.files("livetalk_ray.serving").joinpath("web/app.js").read_text()
        return Response(body, media_type="text/javascript")

    @app.get("/v1/portraits")
    async def list_portraits(self, request: Request) -> dict:
        self._auth(request)
        return {"portraits": list(portraits()), "model": model_note(self.cfg)}

    @app.get("/v1/portraits/{name}.png")
    async def get_portrait(self, name: str, request: Request) -> Response:
        self._auth(request)
        if name not in portraits():
            raise HTTPException(404, f"unknown portrait {name!r}; see GET /v1/portraits")
        return Response(portrait_png(name), media_type="image/png")

    @app.post("/v1/sessions", status_code=201)
    async def create_session(
        self,
        request: Request,
        response: Response,
        image: UploadFile | None = File(None, description="reference portrait (PNG/JPEG/WebP...)"),
        portrait: str | None = Form(None, description="or the name of a bundled portrait"),
        persona: str = Form("a friendly assistant", max_length=500),
        prompt: str = Form("A person talks to the camera.", max_length=500),
        seed: int = Form(0, ge=0, le=2**63 - 1),
        mode: Literal["conversation", "puppet"] | None = Form(
            None, description="conversation: your audio is heard and answered; puppet: it moves the lips (serve.mode)"
        ),
    ) -> dict:
        self._auth(request)
        s = self.cfg.serve
        if len(self.sessions) + self.starting >= s.max_sessions:  # checked and reserved with no await between
            raise HTTPException(503, f"this server holds {s.max_sessions} sessions", headers={"Retry-After": "10"})
        self.starting += 1
        try:
            reference = await self._reference(image, portrait)
            session_id = secrets.token_urlsafe(12)
            persona = persona.strip() or "a friendly assistant"
            spec = SessionSpec(session_id, reference, persona, prompt, seed, mode or self.cfg.serve.mode)
            live = Live(spec, self.cfg, self.handles, self.placement)
            queue = await self._admit(live)
            if queue is None:
                try:
                    await asyncio.gather(live.open_chat(), live.open_ear())
                except StageLost as lost:
                    await live.release()
                    raise HTTPException(503, f"{lost}; try again", headers={"Retry-After": "10"}) from None
            self.sessions[session_id] = live
        finally:
            self.starting -= 1
        if queue is None:
            live.start()
        else:
            live.wait_for_slots(self.holder, queue)
        self._ensure_reaper()
        base = f"{request.scope.get('root_path', '')}/v1/sessions/{session_id}"  # behind a route prefix too
        if queue is not None:  # 202: accepted, streams once slots free up (`queued` events on the WebSocket)
            response.status_code = 202
        return {
            "queue": queue,
            "session_id": session_id,
            "fps": self.cfg.video.fps,
            "sample_rate": self.cfg.audio.sample_rate,
            "size": [self.cfg.video.width, self.cfg.video.height],
            "mode": spec.mode,
            "ws": f"{base}/ws",
            "stream": f"{base}/stream",
        }

    async def _admit(self, live: Live) -> dict | None:
        """Lease slots for a new session: None when it may stream now, its place in the queue when it must wait;
        a full queue is a 503 whose Retry-After says when to come back."""
        if self.placement is None:
            return None
        sid, retry = live.spec.session_id, str(self.cfg.serve.admission.retry_after_s)
        try:
            answer = await self.placement.call("admit", sid, self.holder)
        except Exception:  # noqa: BLE001 - Placement restarting
            raise HTTPException(503, "placement is restarting; try again", headers={"Retry-After": retry}) from None
        if "full" in answer:
            metrics.record(metrics.SERVE_ADMISSIONS, outcome="refused")
            full = answer["full"]
            wait = max(int(self.cfg.serve.admission.retry_after_s), int(full["estimated_wait_s"] or 0))
            detail = f"every real-time slot is taken and {full['queue']} sessions are waiting; try again later"
            raise HTTPException(503, detail, headers={"Retry-After": str(wait)})
        if "lease" in answer:
            metrics.record(metrics.SERVE_ADMISSIONS, outcome="admitted")
            live.place(answer["lease"])
            return None
        metrics.record(metrics.SERVE_ADMISSIONS, outcome="queued")
        return answer["queued"]

    async def _reference(self, image: UploadFile | None, portrait: str | None) -> bytes:
        """The reference image's bytes, checked here (format, size, pixel bombs); the Denoiser decodes them."""
        s = self.cfg.serve
        if (image is None) == (portrait is None):
            raise HTTPException(400, "send exactly one of: an `image` file upload, a `portrait` name")
        if portrait is not None:
            if portrait not in portraits():
                raise HTTPException(400, f"unknown portrait {portrait!r}; see GET /v1/portraits")
            data, name = portrait_png(portrait), portrait
        else:
            data, name = await image.read(s.max_image_bytes + 1), image.filename or "the upload"
            if len(data) > s.max_image_bytes:
                raise HTTPException(413, f"{name} is larger than {s.max_image_bytes} bytes")
        try:  # in a thread: a large image must not stall every other session on this event loop
            await asyncio.to_thread(read_image, data, name, **s.image_limits)
        except ImageError as exc:
            raise HTTPException(415 if "cannot read" in str(exc) else 400, str(exc)) from None
        return data

    @app.get("/v1/sessions/{session_id}")
    async def session_status(self, session_id: str, request: Request) -> dict:
        self._auth(request)
        return self._live(session_id).status()

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(self, session_id: str, request: Request) -> dict:
        self._auth(request)
        self._live(session_id)
        await self._release(session_id)
        return {"session_id": session_id, "released": True}

    @app.get("/v1/sessions/{session_id}/stream")
    async def mjpeg(self, session_id: str, request: Request) -> StreamingResponse:
        self._auth(request)
        driver = self._live(session_id).driver

        async def frames():
            subscriber = driver.subscribe()
            try:
                while True:
                    item = await subscriber.get()
                    if isinstance(item, dict):
                        if item["type"] == "closed":
                            return
                        continue
                    header, jpegs, _ = decode_block(item)
                    for jpeg in jpegs:
                        yield b"--frame\r\nContent-Type: image/jpeg\r\n\r\n" + jpeg + b"\r\n"
                        await asyncio.sleep(1 / header["fps"])  # an <img> shows frames as they arrive
            finally:
                driver.unsubscribe(subscriber)

        return StreamingResponse(frames(), media_type="multipart/x-mixed-replace; boundary=frame")

    @app.websocket("/v1/sessions/{session_id}/ws")
    async def websocket(self, ws: WebSocket, session_id: str) -> None:
        await ws.accept()  # then refuse with a close code a client can read (a refused handshake is a bare 403)
        if not self._origin_ok(ws):
            await ws.close(code=4403, reason="this page's origin may not open sessions (serve.allowed_origins)")
            return
        try:
            self._auth(ws)
        except HTTPException as exc:
            await ws.close(code=4401, reason=exc.detail)
            return
        live = self.sessions.get(session_id)
        if live is None:
            await ws.close(code=4404, reason=f"unknown session {session_id}")
            return
        subscriber = live.subscribe()
        sender = asyncio.create_task(_send_all(ws, subscriber))
        receiver = asyncio.create_task(live.receive(ws))
        try:  # until the client leaves or the session (or this viewer) has ended and the socket is closed
            await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            live.driver.unsubscribe(subscriber)
            for task in (sender, receiver):
                task.cancel()
            await asyncio.gather(sender, receiver, return_exceptions=True)
