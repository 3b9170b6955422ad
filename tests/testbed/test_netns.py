"""The namespace testbed (``prfaas netns``): dc-remote and dc-local as network namespaces joined
by a tc-tbf-shaped veth WAN, each worker and the router a process in its datacenter, the client
in the root namespace with stock ``tritonclient.grpc``.

Checked here: tokens through the router equal a single-engine run of the same prompt and seed
(one prompt routed to dc-remote, its KV relayed over the WAN, one prefilled locally); the relayed
KV bytes show in the WAN's ``tc -s qdisc`` byte counter at dc-remote's end; a live
``tc qdisc change`` to a lower rate shows in ``tc qdisc show`` at both ends and the system keeps
serving; closing (and a failed start) stops every process by PID and deletes the namespaces.

Needs root and iproute2 (``ip``, ``tc``): skipped with that reason otherwise (CI runs as root).
"""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.router.builders import ask, prompt, reference
from trtllm_prfaas import cli
from trtllm_prfaas.errors import ConfigError, PrfaasError
from trtllm_prfaas.testbed import demo
from trtllm_prfaas.testbed.hosts import HostsConfig, NetnsTestbed
from trtllm_prfaas.testbed.netns import Network, WanShape, list_runs, missing_requirements
from trtllm_prfaas.testbed.spec import TestbedConfig

THRESHOLD = 100
REMOTE, LOCAL = 400, 40  # prompt lengths: l > t prefills in dc-remote, l <= t in dc-local
REMOTE_LINK = 'prfaas_relay_bytes_total|link="dc-remote-'
REMOTE_OK = 'prfaas_requests_total|route="remote",status="ok"}'

needs_root = pytest.mark.skipif(
    bool(missing_requirements()), reason=f"namespace testbed: {missing_requirements()}"
)


