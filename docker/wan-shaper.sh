#!/bin/sh
# WAN link emulation for the testbeds: shapes the egress of the network namespace it runs in
# (the compose files share the PrfaaS datacenter's namespace) with a token bucket filter, after an
# optional netem delay. Needs CAP_NET_ADMIN. Stays in the foreground so compose can stop it.
#   WAN_DEV (eth0)  WAN_RATE (10gbit)  WAN_BURST (16mb)  WAN_LATENCY (50ms)  WAN_DELAY (0ms)
set -eu
dev=${WAN_DEV:-eth0}
rate=${WAN_RATE:-10gbit}
burst=${WAN_BURST:-16mb}
latency=${WAN_LATENCY:-50ms}
delay=${WAN_DELAY:-0ms}

command -v tc >/dev/null 2>&1 || { apk add --no-cache iproute2 >/dev/null 2>&1 || \
    (apt-get update -qq && apt-get install -y -qq iproute2 >/dev/null); }
tc qdisc del dev "$dev" root 2>/dev/null || true
if [ "$delay" != "0ms" ]; then
    tc qdisc add dev "$dev" root handle 1: netem delay "$delay" || {
        echo "wan-shaper: WAN_DELAY=$delay needs the kernel's sch_netem, absent here:" \
            "set WAN_DELAY=0ms (rate shaping alone, tbf)" >&2
        exit 1
    }
    tc qdisc add dev "$dev" parent 1: handle 2: tbf rate "$rate" burst "$burst" latency "$latency"
else
    tc qdisc add dev "$dev" root tbf rate "$rate" burst "$burst" latency "$latency"
fi
tc qdisc show dev "$dev"
trap 'tc qdisc del dev "$dev" root 2>/dev/null; exit 0' TERM INT
while :; do sleep 3600 & wait $!; done
