"""The etcd fixture serves the v3 API (through its JSON gateway) and comes back after a stop."""

from __future__ import annotations

import base64
import json
import urllib.request

from tests.etcd_server import EtcdServer


def _put_get(server: EtcdServer, key: str, value: str) -> str:
    def call(path: str, body: dict[str, str]) -> dict[str, object]:
        request = urllib.request.Request(
            f"http://{server.endpoint}/v3/{path}", data=json.dumps(body).encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=5.0) as response:
            return dict(json.loads(response.read()))

    enc = lambda s: base64.b64encode(s.encode()).decode()  # noqa: E731
    call("kv/put", {"key": enc(key), "value": enc(value)})
    (kv,) = call("kv/range", {"key": enc(key)})["kvs"]  # type: ignore[misc]
    return base64.b64decode(kv["value"]).decode()


def test_etcd_serves_and_survives_a_restart(etcd: EtcdServer) -> None:
    assert _put_get(etcd, "/prfaas-test/a", "1") == "1"
    etcd.stop()
    etcd.start()
    assert _put_get(etcd, "/prfaas-test/b", "2") == "2"
