"""Declared topics on the broker: create the missing ones, learn their partitions, check them."""

from __future__ import annotations

import asyncio
import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import TopicAlreadyExistsError

from datasync.bindings import TopicSpec
from datasync.errors import TopicError
from datasync.settings import KafkaSettings

log = logging.getLogger(__name__)

UNKNOWN_TOPIC = 3  # Kafka error code UNKNOWN_TOPIC_OR_PARTITION
# The one mismatch the service refuses to run with: old values would never be compacted away.
COMPACTED_ON_DELETE = " (a state topic must be compacted)"
DOES_NOT_EXIST = ": does not exist"


def topic_configs(spec: TopicSpec) -> dict[str, str]:
    configs = {"cleanup.policy": "compact" if spec.compacted else "delete"}
    configs.update(spec.config)
    return configs


async def prepare_topics(kafka: KafkaSettings, specs: list[TopicSpec], create: bool) -> dict[str, int]:
    """Create the missing topics of ``specs`` (if ``create``); return each topic's partition count.

    Raises TopicError naming a topic that does not exist and may not be created.
    """
    admin = AIOKafkaAdminClient(**kafka.client_options())
    await admin.start()
    try:
        partitions = await _partitions(admin, [s.name for s in specs])
        missing = [s for s in specs if s.name not in partitions]
        if missing and not create:
            raise TopicError(f"topic(s) {', '.join(s.name for s in missing)} do not exist (creation is disabled)")
        if missing:
            brokers = len((await admin.describe_cluster())["brokers"])
            new = [
                NewTopic(s.name, s.partitions, s.replication_factor or min(3, brokers), topic_configs=topic_configs(s))
                for s in missing
            ]
            try:
                await admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass  # created concurrently by someone else: fine
            for s in missing:
                log.info(
                    "created topic %s (%d partitions, %s)", s.name, s.partitions, topic_configs(s)["cleanup.policy"]
                )
            for _ in range(50):  # metadata reaches every broker shortly after creation
                partitions = await _partitions(admin, [s.name for s in specs])
                if len(partitions) == len(specs):
                    break
                await asyncio.sleep(0.1)
            else:
                raise TopicError(f"created topics did not appear: {[s.name for s in missing]}")
        return partitions
    finally:
        await admin.close()


async def _partitions(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, int]:
    # Describe only topics that exist: describing a missing one can auto-create it with default settings.
    existing = set(await admin.list_topics())
    names = [n for n in names if n in existing]
    if not names:
        return {}
    found = {}
    for topic in await admin.describe_topics(names):
        if topic["error_code"] == 0 and topic["partitions"]:
            found[topic["topic"]] = len(topic["partitions"])
        elif topic["error_code"] != UNKNOWN_TOPIC:
            raise TopicError(f"cannot describe topic {topic['topic']}: Kafka error {topic['error_code']}")
    return found


async def missing_topics(kafka: KafkaSettings, names: list[str]) -> list[str]:
    admin = AIOKafkaAdminClient(**kafka.client_options())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
    finally:
        await admin.close()
    return [n for n in names if n not in existing]


async def check_topics(kafka: KafkaSettings, specs: list[TopicSpec]) -> list[str]:
    """Compare declared topics with the broker: existence, partitions, cleanup policy."""
    admin = AIOKafkaAdminClient(**kafka.client_options())
    await admin.start()
    try:
        partitions = await _partitions(admin, [s.name for s in specs])
        present = [s for s in specs if s.name in partitions]
        policies = await _cleanup_policies(admin, [s.name for s in present])
    finally:
        await admin.close()
    problems = [f"topic {s.name}{DOES_NOT_EXIST}" for s in specs if s.name not in partitions]
    for s in present:
        if partitions[s.name] != s.partitions:
            problems.append(f"topic {s.name}: has {partitions[s.name]} partitions, declared {s.partitions}")
        policy = policies.get(s.name)
        if policy is None:
            problems.append(f"topic {s.name}: cleanup.policy could not be read (not authorised?)")
        elif s.compacted and "compact" not in policy:
            problems.append(f"topic {s.name}: declared compacted but cleanup.policy={policy}{COMPACTED_ON_DELETE}")
        elif not s.compacted and "compact" in policy:
            problems.append(f"topic {s.name}: declared not compacted but cleanup.policy={policy}")
    return problems


async def _cleanup_policies(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, str]:
    return await _topic_config(admin, names, "cleanup.policy")


async def delete_retention_ms(kafka: KafkaSettings, names: list[str]) -> dict[str, int]:
    """Each topic's ``delete.retention.ms`` (how long a cleaned tombstone stays); topics whose
    config cannot be read (not authorised) are missing from the answer."""
    admin = AIOKafkaAdminClient(**kafka.client_options())
    await admin.start()
    try:
        found = await _topic_config(admin, names, "delete.retention.ms")
    finally:
        await admin.close()
    return {name: int(value) for name, value in found.items() if value.isdigit()}


async def _topic_config(admin: AIOKafkaAdminClient, names: list[str], key: str) -> dict[str, str]:
    """One config value per topic (empty if the broker did not list it); unreadable topics are left out."""
    if not names:
        return {}
    resources = [ConfigResource(ConfigResourceType.TOPIC, name) for name in names]
    values = {}
    for response in await admin.describe_configs(resources):
        for error_code, _message, _type, name, entries in response.resources:
            if error_code == 0:
                values[name] = next((e[1] for e in entries if e[0] == key), "")
    return values
