"""The lean pass-through on aiohttp's low-level server (`web.Server`): no Application, router,
signals or AppKeys; the same handler body as bench/baseline_proxy.py. What issue 13's lever
"aiohttp's low-level server" could save at most (variant `lean-lowlevel` of bench/budget.py).

    python bench/lean_lowlevel.py --port 8702 --upstream http://127.0.0.1:8700/api/connexus
"""

from __future__ import annotations

import argparse
import asyncio
import json
import urllib.parse

import baseline_proxy as lean
import uvloop
from aiohttp import ClientSession, ClientTimeout, TCPConnector, web


def handler_for(session: ClientSession, url: str) -> web.Server:
    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if request.method != "POST" or request.path != "/api/1/sms/out":
            return web.Response(status=404)
        form = await request.post()
        data = urllib.parse.urlencode({"to": form["to"], "body": form["body"]}).encode()
        async with session.post(url, data=data, headers=lean.HEADERS) as resp:
            answer = json.loads(await resp.read())
        if not answer.get("success"):
            return web.Response(status=502)
        return web.Response(status=204)

    return web.Server(handle, access_log=None)


async def serve(port: int, upstream: str) -> None:
    session = ClientSession(connector=TCPConnector(limit=100), timeout=ClientTimeout(total=10))
    runner = web.ServerRunner(handler_for(session, upstream.rstrip("/") + "/sms/out"))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        await asyncio.Event().wait()  # until the benchmark stops the process
    finally:
        await runner.cleanup()
        await session.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8702)
    parser.add_argument("--upstream", default="http://127.0.0.1:8700/api/connexus")
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.upstream))


if __name__ == "__main__":
    main()
