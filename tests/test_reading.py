"""Reading state: the paged key listing over HTTP, read authorisation, and tables through a plugin's context."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiokafka import AIOKafkaProducer

from datasync import ChangeEvent, DataSync, Plugin, PluginContext, ResyncEvent
from datasync.bindings import TopicSpec
from datasync.codecs import JsonCodec, StringCodec
from datasync.settings import HttpSettings, KafkaSettings
from datasync.web import HttpServer

from conftest import put_all
from recorder import Recorder

TOKEN = "r" * 20


async def call(method: str, url: str, token: str | None = None, **kwargs: Any) -> tuple[int, Any, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(headers=headers) as session, session.request(method, url, **kwargs) as response:
        return response.status, await response.json(), response.headers


async def test_key_listing_pages_in_key_order(bootstrap: str, topic: str, producer: AIOKafkaProducer) -> None:
    engine = DataSync(KafkaSettings(bootstrap_servers=bootstrap))
    engine.add_topic(TopicSpec(name=topic, partitions=3, value="json"), JsonCodec())
    engine.add_topic(TopicSpec(name=f"{topic}.raw", value="string"), StringCodec())
    plugin = Recorder("p")
    engine.watch("p", plugin, {topic: [""], f"{topic}.raw": [""]})
    await engine.start()
    settings = HttpSettings(port=0, reads_need_token=True, writes_enabled=True, token=TOKEN)
    http = HttpServer(engine, settings)
    await http.start()
    base = f"http://127.0.0.1:{http.port}/v1/topics/{topic}"
    try:
        await put_all(producer, topic, [(f"a/{i}", f'{{"n": {i}}}', i % 3) for i in (3, 1, 5, 2, 4)] + [("b/1", "{}")])
        async with asyncio.timeout(20):
            await engine.wait_ready()
            await engine.wait_for(lambda: len(plugin.view) == 6)

        status, body, headers = await call("GET", f"{base}/keys?prefix=a/")
        assert status == 401 and headers["WWW-Authenticate"] == 'Bearer realm="datasync"'
        status, _, headers = await call("GET", f"{base}/keys/a/1", token="wrong")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
        status, _, headers = await call("PUT", f"{base}/keys/a/9", json={"n": 9})
        assert status == 401 and "WWW-Authenticate" in headers

        status, body, _ = await call("GET", f"{base}/keys?prefix=a/&limit=2", TOKEN)
        assert status == 200 and body == {"topic": topic, "prefix": "a/", "keys": ["a/1", "a/2"], "next": "a/2"}
        _, body, _ = await call("GET", f"{base}/keys?prefix=a/&limit=2&after=a/2&values=true", TOKEN)
        assert [(i["key"], i["value"]) for i in body["items"]] == [("a/3", {"n": 3}), ("a/4", {"n": 4})]
        assert all(isinstance(i["revision"], int) and isinstance(i["partition"], int) for i in body["items"])
        _, body, _ = await call("GET", f"{base}/keys?prefix=a/&limit=2&after=a/4", TOKEN)
        assert body["keys"] == ["a/5"] and "next" not in body
        _, body, _ = await call("GET", f"{base}/keys", TOKEN)
        assert body["keys"] == ["a/1", "a/2", "a/3", "a/4", "a/5", "b/1"]

        assert (await call("GET", f"{base}/keys?limit=0", TOKEN))[0] == 400
        assert (await call("GET", f"{base}/keys?limit=x", TOKEN))[0] == 400
        assert (await call("GET", f"{base}/keys?values=maybe", TOKEN))[0] == 400
        assert (await call("GET", f"http://127.0.0.1:{http.port}/v1/topics/nope/keys", TOKEN))[0] == 404
        assert (await call("GET", f"{base}/keys/a/1", TOKEN))[1]["value"] == {"n": 1}
    finally:
        await http.stop()
        await engine.stop()


class Inventory(Plugin):
    """Watches orders; checks each against the products table it does not watch itself."""

    async def start(self, ctx: PluginContext) -> None:
        self.products = ctx.table(ctx.settings["products"])
        self.seen: list[tuple[str, Any]] = []

    async def resync(self, event: ResyncEvent) -> None:
        self.seen = [(kv.key, self.products.get(kv.value)) for items in event.values.values() for kv in items]

    async def change(self, event: ChangeEvent) -> None:
        self.seen += [(c.key, self.products.get(c.value)) for c in event.changes if c.op == "put"]


async def test_a_plugin_reads_another_table_through_its_context(
    bootstrap: str, topic: str, producer: AIOKafkaProducer
) -> None:
    products, orders = f"{topic}.products", f"{topic}.orders"
    engine = DataSync(KafkaSettings(bootstrap_servers=bootstrap))
    engine.add_topic(TopicSpec(name=products, value="string"), StringCodec())
    engine.add_topic(TopicSpec(name=orders, value="string"), StringCodec())
    engine.watch("products", Recorder("products"), {products: [""]})
    inventory = Inventory()
    engine.watch("inventory", inventory, {orders: [""]}, {"products": products})
    await engine.start()
    try:
        await put_all(producer, products, [("p1", "apple"), ("p2", "pear")])
        await put_all(producer, orders, [("o1", "p1")])
        async with asyncio.timeout(20):
            await engine.wait_ready()
        # the first resync may predate the records: wait for the order either way
        async with asyncio.timeout(20):
            await engine.wait_for(lambda: ("o1", "apple") in inventory.seen)
        await put_all(producer, products, [("p3", "plum")])
        await put_all(producer, orders, [("o2", "p3"), ("o3", "nope")])
        async with asyncio.timeout(20):
            await engine.wait_for(lambda: len(inventory.seen) >= 3 and inventory.seen[-1][0] == "o3")
        assert inventory.seen[-2:] == [("o2", "plum"), ("o3", None)]
        view = inventory.products
        assert list(view) == ["p1", "p2", "p3"] and len(view) == 3 and view["p2"] == "pear"
        entry = view.entry("p3")
        assert entry is not None and entry.value == "plum" and entry.revision == 2
        assert [kv.key for kv in view.under("p", after="p1", limit=1)] == ["p2"]
        engine.request_resync("test")  # views follow the rebuilt tables
        async with asyncio.timeout(20):
            await engine.wait_for(lambda: engine.generation == 2 and not engine.rebuilding)
        assert view["p3"] == "plum" and "p9" not in view
    finally:
        await engine.stop()
