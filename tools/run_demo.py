"""``make run``: the service on the example bindings, with demo data flowing.

Starts a local Kafka broker unless ``DATASYNC_KAFKA__BOOTSTRAP_SERVERS`` is
set, writes a few interfaces and routes, starts ``datasync run`` and then keeps
changing the desired state every two seconds so the log shows a resync first
and live changes after it. Ctrl-C stops everything.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sys
from pathlib import Path

from aiokafka import AIOKafkaProducer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from datasync.admin import prepare_topics  # noqa: E402
from datasync.bindings import load_bindings  # noqa: E402
from datasync.settings import KafkaSettings  # noqa: E402

from localkafka import LocalBroker  # noqa: E402

IFACES = "config/vpp/v2/interfaces/"
ROUTES = "config/vpp/v2/routes/"


def interface(name: str, mtu: int = 1500) -> dict[str, object]:
    return {"name": name, "enabled": True, "mtu": mtu, "ip_addresses": [f"10.0.{name[-1]}.1/24"]}


def route(dst: str, via: str) -> dict[str, object]:
    return {"dst_network": dst, "next_hop": "10.0.0.254", "outgoing_interface": via, "weight": 1}


async def produce_demo(bootstrap: str, stop: asyncio.Event) -> None:
    bindings = load_bindings(ROOT / "topics", ROOT / "schemas")
    await prepare_topics(KafkaSettings(bootstrap_servers=bootstrap), [t.spec for t in bindings.topics.values()], True)
    enc_if = bindings.topics["demo.interfaces"].codec.encode
    enc_rt = bindings.topics["demo.routes"].codec.encode
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for name in ("eth0", "eth1", "eth2"):
            await producer.send_and_wait("demo.interfaces", enc_if(interface(name)), key=(IFACES + name).encode())
        await producer.send_and_wait(
            "demo.routes", enc_rt(route("192.168.1.0/24", "eth1")), key=(ROUTES + "r1").encode()
        )
        for step in itertools.count(1):
            try:
                await asyncio.wait_for(stop.wait(), timeout=2)
                return
            except TimeoutError:
                pass
            if step % 3 == 1:
                await producer.send_and_wait(
                    "demo.interfaces", enc_if(interface("eth0", 1500 + step)), key=(IFACES + "eth0").encode()
                )
            elif step % 3 == 2:
                await producer.send_and_wait(
                    "demo.routes", enc_rt(route(f"172.16.{step}.0/24", "eth2")), key=(ROUTES + f"r{step}").encode()
                )
            else:
                await producer.send_and_wait("demo.routes", None, key=(ROUTES + f"r{step - 1}").encode())
    finally:
        await producer.stop()


async def main() -> int:
    bootstrap = os.environ.get("DATASYNC_KAFKA__BOOTSTRAP_SERVERS", "")
    broker = None
    if not bootstrap:
        print("no DATASYNC_KAFKA__BOOTSTRAP_SERVERS: starting a local Kafka broker...", flush=True)
        broker = await asyncio.to_thread(LocalBroker().start)
        bootstrap = broker.bootstrap
        print(f"local broker on {bootstrap}; to use the CLI against it:", flush=True)
    print(f"export DATASYNC_KAFKA__BOOTSTRAP_SERVERS={bootstrap}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    service = None
    demo = asyncio.create_task(produce_demo(bootstrap, stop))
    try:
        await asyncio.sleep(1)  # let the seed data land first, so the resync shows it
        env = dict(os.environ, DATASYNC_KAFKA__BOOTSTRAP_SERVERS=bootstrap)
        service = await asyncio.create_subprocess_exec(sys.executable, "-m", "datasync.cli", "run", cwd=ROOT, env=env)
        waiter = asyncio.create_task(service.wait())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait([demo, waiter, stopped], return_when=asyncio.FIRST_COMPLETED)
        stop.set()
        await demo
        return service.returncode or 0  # the service's own failure (say, port 8080 taken) fails `make run`
    finally:
        if service is not None and service.returncode is None:
            service.send_signal(signal.SIGTERM)
            await asyncio.wait_for(service.wait(), timeout=30)
        if broker is not None:
            await asyncio.to_thread(broker.stop)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
