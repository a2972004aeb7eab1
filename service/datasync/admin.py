"""Declared topics on the broker: create the missing ones, learn their partitions, check them."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import TopicAlreadyExistsError, for_code

from datasync.bindings import TopicSpec
from datasync.errors import ConfigError, TopicError
from datasync.settings import KafkaSettings

log = logging.getLogger(__name__)

UNKNOWN_TOPIC = 3  # Kafka error code UNKNOWN_TOPIC_OR_PARTITION
# The one mismatch the service refuses to run with: old values would never be compacted away.
COMPACTED_ON_DELETE = " (a state topic must be compacted)"
DOES_NOT_EXIST = ": does not exist"


def dead_letter_topics(specs: list[TopicSpec]) -> list[TopicSpec]:
    """The dead-letter topics ``specs`` name (compacted, one partition), which the service
    creates like the declared ones."""
    declared = {s.name for s in specs}
    dead = sorted({s.dead_letter for s in specs if s.dead_letter and s.dead_letter not in declared})
    return [TopicSpec(name=name, partitions=1, compacted=True) for name in dead]


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
            _check_created(await admin.create_topics(new))
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


def _check_created(response: Any) -> None:
    """Raise for the topics the broker refused to create: ConfigError if asking again cannot help
    (an invalid config or replication factor, a policy, no authorisation), else TopicError."""
    refused: list[str] = []
    transient: list[str] = []
    for topic, code, *message in response.topic_errors:
        if code in (0, TopicAlreadyExistsError.errno):  # already there: created concurrently by someone else
            continue
        error = for_code(code)
        detail = f"cannot create topic {topic}: {message[0] if message and message[0] else error.__name__}"
        (transient if error.retriable else refused).append(detail)
    if refused:
        raise ConfigError("broker", "", "; ".join(refused + transient))
    if transient:
        raise TopicError("; ".join(transient))


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
