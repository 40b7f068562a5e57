"""The reference for send-path benchmarks: a minimal, honest aiohttp pass-through proxy.

One shared ClientSession; parse the form; drop the credentials; forward with a static bearer
header; read the JSON; answer 204. No auth check, no store, no metrics: what bc-proxy's send
path must match while doing all of those.

    python bench/baseline_proxy.py --port 8701 --upstream http://127.0.0.1:8700/api/connexus
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

SESSION = web.AppKey("session", ClientSession)
UPSTREAM = web.AppKey("upstream", str)
HEADERS = {"Authorization": "Bearer wst_bench"}


async def send(request: web.Request) -> web.Response:
    form = dict(request.query)
    form.update({k: v for k, v in (await request.post()).items() if isinstance(v, str)})
    form.pop("userId", None)
    form.pop("password", None)
    session = request.app[SESSION]
    async with session.post(request.app[UPSTREAM], data=form, headers=HEADERS) as resp:
        await resp.json()
    return web.Response(status=204)


def create_app(upstream: str) -> web.Application:
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/") + "/sms/out"

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        app[SESSION] = ClientSession(
            connector=TCPConnector(limit=100), timeout=ClientTimeout(total=10)
        )
        yield
        await app[SESSION].close()

    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/api/1/sms/out", send)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8701)
    parser.add_argument("--upstream", default="http://127.0.0.1:8700/api/connexus")
    args = parser.parse_args()
    web.run_app(
        create_app(args.upstream), host="127.0.0.1", port=args.port, access_log=None, print=None
    )


if __name__ == "__main__":
    main()
