#!/bin/sh
# Demo data for docker-compose.yml, written with `datasync publish`: three interfaces and a
# route, then eth0's MTU changes every DEMO_INTERVAL_S seconds, so the tables are not empty
# and the example plugins log live changes. SIGTERM (docker-compose stop/down) ends it at once.
set -eu
trap 'exit 0' TERM INT

interface() {  # NAME MTU
    datasync publish demo.interfaces "config/vpp/v2/interfaces/$1" \
        "{\"name\": \"$1\", \"enabled\": true, \"mtu\": $2, \"ip_addresses\": [\"10.0.${1#eth}.1/24\"]}"
}

for name in eth0 eth1 eth2; do
    interface "$name" 1500
done
datasync publish demo.routes config/vpp/v2/routes/r1 \
    '{"dst_network": "192.168.1.0/24", "next_hop": "10.0.0.254", "outgoing_interface": "eth1", "weight": 1}'

step=0
while :; do
    sleep "${DEMO_INTERVAL_S:-5}" &
    wait $!
    step=$((step + 1))
    interface eth0 $((1500 + step % 100))
done
