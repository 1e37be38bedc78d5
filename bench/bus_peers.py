"""The bus's peers on this machine, measured the way bench/bus.sh measures Gantry: acknowledged
publishes per second with IN_FLIGHT publishers (256-byte messages), and publish -> consumed
latency at RATE messages/s. Medians of ROUNDS rounds.

  - NATS JetStream (nats-py): a file stream, publish acks; a push consumer for latency.
  - Redis Streams (redis-py asyncio) on a private redis-server with appendonly yes and
    appendfsync always (started here on a free port in a temporary directory, stopped by PID):
    XADD answers; XREAD BLOCK for latency.
  - RabbitMQ (aio-pika) with publisher confirms on a durable queue (persistent messages);
    a consumer for latency. Skipped when no broker answers.

  python3 bench/bus_peers.py NATS_URL SECONDS ROUNDS IN_FLIGHT RATE [RABBIT_URL]
"""
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

NATS_URL, SECS, ROUNDS, IN_FLIGHT, RATE = (sys.argv[1], float(sys.argv[2]), int(sys.argv[3]),
                                         int(sys.argv[4]), int(sys.argv[5]))
RABBIT_URL = sys.argv[6] if len(sys.argv) > 6 else "amqp://guest:guest@127.0.0.1:5672/"
BODY = b"x" * 256


async def rate_of(publish_one):
    done = 0
    stop = False

    async def worker():
        nonlocal done
        while not stop:
            await publish_one()
            done += 1

    tasks = [asyncio.create_task(worker()) for _ in range(IN_FLIGHT)]
    await asyncio.sleep(0.3)
    t0, n0 = time.perf_counter(), done
    await asyncio.sleep(SECS)
    r = (done - n0) / (time.perf_counter() - t0)
    stop = True
    await asyncio.gather(*tasks, return_exceptions=True)
    return r


async def latency_of(publish_at, arrivals):
    """publish_at(i) publishes message i; arrivals[i] is set by the consumer."""
    n = int(RATE * SECS)
    started = {}
    t0 = time.perf_counter()
    pubs = []
    for i in range(n):
        due = t0 + i / RATE
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        started[i] = time.perf_counter()
        pubs.append(asyncio.create_task(publish_at(i)))
    await asyncio.gather(*pubs)
    deadline = time.perf_counter() + 10
    while len(arrivals) < n and time.perf_counter() < deadline:
        await asyncio.sleep(0.02)
    lat = sorted((arrivals[i] - started[i]) * 1e6 for i in started if i in arrivals)
    return lat


def pct(v, p):
    return v[round((len(v) - 1) * p)] if v else float("nan")


async def nats_round():
    import nats
    nc = await nats.connect(NATS_URL)
    js = nc.jetstream()
    name = f"BUSPEER{os.getpid()}"
    subj = f"buspeer.{os.getpid()}"
    await js.add_stream(name=name, subjects=[subj + ".>"], storage="file")
    try:
        rate = await rate_of(lambda: js.publish(subj + ".t", BODY))
        arrivals = {}

        async def on_msg(m):
            arrivals[int(m.header["i"])] = time.perf_counter()
            await m.ack()

        await js.subscribe(subj + ".l", cb=on_msg, manual_ack=True)
        lat = await latency_of(lambda i: js.publish(subj + ".l", BODY, headers={"i": str(i)}), arrivals)
        return rate, lat
    finally:
        await js.delete_stream(name)
        await nc.close()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


async def redis_round(port):
    import redis.asyncio as redis
    r = redis.Redis(host="127.0.0.1", port=port, max_connections=IN_FLIGHT + 8)
    key = f"bench:{os.getpid()}"
    rate = await rate_of(lambda: r.xadd(key, {"d": BODY}))
    arrivals = {}
    lkey = key + ":lat"
    stop = False

    async def reader():
        rr = redis.Redis(host="127.0.0.1", port=port)
        last = "$"
        while not stop:
            got = await rr.xread({lkey: last}, block=200, count=1000)
            for _, entries in got:
                for eid, fields in entries:
                    arrivals[int(fields[b"i"])] = time.perf_counter()
                    last = eid
        await rr.aclose()

    task = asyncio.create_task(reader())
    await asyncio.sleep(0.2)
    lat = await latency_of(lambda i: r.xadd(lkey, {"d": BODY, "i": str(i)}), arrivals)
    stop = True
    await task
    await r.delete(key, lkey)
    await r.aclose()
    return rate, lat


async def rabbit_round():
    import aio_pika
    conn = await aio_pika.connect_robust(RABBIT_URL, timeout=3)
    try:
        ch = await conn.channel(publisher_confirms=True)
        q = await ch.declare_queue(f"bench-{os.getpid()}", durable=True)
        lq = await ch.declare_queue(f"bench-lat-{os.getpid()}", durable=True)

        def pub(queue, headers=None):
            return ch.default_exchange.publish(
                aio_pika.Message(BODY, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, headers=headers),
                routing_key=queue.name)

        rate = await rate_of(lambda: pub(q))
        arrivals = {}

        async def on_msg(m):
            async with m.process():
                arrivals[int(m.headers["i"])] = time.perf_counter()

        cch = await conn.channel()
        await cch.set_qos(prefetch_count=256)
        cq = await cch.get_queue(lq.name)
        await cq.consume(on_msg)
        lat = await latency_of(lambda i: pub(lq, {"i": i}), arrivals)
        await q.delete(if_unused=False, if_empty=False)
        await lq.delete(if_unused=False, if_empty=False)
        return rate, lat
    finally:
        await conn.close()


def report(name, rounds):
    if not rounds:
        print(f"{name:<17} unavailable")
        return
    rate = statistics.median(r for r, _ in rounds)
    p50 = statistics.median(pct(l, 0.5) for _, l in rounds)
    p99 = statistics.median(pct(l, 0.99) for _, l in rounds)
    print(f"{name:<17} publishes/s= {rate:>8.0f}  publish->consumed at {RATE}/s: p50= {p50:>7.0f}us p99= {p99:>7.0f}us")


async def main():
    results = {"nats jetstream": [], "redis aof always": [], "rabbitmq confirms": []}
    rdir = tempfile.mkdtemp()
    port = free_port()
    redis_proc = None
    if shutil.which("redis-server"):
        redis_proc = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", rdir,
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
    try:
        for i in range(ROUNDS):
            for name, f in (("nats jetstream", nats_round),
                            ("redis aof always", (lambda: redis_round(port)) if redis_proc else None),
                            ("rabbitmq confirms", rabbit_round)):
                if f is None:
                    continue
                try:
                    results[name].append(await asyncio.wait_for(f(), 120))
                except Exception as e:  # a peer that is not there is reported as such
                    print(f"{name}: {type(e).__name__}: {e}", file=sys.stderr)
            print(f"peers: round {i + 1} of {ROUNDS} done", file=sys.stderr)
    finally:
        if redis_proc:
            redis_proc.kill()
            redis_proc.wait()
        shutil.rmtree(rdir, ignore_errors=True)
    for name, rounds in results.items():
        report(name, rounds)


asyncio.run(main())
