"""A Connexus stub that answers `sms/out` after a fixed delay (issue 13 point 5: 150 ms).

    python bench/slow_stub.py --port 8702 --delay 0.15

`auth/token` answers at once. uvloop; the delay is an asyncio sleep, so thousands of calls
wait at once at little CPU.
"""

from __future__ import annotations

import argparse
import asyncio

import uvloop
from aiohttp import web

OUT = (
    b'{"success":true,"status":"accepted","message_id":"1158493","to":"6421234567",'
    b'"from":"552","parts":1}'
)
TOKEN = b'{"access_token":"wst_bench","token_type":"Bearer","expires_in":86400}'


def create_app(delay: float) -> web.Application:
    async def out(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(delay)
        return web.Response(body=OUT, content_type="application/json")

    async def token(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=TOKEN, content_type="application/json")

    app = web.Application()
    app.router.add_post("/api/connexus/sms/out", out)
    app.router.add_post("/api/connexus/auth/token", token)
    app.router.add_get("/api/connexus/auth/token", token)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8702)
    parser.add_argument("--delay", type=float, default=0.15)
    args = parser.parse_args()
    web.run_app(
        create_app(args.delay),
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
        backlog=4096,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
