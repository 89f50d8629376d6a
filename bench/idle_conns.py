#!/usr/bin/env python3
"""Opens N keep-alive connections to a proxy, sends one request on each and
reads its answer, then holds them all idle for HOLD seconds (or until
killed), so the caller can read the proxy's RSS.

  idle_conns.py PORT N TOKEN [HOLD]

Prints "ready <established> <answered>" once every connection was tried.
"""
import asyncio
import sys


async def one(port, request, held):
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(request)
        await w.drain()
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        if length:
            await asyncio.wait_for(r.readexactly(length), 10)
        held.append((r, w))
        return head.startswith(b"HTTP/1.1 ")
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
        return False


async def main():
    port, n, token = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    hold = float(sys.argv[4]) if len(sys.argv) > 4 else 60
    request = (f"GET /v1/models HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n\r\n").encode()
    held = []
    answered = 0
    # In batches, so the listen backlog is never the limit.
    for start in range(0, n, 500):
        results = await asyncio.gather(*(one(port, request, held) for _ in range(start, min(n, start + 500))))
        answered += sum(results)
    print(f"ready {len(held)} {answered}", flush=True)
    await asyncio.sleep(hold)
    for _, w in held:
        w.close()


if __name__ == "__main__":
    asyncio.run(main())
