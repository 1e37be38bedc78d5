"""The peer of bench/registry.sh: how long a NATS JetStream KV put takes to reach a watcher of
the bucket (what a registry on NATS KV would see). Prints one line like registry_routable.

    python3 bench/nats_kv_watch.py [URL] [PUTS]
"""
import asyncio
import os
import sys
import time

import nats


async def main():
    url = sys.argv[1] if len(sys.argv) > 1 else "nats://127.0.0.1:4222"
    puts = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    nc = await nats.connect(url)
    js = nc.jetstream()
    bucket = f"gantry_bench_{os.getpid()}"
    kv = await js.create_key_value(bucket=bucket, history=1)
    got: asyncio.Queue = asyncio.Queue()
    watcher = await kv.watchall()

    async def read():
        async for e in watcher:
            if e is None:  # the marker after the initial values
                continue
            await got.put((e.key, time.perf_counter()))

    reader = asyncio.create_task(read())
    # Warm up, then measure put -> seen by the watcher.
    lat = []
    for i in range(puts + 100):
        key = f"svc{i % 1000}.inst{i}"
        t = time.perf_counter()
        await kv.put(key, b"{}")
        while True:
            k, seen = await asyncio.wait_for(got.get(), 5)
            if k == key:
                break
        if i >= 100:
            lat.append((seen - t) * 1e6)
    reader.cancel()
    await watcher.stop()
    await js.delete_key_value(bucket)
    await nc.close()
    lat.sort()
    p = lambda q: lat[round((len(lat) - 1) * q)]
    print(
        f"nats kv put -> watcher: n={len(lat)} p50={p(0.5):.1f}us p99={p(0.99):.1f}us max={lat[-1]:.1f}us"
    )


asyncio.run(main())
