"""Runs in Serve's HTTP proxy: a session's WebSocket always ends with the protocol's last events and a close frame.

The proxy relays each WebSocket to an Ingress replica. If that replica dies, Serve ends the relay without a close
frame, and the client sees an abnormal closure (1006) with no reason. `SessionCloseGuard` watches the relay: when
it ends after the handshake with no close sent and the client still there, the client gets an `error` event
(`session_lost`), a `closed` event and close code 1011.

Serve loads proxy middlewares from the function named by `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`, read by
the proxy process at start-up: `PROXY_CALLBACK_ENV` below, set in the environment of every Ray node (the
`livetalk` CLI does it for the Ray it starts; the cluster manifests set it for theirs).
"""

from __future__ import annotations

import json

from starlette.middleware import Middleware

from livetalk_ray.serving.protocol import error_event

PROXY_CALLBACK_ENV = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "livetalk_ray.serving.proxy.proxy_middlewares"}
LOST_MESSAGE = "the server lost this session (its Ingress replica stopped); open a new one"


class SessionCloseGuard:
    """Pure ASGI middleware (no effect on HTTP requests)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        seen = {"accepted": False, "closed": False, "client_left": False}

        async def watched_receive():
            message = await receive()
            if message["type"] == "websocket.disconnect":
                seen["client_left"] = True
            return message

        async def watched_send(message) -> None:
            if message["type"] == "websocket.accept":
                seen["accepted"] = True
            elif message["type"] == "websocket.close":
                seen["closed"] = True
            await send(message)

        try:
            await self.app(scope, watched_receive, watched_send)
        finally:
            if seen["accepted"] and not seen["closed"] and not seen["client_left"]:
                await _end_lost_session(send)


async def _end_lost_session(send) -> None:
    try:
        await send({"type": "websocket.send", "text": json.dumps(error_event("session_lost", LOST_MESSAGE))})
        await send({"type": "websocket.send", "text": json.dumps({"type": "closed", "reason": "session_lost"})})
        await send({"type": "websocket.close", "code": 1011, "reason": "session lost"})
    except Exception:  # noqa: BLE001 - the connection went down with the replica: nothing left to tell
        pass


def proxy_middlewares() -> list[Middleware]:
    return [Middleware(SessionCloseGuard)]
