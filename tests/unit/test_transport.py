"""gateway/transport.py: HttpTransport and its pool against a scripted fake network.

In the style of httpcore's pool tests: the connect step is a fake (`FakeNetwork.connect`)
that hands each connection a `FakeSocket` (an asyncio transport that records what was
written); a test feeds the reply to the protocol in whatever pieces it likes, resets it, or
never answers. No sockets. Tasks are driven with `asyncio.sleep(0)` yields; the only real
timers are the short timeouts that a test expects to fire (never ones it expects not to).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from steadyserve.errors import (
    ConnectionLost,
    ConnectionRefused,
    ReplicaTimeout,
    ReplicaUnavailable,
    ResponseTooLarge,
)
from steadyserve.gateway.transport import (
    Address,
    Connection,
    ConnectionFactory,
    HttpTransport,
    Reply,
    _Pool,
)

A = Address("10.0.0.1", 9000)
B = Address("10.0.0.2", 9000)
LONG = 30.0  # a timeout no test reaches
SHORT = 0.02  # a timeout a test waits for


class FakeSocket(asyncio.Transport):
    """The transport side of one fake connection: records writes, closes like asyncio's."""

    def __init__(self, protocol: Connection) -> None:
        super().__init__()
        self.protocol = protocol
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "wrote to a closed connection"
        self.written += bytes(data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            # asyncio reports the close to the protocol on a later loop iteration
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def is_closing(self) -> bool:
        return self.closed

    # what the replica does
    def feed(self, *pieces: bytes) -> None:
        for piece in pieces:
            self.protocol.data_received(piece)

    def reset(self) -> None:
        self.closed = True
        self.protocol.connection_lost(ConnectionResetError("reset by peer"))


class FakeNetwork:
    def __init__(self) -> None:
        self.sockets: list[FakeSocket] = []
        self.connects = 0
        self.refuse = False
        self.gate: asyncio.Event | None = None  # set: connects wait for it

    async def connect(self, address: Address, factory: ConnectionFactory) -> Connection:
        self.connects += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.refuse:
            raise ConnectionRefused(f"cannot connect to {address}: refused")
        conn = factory()
        sock = FakeSocket(conn)
        conn.connection_made(sock)
        self.sockets.append(sock)
        return conn


def reply(body: bytes = b"hi", status: str = "200 OK", *headers: bytes) -> bytes:
    head = [b"HTTP/1.1 " + status.encode(), b"content-length: " + str(len(body)).encode(),
            b"content-type: application/msgpack", *headers]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def chunked(*chunks: bytes) -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    return b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + body


async def until(cond: Callable[[], object], what: str, rounds: int = 200) -> None:
    for _ in range(rounds):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


def make(net: FakeNetwork, **kwargs) -> HttpTransport:
    return HttpTransport(connect=net.connect, **kwargs)


def send(t: HttpTransport, address: Address = A, timeout_s: float = LONG,
         body: bytes = b"{}") -> asyncio.Task[Reply]:
    return asyncio.get_running_loop().create_task(
        t.request(address, "POST", "/invoke/h", body, [(b"x-request-id", b"r1")], timeout_s))


async def sent(net: FakeNetwork, index: int = -1, requests: int = 1) -> FakeSocket:
    """The socket a request went out on, once the request's bytes were written to it."""
    def written() -> bool:
        there = -len(net.sockets) <= index < len(net.sockets)
        return there and net.sockets[index].written.count(b" HTTP/1.1\r\n") >= requests

    await until(written, "the request was written")
    return net.sockets[index]


# partial reads ------------------------------------------------------------------------------

SMALL = reply(b'{"r":1}')


@pytest.mark.parametrize("cut", range(1, len(SMALL)))
async def test_a_reply_split_at_any_byte_is_read_whole(cut: int) -> None:
    net = FakeNetwork()
    t = make(net)
    task = send(t)
    sock = await sent(net)
    sock.feed(SMALL[:cut])
    await asyncio.sleep(0)
    assert not task.done()  # half a reply is not a reply
    sock.feed(SMALL[cut:])
    assert await task == Reply(200, b'{"r":1}')
    assert t.pool_stats() == {A: (0, 1)}  # back to idle, reusable


async def test_a_reply_fed_one_byte_at_a_time_and_the_request_written() -> None:
    net = FakeNetwork()
    t = make(net)
    task = send(t, body=b"payload")
    sock = await sent(net)
    assert bytes(sock.written) == (b"POST /invoke/h HTTP/1.1\r\nhost: 10.0.0.1:9000\r\n"
                                   b"content-length: 7\r\nx-request-id: r1\r\n\r\npayload")
    raw = reply(b"x" * 40, "503 Service Unavailable")
    sock.feed(*(raw[i:i + 1] for i in range(len(raw))))
    assert await task == Reply(503, b"x" * 40)


async def test_a_chunked_reply_in_pieces() -> None:
    net = FakeNetwork()
    t = make(net)
    task = send(t)
    sock = await sent(net)
    raw = chunked(b"abc", b"defg")
    sock.feed(raw[:30], raw[30:33], raw[33:])
    assert await task == Reply(200, b"abcdefg")


# resets and malformed replies ---------------------------------------------------------------

@pytest.mark.parametrize("received", [0, 10, len(reply(b"x" * 100)) - 5],
                         ids=["before-any-byte", "mid-head", "mid-body"])
async def test_a_reset_mid_reply_is_connection_lost_and_frees_the_slot(received: int) -> None:
    net = FakeNetwork()
    t = make(net, max_connections=1)
    task = send(t)
    sock = await sent(net)
    sock.feed(reply(b"x" * 100)[:received])
    sock.reset()
    with pytest.raises(ConnectionLost):
        await task
    assert t.pool_stats() == {A: (0, 0)}
    again = send(t)
    sock2 = await sent(net, 1)
    sock2.feed(reply())
    assert (await again).status == 200
    assert net.connects == 2


@pytest.mark.parametrize("garbage", [b"NOT HTTP\r\n\r\n", b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
                                     b"HTTP/1.1 abc OK\r\n\r\n"],
                         ids=["no-status-line", "bad-length", "bad-status"])
async def test_a_malformed_reply_is_replica_unavailable_and_the_connection_dropped(
        garbage: bytes) -> None:
    net = FakeNetwork()
    t = make(net)
    task = send(t)
    sock = await sent(net)
    sock.feed(garbage)
    with pytest.raises(ReplicaUnavailable, match="malformed") as info:
        await task
    assert not isinstance(info.value, ConnectionLost)  # not "the replica died with it"
    assert sock.closed
    assert t.pool_stats() == {A: (0, 0)}


async def test_a_second_reply_to_one_request_closes_the_connection() -> None:
    net = FakeNetwork()
    t = make(net)
    task = send(t)
    sock = await sent(net)
    sock.feed(reply(b"one") + reply(b"two"))  # out of step: "two" would go to the next caller
    assert await task == Reply(200, b"one")
    assert sock.closed
    assert t.pool_stats() == {A: (0, 0)}


async def test_bytes_on_an_idle_connection_close_it() -> None:
    net = FakeNetwork()
    t = make(net)
    task = send(t)
    sock = await sent(net)
    sock.feed(reply())
    await task
    sock.feed(b"HTTP/1.1 408 Request Timeout\r\n")
    assert sock.closed
    nxt = send(t)
    sock2 = await sent(net, 1)
    sock2.feed(reply(b"fresh"))
    assert (await nxt).body == b"fresh"
    assert net.connects == 2


# the response-size limit ----------------------------------------------------------------------

LIMIT = 1024


@pytest.mark.parametrize(
    ("raw", "pieces"),
    [
        (reply(b"x" * (LIMIT + 1)), 1),  # declared too large: refused before the body
        (reply(b"x" * (LIMIT + 1))[:60], 1),  # ... even when only the head has arrived
        (chunked(b"x" * 600, b"y" * 600), 7),  # no length: refused as it grows past the limit
    ],
    ids=["declared", "declared-head-only", "chunked"],
)
async def test_a_reply_over_the_limit_is_refused_and_its_connection_closed(
        raw: bytes, pieces: int) -> None:
    net = FakeNetwork()
    t = make(net, max_response_bytes=LIMIT)
    task = send(t)
    sock = await sent(net)
    step = -(-len(raw) // pieces)
    sock.feed(*(raw[i:i + step] for i in range(0, len(raw), step)))
    with pytest.raises(ResponseTooLarge) as info:
        await task
    assert info.value.status == 502 and info.value.code == "response_too_large"
    assert sock.closed  # the rest would be read as the next reply
    sock.feed(b"x" * 10_000)  # the rest still arriving is dropped, not parsed
    assert t.pool_stats() == {A: (0, 0)}


async def test_a_reply_exactly_at_the_limit_is_accepted() -> None:
    net = FakeNetwork()
    t = make(net, max_response_bytes=LIMIT)
    task = send(t)
    sock = await sent(net)
    sock.feed(chunked(b"x" * 1000, b"y" * 24))
    assert (await task).body == b"x" * 1000 + b"y" * 24


async def test_endless_headers_are_refused() -> None:
    net = FakeNetwork()
    t = make(net, max_response_bytes=LIMIT)
    task = send(t)
    sock = await sent(net)
    sock.feed(b"HTTP/1.1 200 OK\r\n")
    for i in range(2000):
        sock.feed(b"x-filler-%d: %s\r\n" % (i, b"v" * 40))
        if task.done():
            break
    with pytest.raises(ResponseTooLarge):
        await task


# keep-alive ----------------------------------------------------------------------------------

async def test_keep_alive_reuses_one_connection() -> None:
    net = FakeNetwork()
    t = make(net)
    for i in range(3):
        task = send(t)
        sock = await sent(net, requests=i + 1)
        sock.feed(reply(b"%d" % i))
        assert (await task).body == b"%d" % i
    assert net.connects == 1 and len(net.sockets) == 1


@pytest.mark.parametrize("raw", [reply(b"bye", "200 OK", b"connection: close"),
                                 b"HTTP/1.0 200 OK\r\ncontent-length: 3\r\n\r\nbye"],
                         ids=["connection-close", "http-1.0"])
async def test_a_reply_that_ends_the_connection_is_not_reused(raw: bytes) -> None:
    net = FakeNetwork()
    t = make(net)
    first = send(t)
    sock = await sent(net)
    sock.feed(raw)
    assert (await first).body == b"bye"
    assert sock.closed
    second = send(t)
    sock2 = await sent(net, 1)
    sock2.feed(reply())
    assert (await second).status == 200
    assert net.connects == 2


async def test_no_answer_within_the_timeout_closes_the_connection() -> None:
    net = FakeNetwork()
    t = make(net)
    task = send(t, timeout_s=SHORT)
    sock = await sent(net)
    with pytest.raises(ReplicaTimeout):
        await task
    assert sock.closed
    sock.feed(reply(b"late"))  # the late reply must not reach anyone
    assert t.pool_stats() == {A: (0, 0)}


# connects ----------------------------------------------------------------------------------

async def test_a_refused_connect_is_connection_refused_and_frees_the_slot() -> None:
    net = FakeNetwork()
    net.refuse = True
    t = make(net, max_connections=1)
    with pytest.raises(ConnectionRefused):
        await send(t)
    net.refuse = False
    task = send(t)
    (await sent(net)).feed(reply())
    assert (await task).status == 200


async def test_a_connect_timeout_is_replica_unavailable_and_frees_the_slot() -> None:
    net = FakeNetwork()
    net.gate = asyncio.Event()
    t = HttpTransport(connect=net.connect, connect_timeout_s=SHORT, max_connections=1)
    with pytest.raises(ReplicaUnavailable, match="timed out"):
        await send(t, timeout_s=LONG)
    await until(lambda: t._pools[A].opening == 0, "the abandoned connect was accounted")
    net.gate = None
    task = send(t)
    (await sent(net)).feed(reply())
    assert (await task).status == 200


async def test_a_connect_that_completes_as_its_caller_leaves_goes_to_the_next_caller() -> None:
    net = FakeNetwork()
    t = make(net, max_connections=1)
    first = send(t)
    await until(lambda: net.connects == 1, "connecting")
    first.cancel()  # cancelled while connecting; the connect itself completes anyway
    with pytest.raises(asyncio.CancelledError):
        await first
    await until(lambda: t.pool_stats() == {A: (0, 1)}, "the late connection idles in the pool")
    second = send(t)
    (await sent(net)).feed(reply())
    assert (await second).status == 200
    assert net.connects == 1


# cancellation --------------------------------------------------------------------------------

async def test_a_cancelled_request_closes_its_connection_and_frees_the_slot() -> None:
    net = FakeNetwork()
    t = make(net, max_connections=1)
    first = send(t)
    sock = await sent(net)
    waiting = send(t)  # over the limit: waits for the slot
    await until(lambda: len(t._pools[A].waiters) == 1, "queued")
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert sock.closed  # its reply, if it ever came, would be read as the next one's
    sock2 = await sent(net, 1)  # the waiter got the slot and opened a fresh connection
    sock2.feed(reply(b"second"))
    assert (await waiting).body == b"second"
    assert net.connects == 2
    assert t.pool_stats() == {A: (0, 1)}


# pool exhaustion and hand-over ------------------------------------------------------------------

async def test_callers_over_the_limit_queue_and_time_out_when_nothing_frees() -> None:
    net = FakeNetwork()
    t = make(net, max_connections=1)
    first = send(t)
    sock = await sent(net)
    queued = send(t)
    impatient = send(t, timeout_s=SHORT)
    with pytest.raises(ReplicaTimeout, match="no connection"):
        await impatient
    assert net.connects == 1
    sock.feed(reply(b"1"))
    assert (await first).body == b"1"
    await sent(net, requests=2)  # handed the same connection, in order
    sock.feed(reply(b"2"))
    assert (await queued).body == b"2"
    assert net.connects == 1 and t.pool_stats() == {A: (0, 1)}


async def _pool_with_one_lent(net: FakeNetwork) -> tuple[_Pool, Connection]:
    pool = _Pool(A, 1, net.connect, Connection, LONG)
    return pool, await pool.acquire(LONG)


@pytest.mark.parametrize("usable", [True, False], ids=["a-connection", "a-slot"])
async def test_a_waiter_woken_then_cancelled_passes_the_wake_up_on(usable: bool) -> None:
    net = FakeNetwork()
    pool, lent = await _pool_with_one_lent(net)
    loop = asyncio.get_running_loop()
    woken = loop.create_task(pool.acquire(LONG))
    nxt = loop.create_task(pool.acquire(LONG))
    await until(lambda: len(pool.waiters) == 2, "both queued")
    if not usable:
        lent.close()  # the slot, not the connection, is handed over
    pool.release(lent)  # hands it to `woken`…
    woken.cancel()  # …which is cancelled before it runs (wait_for timing out just then)
    with pytest.raises(asyncio.CancelledError):
        await woken
    await until(nxt.done, "the next in line was handed it")
    got = nxt.result()
    assert (got is lent) == usable
    assert net.connects == (1 if usable else 2)
    assert pool.size == 1 and pool.busy == {got} and not pool.waiters


async def test_a_waiter_whose_timer_and_hand_over_coincide_gets_one_of_them() -> None:
    net = FakeNetwork()
    pool, lent = await _pool_with_one_lent(net)
    waiter = asyncio.get_running_loop().create_task(pool.acquire(0.0))
    await asyncio.sleep(0)  # queued; its 0 s timer is due
    pool.release(lent)  # the hand-over lands in the same loop iteration as the timer
    try:
        got = await waiter
    except ReplicaTimeout:
        assert list(pool.idle) == [lent]  # not handed over: still the pool's
    else:
        assert got is lent and pool.busy == {lent}
    assert pool.size == 1


# forget -------------------------------------------------------------------------------------

async def test_forget_fails_busy_requests_and_waiters_at_once() -> None:
    net = FakeNetwork()
    t = make(net)
    t.set_max_connections(A, 1)
    busy = send(t)
    sock = await sent(net)
    waiting = send(t)
    await until(lambda: len(t._pools[A].waiters) == 1, "queued")
    t.forget(A)
    await until(lambda: busy.done() and waiting.done(), "both failed without a timeout")
    with pytest.raises(ConnectionLost):
        await busy
    with pytest.raises(ReplicaUnavailable, match="left rotation"):
        await waiting
    assert sock.closed
    assert A not in t.pool_stats()
    # a new pool for the same address starts clean, and keeps the address's limit
    again = [send(t), send(t)]
    sock2 = await sent(net, 1)
    assert t.pool_stats() == {A: (1, 0)} and net.connects == 2  # limit 1: one waits
    sock2.feed(reply(b"a"))
    await sent(net, 1, requests=2)
    sock2.feed(reply(b"b"))
    assert [r.body for r in await asyncio.gather(*again)] == [b"a", b"b"]


async def test_a_release_after_forget_counts_nothing() -> None:
    net = FakeNetwork()
    old, lent = await _pool_with_one_lent(net)
    old.close()
    assert old.size == 0
    old.release(lent)  # the request that held it finishes after the forget
    assert old.size == 0 and not old.idle and not old.busy
    with pytest.raises(ReplicaUnavailable):
        await old.acquire(LONG)


async def test_a_connect_that_completes_after_forget_is_closed() -> None:
    net = FakeNetwork()
    net.gate = asyncio.Event()
    t = make(net)
    task = send(t)
    await until(lambda: net.connects == 1, "connecting")
    t.forget(A)
    net.gate.set()
    with pytest.raises(ReplicaUnavailable, match="left rotation"):
        await task
    assert [s.closed for s in net.sockets] == [True]


# per-address limits -------------------------------------------------------------------------

async def test_limits_are_per_address_with_the_default_for_the_rest() -> None:
    net = FakeNetwork()
    t = make(net, max_connections=3)
    t.set_max_connections(A, 2)
    c = Address("10.0.0.3", 9000)
    tasks = [send(t, A) for _ in range(4)] + [send(t, B) for _ in range(4)] + [send(t, c)]
    await until(lambda: len(net.sockets) == 6, "six connections")
    for _ in range(10):
        await asyncio.sleep(0)
    stats = t.pool_stats()
    assert stats == {A: (2, 0), B: (3, 0), c: (1, 0)}
    assert len(t._pools[A].waiters) == 2 and len(t._pools[B].waiters) == 1
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_raising_a_limit_lets_waiters_connect_and_lowering_it_trims_the_pool() -> None:
    net = FakeNetwork()
    t = make(net)
    t.set_max_connections(A, 1)
    first, second = send(t), send(t)
    await until(lambda: A in t._pools and len(t._pools[A].waiters) == 1, "the second waits")
    t.set_max_connections(A, 2)
    await until(lambda: len(net.sockets) == 2, "the second connects at once")
    for sock, task in zip(net.sockets, (first, second), strict=True):
        await sent(net, net.sockets.index(sock))
        sock.feed(reply())
        await task
    assert t.pool_stats() == {A: (0, 2)}
    t.set_max_connections(A, 1)
    assert t.pool_stats() == {A: (0, 1)}  # the least recently used idle one closed
    assert net.sockets[0].closed and not net.sockets[1].closed


async def test_lowering_a_limit_closes_busy_connections_as_they_come_back() -> None:
    net = FakeNetwork()
    t = make(net)
    tasks = [send(t), send(t)]
    await until(lambda: len(net.sockets) == 2, "two connections")
    t.set_max_connections(A, 1)
    for i in range(2):
        (await sent(net, i)).feed(reply())
    await asyncio.gather(*tasks)
    assert t.pool_stats() == {A: (0, 1)}
    assert sum(s.closed for s in net.sockets) == 1


def test_a_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match=">= 1"):
        HttpTransport().set_max_connections(A, 0)
