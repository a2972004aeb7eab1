#!/bin/sh
# The official image's /opt/kafka/bin/kafka-topics.sh, which the compose health check calls.
exec java -Xmx256m -Dlog4j2.configurationFile=/opt/kafka/config/log4j2.yaml -cp '/opt/kafka/libs/*' \
    org.apache.kafka.tools.TopicCommand "$@"
