"""A fast, dumb upstream for proxy benchmarks: a raw ASGI app for granian.

`GET /bytes/<n>` streams n bytes with a Content-Length (the 1 GiB memory run), a request with
a body gets `received=<n>` back once the body is drained (uploads), and anything else gets a
small fixed 200. Serve it with:

    granian --interface asgi --factory --no-ws --port 18091 benchmarks.upstream:app
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Message, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]

CHUNK = b"\xa5" * (256 * 1024)
FIXED = b'{"ok":true,"service":"upstream"}\n'
FIXED_HEADERS = [(b"content-type", b"application/json"),
                 (b"content-length", str(len(FIXED)).encode())]


def app() -> ASGIApp:
    async def serve(scope: Message, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await receive()  # startup
            await send({"type": "lifespan.startup.complete"})
            await receive()  # shutdown
            await send({"type": "lifespan.shutdown.complete"})
            return
        path: str = scope["path"]
        if path.startswith("/bytes/"):
            await stream(send, int(path[7:]))
            return
        received = 0
        while True:
            message = await receive()
            received += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        if received:
            body = f"received={received}\n".encode()
            headers = [(b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await send({"type": "http.response.start", "status": 200, "headers": FIXED_HEADERS})
        await send({"type": "http.response.body", "body": FIXED})

    return serve


async def stream(send: Any, size: int) -> None:
    headers = [(b"content-type", b"application/octet-stream"),
               (b"content-length", str(size).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    left = size
    while left > 0:
        piece = CHUNK if left >= len(CHUNK) else CHUNK[:left]
        left -= len(piece)
        await send({"type": "http.response.body", "body": piece, "more_body": left > 0})
    if size == 0:
        await send({"type": "http.response.body", "body": b""})
