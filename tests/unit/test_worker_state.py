"""Data-plane workers, without processes: the membership a worker rebuilds from the gateway
process's state message, the channel's framing and bounds, /metrics summed over
processes, and the requests a worker awaits per replica, checked as they arrive."""

from __future__ import annotations

import asyncio
import dataclasses

import orjson
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from steadyserve.config import DeploymentConfig
from steadyserve.gateway.channel import ChannelClosed, encode, read_message
from steadyserve.gateway.membership import Endpoint, Membership
from steadyserve.gateway.transport import Address
from steadyserve.gateway.worker import apply_state, outstanding_of, state_message
from steadyserve.gateway.workers import MAX_OUTSTANDING_ROWS, outstanding_from_wire
from steadyserve.observe.aggregate import summed_registry

INFO = {"service": "Echo", "version": "1",
        "handlers": [{"name": "echo", "params": [{"name": "text", "type": {"kind": "str"}, "required": True}],
                      "options": {}}]}


class Transport:
    def __init__(self) -> None:
        self.max: dict[Address, int] = {}

    def set_max_connections(self, address: Address, n: int) -> None:
        self.max[address] = n


def deployments() -> tuple[DeploymentConfig, ...]:
    return (DeploymentConfig(name="echo", service="x:Echo", replicas=2, rollout_env=("TAG",)),)


def control_side() -> Membership:
    m = Membership(deployments())
    m.add("echo", Endpoint("echo-0", Address("127.0.0.1", 1000)), INFO)
    m.add("echo", Endpoint("echo-1", Address("127.0.0.1", 1001)), INFO)
    return m


def roundtrip(m: Membership) -> dict:
    infos = {e.replica_id: INFO for e in m.deployments["echo"].endpoints}
    return asyncio.run(_read(state_message(m, infos, {"echo": (5.0, "boom")})))


async def _read(data: bytes) -> dict:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return await read_message(reader)


def test_a_worker_rebuilds_the_membership_and_keeps_its_endpoints_state() -> None:
    control = control_side()
    worker = Membership(deployments())
    transport = Transport()
    files = {d.name: d for d in deployments()}
    state = roundtrip(control)
    assert state["start_failures"] == {"echo": [5.0, "boom"]}
    apply_state(worker, transport, files, state["deployments"])
    d = worker.deployments["echo"]
    assert [e.replica_id for e in d.endpoints] == ["echo-0", "echo-1"]
    assert list(d.handlers) == ["echo"] and d.version == "1"
    assert transport.max == {Address("127.0.0.1", 1000): 256, Address("127.0.0.1", 1001): 256}
    kept = d.endpoints[1]
    kept.outstanding = 3  # this worker's own view of the replica

    # echo-0 leaves, echo-2 arrives, echo-1 restarts on another port; a rollout changed env
    control.remove("echo", "echo-0")
    control.remove("echo", "echo-1")
    control.add("echo", Endpoint("echo-1", Address("127.0.0.1", 1005)), INFO)
    control.add("echo", Endpoint("echo-2", Address("127.0.0.1", 1002)), INFO)
    control.reconfigure(dataclasses.replace(control.deployments["echo"].config,
                                            env=(("TAG", "v2"),)))
    apply_state(worker, transport, files, roundtrip(control)["deployments"])
    got = {e.replica_id: e.address.port for e in d.endpoints}
    assert got == {"echo-1": 1005, "echo-2": 1002}
    assert d.config.env == (("TAG", "v2"),)

    # unchanged state: the same Endpoint objects (outstanding counts survive)
    before = list(d.endpoints)
    before[0].outstanding = 7
    apply_state(worker, transport, files, roundtrip(control)["deployments"])
    assert d.endpoints == before and d.endpoints[0].outstanding == 7


def test_an_unknown_deployment_in_a_state_is_ignored() -> None:
    worker = Membership(deployments())
    apply_state(worker, Transport(), {d.name: d for d in deployments()},
                {"nope": {"config": {}, "desired": 1, "endpoints": []}})
    assert list(worker.deployments) == ["echo"]


@pytest.mark.parametrize("data", [b"not json\n", b"[1, 2]\n", b'{"no_type": 1}\n', b'{"t": 1}\n',
                                  b'{"t": "x"'])
def test_the_channel_refuses_what_is_not_a_message(data: bytes) -> None:
    with pytest.raises(ChannelClosed):
        asyncio.run(_read(data))


def test_the_channel_bounds_a_line() -> None:
    async def over() -> None:
        reader = asyncio.StreamReader(limit=64)
        reader.feed_data(encode({"t": "x", "pad": "a" * 200}))
        await read_message(reader)

    with pytest.raises(ChannelClosed, match="over"):
        asyncio.run(over())


def test_metrics_of_several_processes_sum_as_one_gateway() -> None:
    def registry(requests: float, latency: float, inflight: float) -> CollectorRegistry:
        r = CollectorRegistry()
        Counter("steadyserve_requests", "r", ["deployment"], registry=r).labels("echo").inc(
            requests)
        Histogram("steadyserve_duration_seconds", "d", ["deployment"], buckets=(0.1, 1),
                  registry=r).labels("echo").observe(latency)
        Gauge("steadyserve_admission_inflight", "i", ["deployment"], registry=r).labels(
            "echo").set(inflight)
        return r

    own = registry(2, 0.05, 1)
    workers = [generate_latest(registry(3, 0.5, 2)), b"garbage {{{", generate_latest(registry(
        1, 5.0, 0))]
    text = generate_latest(summed_registry(own, workers)).decode()
    samples = {(s.name, s.labels.get("le")): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("steadyserve_requests_total", None)] == 6
    assert samples[("steadyserve_duration_seconds_bucket", "0.1")] == 1
    assert samples[("steadyserve_duration_seconds_bucket", "1.0")] == 2
    assert samples[("steadyserve_duration_seconds_bucket", "+Inf")] == 3
    assert samples[("steadyserve_duration_seconds_count", None)] == 3
    assert samples[("steadyserve_duration_seconds_sum", None)] == pytest.approx(5.55)
    assert samples[("steadyserve_admission_inflight", None)] == 3
    assert "_created" not in text


def test_a_worker_reports_what_it_awaits_per_replica_and_the_report_is_checked() -> None:
    m = control_side()
    m.add("echo", Endpoint("echo-1", Address("127.0.0.1", 1001)), INFO)
    _, three = m.deployments["echo"].endpoints
    three.outstanding = 3  # calls, coalesced calls and open streams: the dispatcher's count
    wire = outstanding_of(m)
    assert wire == [["echo", three.replica_id, 3]]  # replicas awaiting nothing are left out
    assert outstanding_from_wire(encode_decode(wire)) == {("echo", three.replica_id): 3}
    for bad in ("nope", [["echo", "r"]], [["echo", "r", -1]], [["echo", "r", 1.5]],
                [["echo", 7, 1]], [["echo", "r", "1"]], [["echo", "r", True]]):
        assert outstanding_from_wire(bad) == {}, bad
    many = [["echo", f"r{i}", 1] for i in range(MAX_OUTSTANDING_ROWS + 5)]
    assert len(outstanding_from_wire(many)) == MAX_OUTSTANDING_ROWS


def encode_decode(value: object) -> object:
    """As it crosses the channel (a JSON line)."""
    return orjson.loads(encode({"v": value}))["v"]
