"""The reference for send-path benchmarks: the leanest honest aiohttp pass-through (issue 13).

uvloop (the gateway's loop); `await request.post()`; take `to` and `body`;
`urllib.parse.urlencode` them to bytes; POST them with a constant header dict (bearer and form
Content-Type) over one shared ClientSession; `await resp.read()`; `json.loads`; check
`success`; 204. No auth, no store, no metrics, no log line: what bc-proxy's send path is
compared against while doing all of those.

    python bench/baseline_proxy.py --port 8701 --upstream http://127.0.0.1:8700/api/connexus
"""

from __future__ import annotations

import argparse
import json
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable

import uvloop
from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

SESSION = web.AppKey("session", ClientSession)
UPSTREAM = web.AppKey("upstream", str)
HEADERS = {
    "Authorization": "Bearer wst_bench",
    "Content-Type": "application/x-www-form-urlencoded",
}


async def send(request: web.Request) -> web.Response:
    form = await request.post()
    data = urllib.parse.urlencode({"to": form["to"], "body": form["body"]}).encode()
    async with request.app[SESSION].post(request.app[UPSTREAM], data=data, headers=HEADERS) as resp:
        answer = json.loads(await resp.read())
    if not answer.get("success"):
        return web.Response(status=502)
    return web.Response(status=204)


Handler = Callable[[web.Request], Awaitable[web.Response]]


def create_app(upstream: str, handler: Handler = send) -> web.Application:
    """The proxy's app: one shared ClientSession, `handler` on the legacy send path (the
    floor, bench/lean_durable.py, passes its own)."""
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/") + "/sms/out"

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        app[SESSION] = ClientSession(
            connector=TCPConnector(limit=100), timeout=ClientTimeout(total=10)
        )
        yield
        await app[SESSION].close()

    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/api/1/sms/out", handler)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8701)
    parser.add_argument("--upstream", default="http://127.0.0.1:8700/api/connexus")
    args = parser.parse_args()
    serve(create_app(args.upstream), args.port)


def serve(app: web.Application, port: int) -> None:
    """On 127.0.0.1, uvloop (the gateway's loop), no access log."""
    web.run_app(
        app, host="127.0.0.1", port=port, access_log=None, print=None, loop=uvloop.new_event_loop()
    )


if __name__ == "__main__":
    main()
