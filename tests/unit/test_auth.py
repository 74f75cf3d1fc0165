"""API keys: token format, the rate-limit bucket, key settings, the exposure rule, the key
ring (authentication, rotation grace, revocation, expiry, the local admin key file)."""

from __future__ import annotations

import dataclasses
import itertools
import os
import stat
from pathlib import Path

import pytest

from steadyserve.auth.exposure import exposure_problem, inference_open
from steadyserve.auth.keyring import KeyRing
from steadyserve.auth.keys import ApiKey, parse_spec
from steadyserve.auth.tokens import digest, key_id_of, new_secret_for, new_token
from steadyserve.config import AuthConfig, Config, DeploymentConfig, GatewayConfig
from steadyserve.errors import ClientError, RateLimited, Unauthorized
from steadyserve.gateway.access import host_of
from steadyserve.policies.ratelimit import Bucket, take


def counter_bytes():
    """Deterministic 'random' bytes: distinct on every call."""
    n = itertools.count(1)

    def random_bytes(size: int) -> bytes:
        return next(n).to_bytes(size, "big")

    return random_bytes


# tokens -------------------------------------------------------------------------------------

def test_token_round_trip_and_digest():
    key_id, token = new_token()
    assert key_id_of(token) == key_id and len(key_id) == 12
    assert digest(token) != digest(new_secret_for(key_id))
    assert key_id_of(new_secret_for(key_id)) == key_id


@pytest.mark.parametrize("token", [
    "", "unused", "sk-abc", "ss_123_456", "ss_" + "g" * 12 + "_" + "0" * 64,
    "ss_" + "0" * 12 + "_" + "0" * 63, "ss_" + "0" * 12 + "_" + "0" * 65,
    "ss_" + "0" * 12 + "_" + "0" * 64 + "\n", "x" * 10_000,
])
def test_malformed_tokens_have_no_id(token):
    assert key_id_of(token) is None


# the token bucket -----------------------------------------------------------------------------

@pytest.mark.parametrize(("bucket", "rate", "burst", "now", "allowed", "retry", "tokens"), [
    (None, 2.0, 3.0, 0.0, True, 0.0, 2.0),  # starts full
    (Bucket(0.0, 0.0), 2.0, 3.0, 0.0, False, 0.5, 0.0),  # empty: half a second to one token
    (Bucket(0.0, 0.0), 2.0, 3.0, 0.5, True, 0.0, 0.0),  # refilled one token
    (Bucket(0.0, 0.0), 2.0, 3.0, 100.0, True, 0.0, 2.0),  # capped at the burst
    (Bucket(0.5, 10.0), 1.0, 1.0, 9.0, False, 0.5, 0.5),  # clock stepped back: no refill
    (None, 0.0, 1.0, 0.0, True, 0.0, 1.0),  # no limit
])
def test_token_bucket(bucket, rate, burst, now, allowed, retry, tokens):
    ok, retry_after, new = take(bucket, rate_per_s=rate, burst=burst, now=now)
    assert (ok, retry_after, new.tokens) == (allowed, pytest.approx(retry), pytest.approx(tokens))


def test_token_bucket_sustains_its_rate():
    bucket, allowed = None, 0
    for i in range(1000):  # 10 s at 100 requests/s offered, 10/s allowed, burst 5
        ok, _, bucket = take(bucket, rate_per_s=10.0, burst=5.0, now=i * 0.01)
        allowed += ok
    assert 100 <= allowed <= 106


