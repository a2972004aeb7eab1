"""datasync as a library inside another asyncio program (the README's "From another asyncio program").

DATASYNC_KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:9092 python examples/embedded.py
"""

from __future__ import annotations

import asyncio
import os
import uuid

from datasync import ChangeEvent, DataSync, JsonCodec, KafkaSettings, Plugin, ResyncEvent, TopicSpec


class Interfaces(Plugin):
    async def resync(self, event: ResyncEvent) -> None:
        print("resync:", {prefix: [kv.key for kv in items] for prefix, items in event.values.items()})

    async def change(self, event: ChangeEvent) -> None:
        for ch in event.changes:
            print("change:", ch.op, ch.key, ch.prev_value, "->", ch.value)


async def main() -> None:
    engine = DataSync(KafkaSettings(bootstrap_servers=os.environ["DATASYNC_KAFKA__BOOTSTRAP_SERVERS"]))
    engine.add_topic(TopicSpec(name="demo.config", partitions=3, value="json"), JsonCodec())
    out = engine.add_publisher("config", "demo.config")
    registration = engine.watch("interfaces", Interfaces(), {"demo.config": ["config/interfaces/"]})
    await engine.start()  # creates missing topics, then resyncs and streams in the background
    try:
        async with asyncio.timeout(60):  # never hang, whatever the broker does
            await engine.wait_ready()  # every plugin resynced
            # A value no earlier run wrote: a put equal to the current value is no change.
            await out.put("config/interfaces/eth0", {"mtu": 9000, "run": uuid.uuid4().hex})
            await engine.wait_for(lambda: engine.status()["interfaces"].changes_applied > 0)
        print(engine.status())
        await registration.close()
    finally:
        await engine.stop()


if __name__ == "__main__":
    asyncio.run(main())
