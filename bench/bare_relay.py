"""The floor: the least an aiohttp relay can do, to calibrate tallygate against (not a product).

    python bench/bare_relay.py --port 8080 --upstream 8001 [--gzip]

One upstream session with keep-alive, the request body read and forwarded, the response relayed
read by read, gzip (level 1, synced per read) when asked and accepted. No routing, no header
policy, no limits, no metering, no record. The issue's reference for this machine: "a bare
aiohttp relay with per-read gzip and no metering reaches ~17% of nginx" and "spends ~0.19
CPU-seconds per 1,000 streams". bench/cpu.py measures tallygate's distance from it.
"""

from __future__ import annotations

import argparse
import asyncio
import zlib

import aiohttp
import uvloop
from aiohttp import web

_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


async def serve(port: int, upstream: int, gzip: bool) -> None:
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
    base = f"http://127.0.0.1:{upstream}"

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with session.request(
            request.method, base + request.raw_path, headers=headers, data=body
        ) as up:
            response = web.StreamResponse(status=up.status)
            for key, value in up.headers.items():
                if key.lower() not in _HOP:
                    response.headers[key] = value
            encoder = None
            if gzip and "gzip" in request.headers.get("Accept-Encoding", ""):
                encoder = zlib.compressobj(1, zlib.DEFLATED, 31)
                response.headers["Content-Encoding"] = "gzip"
            await response.prepare(request)
            while chunk := await up.content.readany():
                if encoder is not None:
                    chunk = encoder.compress(chunk) + encoder.flush(zlib.Z_SYNC_FLUSH)
                await response.write(chunk)
            if encoder is not None:
                await response.write(encoder.flush())
            await response.write_eof()
            return response

    server = web.Server(handle)
    loop = asyncio.get_running_loop()
    await loop.create_server(server, "127.0.0.1", port, backlog=4096)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", type=int, required=True)
    parser.add_argument("--gzip", action="store_true")
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.upstream, args.gzip))


if __name__ == "__main__":
    main()