def hosts_config(**overrides: object) -> HostsConfig:
    testbed = TestbedConfig(model_preset="tiny", grpc_port=0, metrics_port=0,
                            threshold_tokens=THRESHOLD, num_blocks=512, chunk_size=64)  # fmt: skip
    options: dict[str, object] = {
        "testbed": testbed,
        "wan": WanShape(rate="200mbit", burst="128kb"),
        "fixed_threshold": True,
        **overrides,
    }
    return HostsConfig(**options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def hosts() -> Iterator[NetnsTestbed]:
    if missing_requirements():
        pytest.skip(f"namespace testbed: {missing_requirements()}")
    testbed = NetnsTestbed(hosts_config(num_routers=2))  # etcd membership, two replicas
    testbed.start()
    try:
        yield testbed
    finally:
        testbed.close()


def settled_metrics(url: str, key: str, timeout_s: float = 10.0) -> dict[str, float]:
    """The router's figures once ``key`` is positive and stops moving (load reports arrive
    every 0.1 s, so the relay counter lags the tokens a little)."""
    deadline = time.monotonic() + timeout_s
    last = demo.scrape(url)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = demo.scrape(url)
        if now.get(key, 0.0) > 0 and _remote_relayed(now) == _remote_relayed(last):
            return now
        last = now
    raise AssertionError(f"{key} never settled: {last}")


def gauge(url: str, name: str) -> float:
    """One unlabelled sample from the router's /metrics."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    return next(s.value for s in samples if s.name == name)


def _remote_relayed(figures: dict[str, float]) -> float:
    return sum(v for k, v in figures.items() if k.startswith(REMOTE_LINK))


def tc_show(namespace: str) -> str:
    argv = ["tc", "-n", namespace, "qdisc", "show", "dev", "wan0"]
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=10).stdout


# ---------------------------------------------------------------------------- serving
@needs_root
def test_serves_single_engine_tokens_and_the_relayed_kv_crosses_the_shaped_wan(
    hosts: NetnsTestbed,
) -> None:
    router = hosts.routers[0]
    assert router.metrics_url is not None
    assert router.address.startswith(hosts.network.local_address + ":")
    wan_before = hosts.wan_stats("dc-remote").num_bytes
    relayed_before = _remote_relayed(demo.scrape(router.metrics_url))
    for length in (REMOTE, LOCAL):
        assert ask(router.address, prompt(length)) == reference(prompt(length), 8), length
    figures = settled_metrics(router.metrics_url, REMOTE_OK)
    assert figures[REMOTE_OK] >= 1  # the long prompt was prefilled in dc-remote
    relayed = _remote_relayed(figures) - relayed_before
    wan = hosts.wan_stats("dc-remote").num_bytes - wan_before
    assert relayed > 0
    assert wan >= relayed, (wan, relayed)  # the KV (plus Curve and TCP framing) left via tbf


@needs_root
def test_every_router_replica_found_the_workers_in_etcd_and_serves(hosts: NetnsTestbed) -> None:
    assert hosts.etcd is not None and hosts.etcd.poll() is None
    assert len(hosts.routers) == 2
    for i, router in enumerate(hosts.routers):
        assert "--worker" not in hosts.router_args(i) and "--discovery" in hosts.router_args(i)
        assert router.metrics_url is not None
        assert len(router.ready["workers"]) == len(hosts.workers), router.ready
        assert gauge(router.metrics_url, "prfaas_discovery_workers") == len(hosts.workers)
    tokens = prompt(REMOTE + 20)
    assert ask(hosts.routers[1].address, tokens) == reference(tokens, 8)
    urls = [str(router.metrics_url) for router in hosts.routers]
    deadline = time.monotonic() + 10  # the etcd election settles within its 3 s lease
    while sum(gauge(url, "prfaas_router_is_leader") for url in urls) != 1:
        assert time.monotonic() < deadline, "the two replicas never settled on one leader"
        time.sleep(0.2)


@needs_root
def test_the_cli_lists_the_run_and_changes_its_wan_live(
    hosts: NetnsTestbed, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["netns", "status"]) == 0
    out = capsys.readouterr().out
    assert f"run {hosts.run_id}:" in out and "dc-remote WAN egress: tbf 200 Mbit/s" in out, out
    assert cli.main(["netns", "wan", hosts.run_id, "--rate", "80mbit", "--burst", "64kb"]) == 0
    for datacenter in ("dc-remote", "dc-local"):
        assert "rate 80Mbit" in tc_show(hosts.network.namespace(datacenter))
    assert cli.main(["netns", "wan", "nosuchrun", "--rate", "80mbit"]) == 1
    assert cli.main(["netns", "down", "nosuchrun"]) == 1
    assert "no namespace testbed run 'nosuchrun'" in capsys.readouterr().err


@needs_root
def test_a_live_rate_change_shows_in_tc_and_the_system_keeps_serving(
    hosts: NetnsTestbed,
) -> None:
    hosts.set_wan_rate("2mbit", "64kb")
    for datacenter in ("dc-remote", "dc-local"):
        shown = tc_show(hosts.network.namespace(datacenter))
        assert "tbf" in shown and "rate 2Mbit" in shown and "burst 64Kb" in shown, shown
        assert hosts.wan_stats(datacenter).rate_bytes_per_s == 2_000_000 // 8
    tokens = prompt(1000)
    want = reference(tokens, 8)
    before = hosts.wan_stats("dc-remote").num_bytes
    started = time.monotonic()
    assert ask(hosts.routers[0].address, tokens) == want
    elapsed_s = time.monotonic() - started
    sent = hosts.wan_stats("dc-remote").num_bytes - before
    # Still remote, through the WAN, and shaped: past the bucket's 64 KiB, 2 Mbit/s is the pace
    # (a lower bound: a loaded machine only makes it slower).
    assert sent > 64 * 1024, sent
    assert elapsed_s >= 0.9 * (sent - 64 * 1024) * 8 / 2e6, (elapsed_s, sent)
    hosts.set_wan_rate("200mbit", "128kb")


@needs_root
def test_close_stops_every_process_by_pid_and_deletes_the_namespaces(
    hosts: NetnsTestbed,
) -> None:
    pids = [r.process.pid for r in hosts.routers] + [w.process.pid for w in hosts.workers.values()]
    codes = hosts.close()
    assert codes and all(code == 0 for code in codes.values()), codes
    assert hosts.run_id not in list_runs()
    assert all(_gone(pid) for pid in pids)
    assert _processes_of(hosts) == []
    assert hosts.close() == {}  # idempotent


@needs_root
def test_the_static_worker_list_serves_without_etcd() -> None:
    shape = dataclasses.replace(hosts_config().testbed, num_pd_prefill=0)  # remote prefill only
    with NetnsTestbed(hosts_config(testbed=shape, membership="static")) as testbed:
        assert testbed.etcd is None
        assert testbed.router_args(0).count("--worker") == len(testbed.workers) == 2
        tokens = prompt(REMOTE)
        before = testbed.wan_stats("dc-remote").num_bytes
        assert ask(testbed.routers[0].address, tokens) == reference(tokens, 8)
        assert testbed.wan_stats("dc-remote").num_bytes > before
        codes = testbed.close()
    assert codes and all(code == 0 for code in codes.values()), codes
    assert testbed.run_id not in list_runs()


@needs_root
def test_a_failed_start_leaves_no_namespace_and_no_process() -> None:
    testbed = NetnsTestbed(hosts_config(startup_timeout_s=0.5))
    with pytest.raises(PrfaasError, match="in time"):  # etcd or a worker, whichever is first
        testbed.start()
    assert testbed.run_id not in list_runs()
    assert testbed.workers == {} and testbed.routers == []
    assert _processes_of(testbed) == []


@needs_root
def test_runs_side_by_side_get_their_own_namespaces_and_root_links() -> None:
    with Network(run_id="") as first, Network(WanShape(rate="10mbit")) as second:
        assert first.run_id != second.run_id
        assert first.local_address != second.local_address
        assert {first.run_id, second.run_id} <= set(list_runs())
        assert first.wan_stats("dc-remote").rate_bytes_per_s == 125_000_000  # 1gbit default
        assert second.wan_stats("dc-local").rate_bytes_per_s == 1_250_000
    assert not {first.run_id, second.run_id} & set(list_runs())


@needs_root
def test_down_stops_what_a_dead_owner_left_by_pid_and_deletes_its_namespaces() -> None:
    network = Network().create()
    try:
        orphan = subprocess.Popen([*network.exec_prefix("dc-local"), "sleep", "600"])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and str(orphan.pid) not in _netns_pids(network):
            time.sleep(0.1)
        assert cli.main(["netns", "down", network.run_id]) == 0
        assert orphan.wait(15) == -signal.SIGTERM
        assert network.run_id not in list_runs()
    finally:
        network.close()


def _netns_pids(network: Network) -> str:
    argv = ["ip", "netns", "pids", network.namespace("dc-local")]
    return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout


def _processes_of(testbed: NetnsTestbed) -> list[str]:
    """Live processes whose command line names the run's private directory (its key files)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(testbed.directory) in text and not _gone(int(cmdline.parent.name)):
            found.append(text)
    return found


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] == "Z"
    except FileNotFoundError:
        return True


# ---------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ({"rate": "100mbps"}, "rate '100mbps'"),  # tc's bps is bytes/s: refused
        ({"rate": "fast"}, "rate 'fast'"),
        ({"burst": "1kb"}, "1514-byte packet"),
        ({"burst": "lots"}, "burst 'lots'"),
        ({"latency": "50"}, "latency '50'"),
    ],
)
def test_a_bad_wan_shape_names_the_value(shape: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        WanShape(**shape)


def test_wan_shape_in_tc_words() -> None:
    shape = WanShape(rate="2.5gbit", burst="256kb", latency="20ms")
    assert shape.rate_gbps == 2.5
    assert shape.tc_args() == ["tbf", "rate", "2.5gbit", "burst", "256kb", "latency", "20ms"]


@pytest.mark.parametrize(
    ("options", "match"),
    [({"num_routers": 0}, "num_routers"), ({"membership": "dns"}, "membership")],
)
def test_bad_hosts_config_names_the_field(options: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        hosts_config(**options)