# key settings ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("body", "param"), [
    ({}, "name"),
    ({"name": ""}, "name"),
    ({"name": "x" * 65}, "name"),
    ({"name": "a b"}, "name"),
    ({"name": "k", "scopes": []}, "scopes"),
    ({"name": "k", "scopes": ["root"]}, "scopes"),
    ({"name": "k", "scopes": "admin"}, "scopes"),
    ({"name": "k", "rate_limit_per_s": -1}, "rate_limit_per_s"),
    ({"name": "k", "rate_limit_per_s": float("nan")}, "rate_limit_per_s"),
    ({"name": "k", "rate_limit_per_s": True}, "rate_limit_per_s"),
    ({"name": "k", "burst": 0}, "burst"),
    ({"name": "k", "burst": 1.5}, "burst"),
    ({"name": "k", "priority": "urgent"}, "priority"),
    ({"name": "k", "deployments": ["../etc"]}, "deployments"),
    ({"name": "k", "deployments": ["a"] * 101}, "deployments"),
    ({"name": "k", "expires_in_s": 1}, "expires_in_s"),
    ({"name": "k", "owner": "me"}, "owner"),
])
def test_bad_key_settings_name_the_field(body, param):
    with pytest.raises(ClientError) as err:
        parse_spec(body)
    assert err.value.param == param


def test_key_settings_defaults():
    spec = parse_spec({"name": "web"})
    assert (spec.scopes, spec.priority, spec.deployments, spec.rate_limit_per_s) == (
        frozenset({"infer"}), "interactive", (), 0.0)


def test_admin_scope_implies_the_others_and_deployments_restrict():
    admin = ApiKey(id="a" * 12, name="a", digest="", scopes=frozenset({"admin"}))
    infer = ApiKey(id="b" * 12, name="b", digest="", scopes=frozenset({"infer"}),
                   deployments=("minilm",))
    assert admin.allows("infer") and admin.allows("feedback") and admin.allows("admin")
    assert infer.allows("infer") and not infer.allows("admin") and not infer.allows("feedback")
    assert infer.may_call("minilm") and not infer.may_call("risk")
    assert "digest" not in infer.public()


# exposure -------------------------------------------------------------------------------------

def config(host: str, **auth) -> Config:
    return Config(deployments=(DeploymentConfig(name="d", service="m:C"),),
                  gateway=GatewayConfig(host=host), auth=AuthConfig(**auth))


@pytest.mark.parametrize(("host", "auth", "user_keys", "open_", "refuse"), [
    ("127.0.0.1", {}, False, True, False),
    ("::1", {}, False, True, False),
    ("localhost", {}, False, True, False),
    ("127.0.0.1", {}, True, False, False),
    ("0.0.0.0", {}, False, False, True),
    ("0.0.0.0", {}, True, False, False),
    ("0.0.0.0", {"allow_unauthenticated": True}, False, True, False),
    ("0.0.0.0", {"allow_unauthenticated": True}, True, False, False),
    ("10.0.0.5", {"inference": "required"}, False, False, False),
    ("127.0.0.1", {"inference": "required"}, False, False, False),
])
def test_exposure_table(host, auth, user_keys, open_, refuse):
    cfg = config(host, **auth)
    assert inference_open(cfg, user_keys) is open_
    problem = exposure_problem(cfg, user_keys)
    assert (problem is not None) is refuse
    if refuse:
        assert "\n" not in problem and "--allow-unauthenticated" in problem


@pytest.mark.parametrize(("header", "host"), [
    ("localhost:8000", "localhost"), ("127.0.0.1", "127.0.0.1"), ("[::1]:8000", "::1"),
    ("Example.COM", "example.com"), ("evil.example:80", "evil.example"), (None, None),
    ("", None), ("[::1", None),
])
def test_host_of(header, host):
    assert host_of(header) == host


@pytest.mark.parametrize(("allowed", "listen", "host", "ok"), [
    ((), "127.0.0.1", "localhost", True),
    ((), "127.0.0.1", "::1", True),
    ((), "127.0.0.1", "evil.example", False),
    ((), "10.1.2.3", "10.1.2.3", True),
    ((), "0.0.0.0", "0.0.0.0", False),
    (("api.example.com",), "0.0.0.0", "api.example.com", True),
    (("api.example.com",), "0.0.0.0", "localhost", False),
    (("*",), "0.0.0.0", "anything", True),
])
def test_host_allow_list(allowed, listen, host, ok):
    assert GatewayConfig(host=listen, allowed_hosts=allowed).host_allowed(host) is ok


