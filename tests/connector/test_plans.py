"""Plans: the request carrier beside the request (connector/plans.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from trtllm_prfaas.connector.plans import Plan, PlanBook, PlanClient, PlanServer, tokens_digest
from trtllm_prfaas.errors import ConfigError, TransferTimeout
from trtllm_prfaas.transport import CurveKeys, RelaySecurity, generate_keypair

PLAIN = RelaySecurity.insecure_plaintext()


def _plan(tokens: list[int], uuid: str = "u1", endpoints: list[str] | None = None) -> Plan:
    return Plan(uuid, len(tokens), tokens_digest(tokens), endpoints or [])


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_digest_is_exact_over_ids_and_length() -> None:
    assert tokens_digest([1, 2, 3]) == tokens_digest([1, 2, 3])
    assert len(tokens_digest([1, 2, 3])) == 32
    assert tokens_digest([1, 2, 3]) != tokens_digest([1, 2, 3, 0])
    assert tokens_digest([1, 2, 3]) != tokens_digest([3, 2, 1])
    assert tokens_digest([256]) != tokens_digest([0, 1])  # int32 each, not bytes


def test_book_is_fifo_per_digest_and_takes_once() -> None:
    book = PlanBook()
    book.post(_plan([1, 2], "a"))
    book.post(_plan([1, 2], "b"))
    book.post(_plan([7], "c"))
    taken = [book.take([1, 2]), book.take([1, 2]), book.take([1, 2])]
    assert [p.transfer_uuid if p else None for p in taken] == ["a", "b", None]
    assert book.take([7]) == _plan([7], "c")
    counts = book.counts()
    assert (counts.posted, counts.taken, counts.missed, counts.held) == (3, 3, 1, 0)


def test_book_expires_plans_after_ttl() -> None:
    clock = Clock()
    book = PlanBook(ttl_s=5.0, clock=clock)
    book.post(_plan([1, 2, 3]))
    clock.now += 4.9
    book.post(_plan([4, 5], "late"))
    clock.now += 0.2
    assert book.take([1, 2, 3]) is None
    assert book.take([4, 5]) is not None
    counts = book.counts()
    assert (counts.expired, counts.missed, counts.taken, counts.held) == (1, 1, 1, 0)
    with pytest.raises(ConfigError):
        PlanBook(ttl_s=0)
    with pytest.raises(ConfigError):
        book.post(Plan("", 1, tokens_digest([1])))
    with pytest.raises(ConfigError, match=r"without '\.'"):  # it would break transfer ids
        book.post(Plan("a.b", 1, tokens_digest([1])))


def test_book_checks_the_length_behind_the_digest() -> None:
    book = PlanBook()
    book.post(Plan("x", 3, tokens_digest([1, 2])))  # a lying length never matches
    assert book.take([1, 2]) is None


@pytest.fixture
def curve() -> Iterator[tuple[RelaySecurity, RelaySecurity, RelaySecurity]]:
    server_pub, server_sec = generate_keypair()
    client_pub, client_sec = generate_keypair()
    other_pub, other_sec = generate_keypair()
    server = RelaySecurity(
        CurveKeys(server_pub, server_sec, allowed_client_public_keys=frozenset({client_pub}))
    )
    client = RelaySecurity(
        CurveKeys(server_pub, client_public_key=client_pub, client_secret_key=client_sec)
    )
    stranger = RelaySecurity(
        CurveKeys(server_pub, client_public_key=other_pub, client_secret_key=other_sec)
    )
    yield server, client, stranger


def _server(security: RelaySecurity, rank: int, book: PlanBook | None, status_of, check=None):
    return PlanServer(
        "tcp://127.0.0.1:0", security, rank, book=book, status_of=status_of, check=check
    )


def test_post_over_curve_lands_in_rank0_book_and_status_on_every_rank(curve) -> None:
    server_sec, client_sec, _ = curve
    book = PlanBook()
    seen: list[tuple[int, str, int]] = []

    def status_of(rank: int):
        def answer(uuid: str, num_tokens: int) -> str:
            seen.append((rank, uuid, num_tokens))
            return "complete" if rank == 0 else ""

        return answer

    def check(plan: Plan) -> str | None:
        return None if len(plan.relay_endpoints) in (0, 2) else "2 ranks here"

    s0 = _server(server_sec, 0, book, status_of(0), check)
    s1 = _server(server_sec, 1, None, status_of(1))
    with s0, s1, PlanClient([s0.endpoint, s1.endpoint], client_sec) as client:
        plan = _plan([5, 6, 7], "t", ["tcp://a:1", "tcp://a:2"])
        client.post(plan, timeout_s=5.0)
        assert book.take([5, 6, 7]) == plan
        with pytest.raises(ConfigError, match="2 ranks here"):
            client.post(_plan([1], "bad", ["tcp://a:1"]), timeout_s=5.0)
        assert client.statuses("t", 3, timeout_s=5.0) == ["complete", ""]
        assert seen == [(0, "t", 3), (1, "t", 3)]
        with (
            PlanClient([s1.endpoint], client_sec) as to_rank1,
            pytest.raises(ConfigError, match="0"),
        ):
            to_rank1.post(plan, timeout_s=5.0)


def test_a_client_with_an_unlisted_key_gets_no_answer(curve) -> None:
    server_sec, _, stranger = curve
    book = PlanBook()
    server = _server(server_sec, 0, book, lambda u, n: "")
    with server, PlanClient([server.endpoint], stranger) as client, pytest.raises(TransferTimeout):
        client.post(_plan([1, 2]), timeout_s=0.5)
    assert book.counts().posted == 0


def test_plaintext_only_when_chosen_and_bad_messages_are_refused() -> None:
    import zmq

    book = PlanBook()
    with PlanServer("tcp://127.0.0.1:0", PLAIN, 0, book=book, status_of=lambda u, n: "") as server:
        with PlanClient([server.endpoint], PLAIN) as client:
            client.post(_plan([3]), timeout_s=5.0)
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(server.endpoint)
        try:
            sock.send(b"\x93garbage")
            assert sock.poll(5000)
            assert b"refused" in sock.recv()
        finally:
            sock.close(linger=0)
            ctx.term()
    assert book.counts().posted == 1
    with pytest.raises(ConfigError):
        RelaySecurity()  # neither Curve nor explicit plaintext