# the key ring ---------------------------------------------------------------------------------

class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def ring_with(*keys: ApiKey, clock: Clock | None = None) -> KeyRing:
    ring = KeyRing(wall=clock or Clock(), random_bytes=counter_bytes())
    for k in keys:
        ring.put(k)
    return ring


def user_key(token: str, **kw) -> ApiKey:
    key_id = key_id_of(token)
    assert key_id is not None
    return ApiKey(id=key_id, name="u", digest=digest(token), scopes=frozenset({"infer"}), **kw)


def test_authenticate_known_unknown_wrong_revoked_expired():
    clock = Clock()
    _, token = new_token()
    key = user_key(token, expires_at=2000.0)
    ring = ring_with(key, clock=clock)
    assert ring.authenticate(token, clock()) == key
    _, other = new_token()
    with pytest.raises(Unauthorized, match="unknown"):
        ring.authenticate(other, clock())
    with pytest.raises(Unauthorized, match="unknown"):  # right id, wrong secret
        ring.authenticate(new_secret_for(key.id), clock())
    with pytest.raises(Unauthorized, match="malformed"):
        ring.authenticate("unused", clock())
    with pytest.raises(Unauthorized, match="expired"):
        ring.authenticate(token, 2000.0)
    ring.put(dataclasses.replace(key, revoked_at=1500.0))
    with pytest.raises(Unauthorized, match="revoked"):
        ring.authenticate(token, clock())


def test_rotation_grace_accepts_the_old_secret_until_it_ends():
    _, old = new_token()
    key = user_key(old)
    new = new_secret_for(key.id)
    ring = ring_with(dataclasses.replace(key, digest=digest(new), previous_digest=key.digest,
                                         previous_valid_until=1100.0))
    assert ring.authenticate(new, 1050.0).id == key.id
    assert ring.authenticate(old, 1050.0).id == key.id
    with pytest.raises(Unauthorized):
        ring.authenticate(old, 1100.0)


def test_rate_limit_raises_429_with_retry_after():
    _, token = new_token()
    key = user_key(token, rate_limit_per_s=2.0, burst=2)
    ring = ring_with(key)
    ring.rate(key, 0.0)
    ring.rate(key, 0.0)
    with pytest.raises(RateLimited) as err:
        ring.rate(key, 0.1)
    assert err.value.status == 429 and err.value.retry_after_s == pytest.approx(0.4)
    ring.rate(key, 0.6)  # refilled


def test_in_memory_ring_has_an_admin_key_that_does_not_count_as_a_user_key():
    ring = KeyRing()
    assert ring.admin_token is not None
    admin = ring.authenticate(ring.admin_token, 0.0)
    assert admin.allows("admin")
    assert not ring.user_keys_exist()
    _, token = new_token()
    ring.put(user_key(token))
    assert ring.user_keys_exist()


def test_bootstrap_writes_a_private_admin_key_file_and_reuses_it(tmp_path: Path):
    path = tmp_path / "data" / "admin.key"
    first = KeyRing(admin_key_path=path)
    first.bootstrap()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == first.admin_token
    second = KeyRing(admin_key_path=path)
    second.bootstrap()
    assert second.admin_token == first.admin_token
    assert second.authenticate(first.admin_token, 0.0).allows("admin")


def test_bootstrap_tightens_a_readable_key_file_and_replaces_a_malformed_one(tmp_path: Path):
    path = tmp_path / "admin.key"
    _, token = new_token()
    path.write_text(token)
    os.chmod(path, 0o644)
    ring = KeyRing(admin_key_path=path)
    ring.bootstrap()
    assert ring.admin_token == token and stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text("garbage")
    again = KeyRing(admin_key_path=path)
    again.bootstrap()
    assert again.admin_token != "garbage" and key_id_of(path.read_text().strip()) is not None
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
