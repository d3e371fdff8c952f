"""The gateway's signer client: pure parts (key set, local verification rules, cache) and, over a
real signer process (support.signer_process) on a Unix socket / mTLS TCP with the session PKI,
remote and local verification end to end. The verification core itself (pki.jwt_svid) is tested
in tests/pki/test_pki_jwt_svid.py."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
import tracemalloc
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any

import jwt
import pytest
from support.jwt_keys import AUD, ISS, NOW, SUB, Signer
from support.pki import ADMIN_ID, GATEWAY_ID, SIGNER_ID, Pki
from support.ports import free_port
from support.signer_process import SignerProcess, deep_merge
from support.waiting import wait_for
from svidgate.gateway.config import SignerCacheConfig, SignerClientConfig, parse_config
from svidgate.gateway.errors import SignerUnavailable, TokenRejected
from svidgate.gateway.signer_client import (
    KeySet,
    KeySetError,
    SignerClient,
    VerificationCache,
    cache_key,
    entry_cost,
    local_policy,
)
from svidgate.pki.jwt_svid import MAX_TOKEN_BYTES, UnknownKidError, VerifiedToken

from svidgate.config import ConfigError

SKEW = timedelta(seconds=30)


def keyset(
    *signers: Signer,
    sequence: int = 1,
    max_ttl_seconds: int = 0,
    clock_skew_seconds: int = 0,
    **extra: Any,
) -> KeySet:
    return KeySet.parse(
        json.dumps({"keys": [s.jwk for s in signers], **extra}),
        sequence,
        max_ttl_seconds=max_ttl_seconds,
        clock_skew_seconds=clock_skew_seconds,
    )


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def es() -> Signer:
    return Signer("k1")


# ---------------------------------------------------------------------------------------------
# key sets


def test_keyset_parses_every_algorithm() -> None:
    signers = [Signer("a", "ES256"), Signer("b", "EdDSA"), Signer("c", "RS256")]
    keys = keyset(*signers, sequence=7, issuer=ISS)
    assert keys.sequence == 7
    assert sorted(keys.keys) == ["a", "b", "c"]
    assert keys.issuer == ISS


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda k: k.pop("kid"), "missing kid"),
        (lambda k: k.pop("alg"), "is not allowed"),
        (lambda k: k.update(alg="HS256"), "is not allowed"),
        (lambda k: k.update(alg="none"), "is not allowed"),
        (lambda k: k.update(use="enc"), "use must be 'sig'"),
        (lambda k: k.update(d="AAAA"), "private key material"),
        (lambda k: k.update(crv="P-999"), "k1"),
    ],
)
def test_keyset_rejects_unsafe_keys(mutate: Any, message: str) -> None:
    jwk = dict(Signer("k1").jwk)
    mutate(jwk)
    with pytest.raises(KeySetError, match=message):
        KeySet.parse(json.dumps({"keys": [jwk]}), 1)


def test_keyset_rejects_duplicate_kid_and_junk() -> None:
    s = Signer("k1")
    with pytest.raises(KeySetError, match="duplicate"):
        KeySet.parse(json.dumps({"keys": [s.jwk, s.jwk]}), 1)
    for junk in ("", "[]", '{"keys": {}}', "{", '{"keys": [1]}'):
        with pytest.raises(KeySetError):
            KeySet.parse(junk, 1)


def test_hmac_key_is_refused() -> None:
    with pytest.raises(KeySetError):
        KeySet.parse(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]}), 1)


# ---------------------------------------------------------------------------------------------
# local verification rules: pki.jwt_svid's core (tests/pki/test_pki_jwt_svid.py holds the
# verification tests that lived here); the gateway picks issuer, max_ttl and skew


def test_local_policy_issuer_from_config_or_key_set(es: Signer) -> None:
    pushed = keyset(es, issuer=ISS, max_ttl_seconds=900, clock_skew_seconds=30)
    assert local_policy(pushed, issuer=None, max_ttl=None, clock_skew=SKEW).issuer == ISS
    other = "spiffe://example.org/other"
    assert local_policy(pushed, issuer=other, max_ttl=None, clock_skew=SKEW).issuer == other
    with pytest.raises(SignerUnavailable, match="issuer"):
        local_policy(keyset(es, max_ttl_seconds=900), issuer=None, max_ttl=None, clock_skew=SKEW)


def test_local_policy_max_ttl_and_skew_are_never_looser_than_the_signer(es: Signer) -> None:
    pushed = keyset(es, issuer=ISS, max_ttl_seconds=900, clock_skew_seconds=20)
    policy = local_policy(pushed, issuer=None, max_ttl=None, clock_skew=SKEW)
    assert (policy.max_ttl, policy.clock_skew) == (timedelta(minutes=15), timedelta(seconds=20))
    stricter = local_policy(
        pushed, issuer=None, max_ttl=timedelta(minutes=5), clock_skew=timedelta(seconds=5)
    )
    assert (stricter.max_ttl, stricter.clock_skew) == (timedelta(minutes=5), timedelta(seconds=5))
    looser = local_policy(pushed, issuer=None, max_ttl=timedelta(hours=1), clock_skew=SKEW * 9)
    assert (looser.max_ttl, looser.clock_skew) == (timedelta(minutes=15), timedelta(seconds=20))
    # nothing pushed (an older signer): only a configured max_ttl makes local mode possible
    unpushed = keyset(es, issuer=ISS)
    assert unpushed.max_ttl is None and unpushed.clock_skew is None
    with pytest.raises(SignerUnavailable, match="max_ttl"):
        local_policy(unpushed, issuer=None, max_ttl=None, clock_skew=SKEW)
    configured = local_policy(unpushed, issuer=None, max_ttl=timedelta(minutes=2), clock_skew=SKEW)
    assert (configured.max_ttl, configured.clock_skew) == (timedelta(minutes=2), SKEW)


def test_keyset_lookup_and_pushed_rules(es: Signer) -> None:
    keys = keyset(es, max_ttl_seconds=60, clock_skew_seconds=0)
    assert keys.lookup("k1").public_key == es.private.public_key()
    assert (keys.max_ttl, keys.clock_skew) == (timedelta(seconds=60), timedelta(0))
    with pytest.raises(UnknownKidError):
        keys.lookup("nobody")
    with pytest.raises(KeySetError, match="negative"):
        keyset(es, max_ttl_seconds=-1)


# ---------------------------------------------------------------------------------------------
# cache


def vt(kid: str, exp: int = 2_000_000_000) -> VerifiedToken:
    return VerifiedToken(kid=kid, subject=SUB, expires_at=exp, claims={})


def test_cache_key_separates_every_input_and_hides_the_token() -> None:
    base = cache_key("tok", "a", None, None)
    assert base != cache_key("tok", "b", None, None)
    assert base != cache_key("tok", "a", SUB, None)
    assert base != cache_key("tok", "a", None, "t")
    assert base != cache_key("tok2", "a", None, None)
    assert "tok" not in repr(base)


def test_cache_lru_and_expiry() -> None:
    cache = VerificationCache(max_entries=2)
    k1, k2, k3 = (cache_key(t, AUD, None, None) for t in ("t1", "t2", "t3"))
    cache.put(k1, vt("a"), valid_until=NOW + 10, now=NOW, token_bytes=2)
    cache.put(k2, vt("a"), valid_until=NOW + 10, now=NOW, token_bytes=2)
    assert cache.get(k1, now=NOW) is not None  # k1 now most recent
    cache.put(k3, vt("a"), valid_until=NOW + 10, now=NOW, token_bytes=2)
    assert cache.get(k2, now=NOW) is None  # least recently used was evicted
    assert cache.get(k1, now=NOW) is not None
    assert cache.get(k3, now=NOW + 10) is None  # expired at valid_until
    assert len(cache) == 1
    # already expired: not stored
    cache.put(k2, vt("a"), valid_until=NOW - 1, now=NOW, token_bytes=2)
    assert cache.get(k2, now=NOW) is None


def test_cache_drops_entries_of_removed_keys() -> None:
    cache = VerificationCache()
    ka, kb = cache_key("ta", AUD, None, None), cache_key("tb", AUD, None, None)
    cache.put(ka, vt("old"), valid_until=NOW + 60, now=NOW, token_bytes=2)
    cache.put(kb, vt("new"), valid_until=NOW + 60, now=NOW, token_bytes=2)
    assert cache.retain_kids({"new"}) == 1
    assert cache.get(ka, now=NOW) is None
    assert cache.get(kb, now=NOW) is not None


def roles_token(seed: int, count: int, kid: str = "a") -> VerifiedToken:
    """A verification whose claims hold ``count`` distinct short strings (costly per byte)."""
    claims = json.loads(json.dumps({"sub": SUB, "roles": [f"r{seed}-{i}" for i in range(count)]}))
    return VerifiedToken(kid=kid, subject=SUB, expires_at=2_000_000_000, claims=claims)


def test_cache_is_bounded_by_bytes_and_evicts_the_least_recently_used() -> None:
    keys = [cache_key(f"t{i}", AUD, SUB, "x" * 43) for i in range(6)]
    tokens = [roles_token(i, 200) for i in range(6)]
    costs = [entry_cost(k, t) for k, t in zip(keys, tokens, strict=True)]
    assert min(costs) > 200 * 50  # the claims are counted, not only the entry
    cache = VerificationCache(max_entries=1000, max_bytes=sum(costs[:3]) + 100)

    def put(i: int, token: VerifiedToken | None = None) -> bool:
        entry = tokens[i] if token is None else token
        return cache.put(keys[i], entry, valid_until=NOW + 60, now=NOW, token_bytes=3000)

    assert all(put(i) for i in range(3))
    assert len(cache) == 3 and cache.bytes == sum(costs[:3])
    assert cache.get(keys[0], now=NOW) is not None  # keys[0] is now the most recent
    assert put(3)  # over the byte budget: the least recently used (keys[1]) goes
    assert cache.get(keys[1], now=NOW) is None
    assert all(cache.get(keys[i], now=NOW) is not None for i in (0, 2, 3))
    assert cache.bytes == costs[0] + costs[2] + costs[3] <= cache.max_bytes
    assert put(3)  # the same key again replaces its entry, counted once
    assert cache.bytes == costs[0] + costs[2] + costs[3]
    # an entry larger than the whole budget is not cached and evicts nothing
    assert not put(4, roles_token(4, 5000))
    assert len(cache) == 3 and cache.get(keys[4], now=NOW) is None
    # expiry, removed keys and clear() give their bytes back
    assert cache.get(keys[0], now=NOW + 60) is None
    assert cache.bytes == costs[2] + costs[3]
    assert put(5, roles_token(5, 200, kid="b")) and cache.retain_kids({"a"}) == 1
    assert cache.bytes == costs[2] + costs[3]
    cache.clear()
    assert (len(cache), cache.bytes) == (0, 0)


def test_cache_also_keeps_its_entry_bound() -> None:
    cache = VerificationCache(max_entries=2, max_bytes=10**9)
    for i in range(5):
        key = cache_key(f"t{i}", AUD, None, None)
        cache.put(key, vt("a"), valid_until=NOW + 60, now=NOW, token_bytes=10)
    assert len(cache) == 2
    assert cache.bytes == 2 * entry_cost(cache_key("t4", AUD, None, None), vt("a"))


def test_tokens_above_max_token_bytes_are_not_cached() -> None:
    cache = VerificationCache(max_token_bytes=100)
    at, above = cache_key("at", AUD, None, None), cache_key("above", AUD, None, None)
    assert cache.put(at, vt("a"), valid_until=NOW + 60, now=NOW, token_bytes=100)
    assert not cache.put(above, vt("a"), valid_until=NOW + 60, now=NOW, token_bytes=101)
    assert cache.get(at, now=NOW) is not None and cache.get(above, now=NOW) is None
    off = VerificationCache(max_token_bytes=0)
    assert not off.put(at, vt("a"), valid_until=NOW + 60, now=NOW, token_bytes=1)
    assert (len(off), off.bytes) == (0, 0)
    with pytest.raises(ValueError):
        VerificationCache(max_bytes=0)


SHAPES: dict[str, Any] = {
    "few claims": {},
    "short strings": {"roles": [f"r{i}" for i in range(400)]},
    "one long string": {"blob": "x" * 2800},
    "empty objects": {"e": [{} for _ in range(900)]},
    "nested objects": {"n": {f"k{i}": {"a": i, "b": [i, str(i)]} for i in range(100)}},
    "floats": {"f": [i + 0.5 for i in range(500)]},
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_entry_cost_never_undercounts_what_tracemalloc_measures(shape: str) -> None:
    """The cost model against the memory the cache really takes (CPython, tracemalloc): never
    less, and at most twice as much."""
    count = 200
    documents = [
        json.dumps(
            {"iss": ISS, "sub": SUB, "aud": [AUD], "exp": 2_000_000_000 + i, **SHAPES[shape]}
        )
        for i in range(count)
    ]
    cache = VerificationCache(max_entries=10**6, max_bytes=10**12)
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        for i, document in enumerate(documents):
            # what a request makes: its own key (digest, tuple, subject and thumbprint strings)
            key = cache_key(f"token-{i}", AUD, f"{SUB}/{i}", f"{i:043d}")
            claims = json.loads(document)
            token = VerifiedToken(
                kid="k", subject=claims["sub"], expires_at=1, claims=MappingProxyType(claims)
            )
            cache.put(key, token, valid_until=NOW + 60, now=NOW, token_bytes=1)
        measured = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    assert len(cache) == count
    assert measured <= cache.bytes <= 2 * measured, (measured / count, cache.bytes / count)


async def test_client_caches_only_tokens_within_its_configured_bounds(es: Signer) -> None:
    bounds = SignerCacheConfig(max_entries=100, max_bytes=10**6, max_token_bytes=1000)
    client = _local_client(es, cache=bounds)
    assert (client.cache.max_bytes, client.local_cache.max_token_bytes) == (10**6, 1000)
    small, large = _live_token(es), _live_token(es, roles=["r" * 10] * 100)
    assert len(small) <= 1000 < len(large)
    for token in (small, large, large):
        assert (await client.verify(token, audience=AUD, mode="local")).subject == SUB
    assert len(client.local_cache) == 1  # the large token was verified twice, never cached
    assert client.local_cache.get(cache_key(large, AUD, None, None), now=time.time()) is None


def test_new_key_set_evicts_verifications_of_removed_keys_and_bad_sets_are_ignored() -> None:
    client = SignerClient(address="unix:/nonexistent/s.sock", timeout=timedelta(seconds=1))
    old, new = Signer("old"), Signer("new")
    client._install_keyset(json.dumps({"keys": [old.jwk, new.jwk]}), 1)
    ka, kb = cache_key("ta", AUD, None, None), cache_key("tb", AUD, None, None)
    now = time.time()
    client.cache.put(ka, vt("old"), valid_until=now + 60, now=now, token_bytes=2)
    client.cache.put(kb, vt("new"), valid_until=now + 60, now=now, token_bytes=2)
    client._install_keyset(json.dumps({"keys": [new.jwk]}), 2)  # "old" was removed
    assert client.cache.get(ka, now=now) is None
    assert client.cache.get(kb, now=now) is not None
    # an unusable key set is refused and the last good one stays in force
    with pytest.raises(SignerUnavailable):
        client._install_keyset(json.dumps({"keys": [{**new.jwk, "d": "x"}]}), 3)
    assert client.keyset is not None and client.keyset.sequence == 2
    assert client.cache.get(kb, now=now) is not None


# ---------------------------------------------------------------------------------------------
# configuration


def test_from_config_uses_the_gateway_model(tmp_path: Path) -> None:
    cfg = SignerClientConfig.model_validate(
        {"address": "unix:run/signer.sock", "timeout": "100ms"}, context={"base_dir": tmp_path}
    )
    client = SignerClient.from_config(cfg)
    assert client.address == f"unix:{tmp_path}/run/signer.sock"
    assert client.timeout == timedelta(milliseconds=100)
    assert not client.ready()
    assert not client.ready(mode="local")


def test_tcp_without_tls_is_a_config_error(tmp_path: Path) -> None:
    cfg = SignerClientConfig.model_validate(
        {"address": "127.0.0.1:7443"}, context={"base_dir": tmp_path}
    )
    with pytest.raises(ConfigError, match=r"signer\.tls"):
        SignerClient.from_config(cfg)


def _gateway_doc(signer: dict[str, Any]) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:8443",
        "tls": {"cert": "gateway.crt", "key": "gateway.key"},
        "trust_domains": {"example.org": {"bundle": "bundle.pem"}},
        "signer": signer,
    }


def test_tcp_signer_needs_its_spiffe_id_and_server_name_is_only_sni(tmp_path: Path) -> None:
    tls = {"cert": "gateway.crt", "key": "gateway.key", "bundle": "bundle.pem"}
    doc = _gateway_doc({"address": "127.0.0.1:7443", "tls": tls})
    with pytest.raises(ConfigError, match=r"signer\.tls\.spiffe_id: is required"):
        parse_config(doc, base_dir=tmp_path)
    doc["signer"]["tls"] = {**tls, "spiffe_id": SIGNER_ID}
    cfg = parse_config(doc, base_dir=tmp_path).signer
    assert cfg is not None and cfg.tls is not None
    assert (cfg.tls.spiffe_id, cfg.tls.server_name) == (SIGNER_ID, None)  # no "localhost"
    doc["signer"]["tls"]["spiffe_id"] = "spiffe://example.org"  # a trust domain, not a workload
    with pytest.raises(ConfigError, match=r"signer\.tls\.spiffe_id: "):
        parse_config(doc, base_dir=tmp_path)


def test_cache_bounds_are_configurable(tmp_path: Path) -> None:
    cfg = parse_config(_gateway_doc({"address": "unix:s.sock"}), base_dir=tmp_path).signer
    assert cfg is not None
    client = SignerClient.from_config(cfg)
    for cache in (client.cache, client.local_cache):
        assert (cache.max_entries, cache.max_bytes, cache.max_token_bytes) == (
            10_000,
            16 * 1024 * 1024,
            4096,
        )
    bounds = {"max_entries": 5, "max_bytes": 65536, "max_token_bytes": 0}
    cfg = parse_config(
        _gateway_doc({"address": "unix:s.sock", "cache": bounds}), base_dir=tmp_path
    ).signer
    assert cfg is not None
    client = SignerClient.from_config(cfg)
    assert (client.local_cache.max_entries, client.cache.max_bytes) == (5, 65536)
    assert client.cache.max_token_bytes == 0
    bad = {"address": "unix:s.sock", "cache": {"max_bytes": 0, "max_token_bytes": -1}}
    with pytest.raises(ConfigError) as info:
        parse_config(_gateway_doc(bad), base_dir=tmp_path)
    assert "signer.cache.max_bytes: " in str(info.value)
    assert "signer.cache.max_token_bytes: " in str(info.value)


async def test_unstarted_client_is_unavailable(es: Signer) -> None:
    client = SignerClient(address="unix:/nonexistent/s.sock", timeout=timedelta(seconds=1))
    with pytest.raises(SignerUnavailable):
        await client.verify(es.token(), audience=AUD, mode="remote")
    with pytest.raises(SignerUnavailable):
        await client.verify(es.token(), audience=AUD, mode="local")


# ---------------------------------------------------------------------------------------------
# Against a real signer process (`svidgate signer serve`, file keys) on a Unix socket / mTLS TCP

MODES = ("remote", "local")
# this module's signer: only the gateway may verify, the admin may rotate; no clock skew, so
# exp is exact in both modes
SIGNER_CONFIG: dict[str, Any] = {
    "authorization": {"verify": [GATEWAY_ID], "rotate": [ADMIN_ID]},
    "tokens": {"clock_skew": "0s"},
    "rotation": {"poll_interval": "1s"},
}


def client_of(proc: SignerProcess, **kwargs: Any) -> SignerClient:
    """A gateway signer client of ``proc``'s Unix socket with this module's local rules."""
    kwargs.setdefault("issuer", ISS)
    kwargs.setdefault("clock_skew", timedelta(0))
    return SignerClient(address=f"unix:{proc.socket}", timeout=timedelta(seconds=2), **kwargs)


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SignerProcess]:
    proc = SignerProcess.file_keys(tmp_path_factory.mktemp("signer"), SIGNER_CONFIG)
    proc.start_sync()
    yield proc
    if proc.running:
        proc.stop()


@pytest.fixture
def own_signer(tmp_path: Path) -> Iterator[SignerProcess]:
    proc = SignerProcess.file_keys(tmp_path / "s", SIGNER_CONFIG)
    proc.start_sync()
    yield proc
    if proc.running:
        proc.stop()


def claims_of(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


@pytest.mark.parametrize("mode", MODES)
async def test_real_signer_valid_token(signer: SignerProcess, mode: str) -> None:
    token = signer.sign()
    async with client_of(signer) as client:
        await wait_for(lambda: client.ready(mode=mode), 15, "the key set")  # type: ignore[arg-type]
        got = await client.verify(token, audience=AUD, mode=mode, expected_subject=SUB)  # type: ignore[arg-type]
    assert got.subject == SUB
    assert got.expires_at == claims_of(token)["exp"]
    assert got.kid == jwt.get_unverified_header(token)["kid"]
    assert got.claims["iss"] == ISS


def _thumb(data: bytes) -> str:
    return b64url(hashlib.sha256(data).digest())


def _retoken(
    token: str, *, header: dict[str, Any] | None = None, claims: dict[str, Any] | None = None
) -> str:
    head, body, sig = token.split(".")
    if header is not None:
        head = b64url(json.dumps(header).encode())
    if claims is not None:
        body = b64url(json.dumps(claims).encode())
    return f"{head}.{body}.{sig}"


def _tampered(s: SignerProcess) -> str:
    token = s.sign()
    return _retoken(token, claims={**claims_of(token), "sub": "spiffe://example.org/admin"})


def _hs256(s: SignerProcess) -> str:
    token = s.sign()
    return _retoken(token, header={"alg": "HS256", "kid": jwt.get_unverified_header(token)["kid"]})


REJECTIONS: dict[str, Any] = {
    "bad_audience": lambda s: (s.sign(audience="billing"), {}),
    "bad_subject": lambda s: (s.sign(), {"expected_subject": "spiffe://example.org/other"}),
    "binding_mismatch-unbound": lambda s: (s.sign(), {"certificate_thumbprint": _thumb(b"a")}),
    "binding_mismatch-other-cert": lambda s: (
        s.sign(thumbprint=_thumb(b"a")),
        {"certificate_thumbprint": _thumb(b"b")},
    ),
    "binding_mismatch-no-cert": lambda s: (s.sign(thumbprint=_thumb(b"a")), {}),
    "binding_mismatch-required": lambda s: (s.sign(), {"require_binding": True}),
    "bad_signature": lambda s: (_tampered(s), {}),
    "unknown_kid": lambda s: (
        _retoken(s.sign(), header={"alg": "ES256", "kid": "no-such-key", "typ": "JWT"}),
        {},
    ),
    "alg_not_allowed": lambda s: (_hs256(s), {}),
    "malformed": lambda s: ("e30.e30.e30", {}),
    "too_large": lambda s: ("a" * (MAX_TOKEN_BYTES + 1), {}),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", sorted(REJECTIONS))
async def test_real_signer_rejections(signer: SignerProcess, mode: str, case: str) -> None:
    token, kwargs = REJECTIONS[case](signer)
    async with client_of(signer) as client:
        await wait_for(lambda: client.ready(mode=mode), 15, "the key set")  # type: ignore[arg-type]
        with pytest.raises(TokenRejected) as info:
            await client.verify(token, audience=AUD, mode=mode, **kwargs)  # type: ignore[arg-type]
    assert info.value.reason == case.split("-", maxsplit=1)[0]


async def test_real_signer_expired_in_both_modes(signer: SignerProcess) -> None:
    token = signer.sign(ttl=1)
    exp = claims_of(token)["exp"]
    async with client_of(signer) as client:
        await wait_for(lambda: client.ready(mode="local"), 15, "the key set")
        await wait_for(lambda: time.time() >= exp + 0.05, 5, "the token's exp to pass")
        for mode in MODES:
            with pytest.raises(TokenRejected) as info:
                await client.verify(token, audience=AUD, mode=mode)  # type: ignore[arg-type]
            assert info.value.reason == "expired", mode


async def test_signer_stopped_then_restarted(own_signer: SignerProcess) -> None:
    cached, fresh = own_signer.sign(), own_signer.sign()
    async with client_of(own_signer) as client:
        await wait_for(client.ready, 15, "the key subscription")
        await client.verify(cached, audience=AUD, mode="remote")
        own_signer.stop()
        # a verification cached before the outage still answers; anything new fails closed
        assert (await client.verify(cached, audience=AUD, mode="remote")).subject == SUB
        with pytest.raises(SignerUnavailable):
            await client.verify(fresh, audience=AUD, mode="remote")
        await wait_for(lambda: not client.ready(), 15, "the signer to be gone")
        # local mode keeps the last good key set while the signer is away
        assert client.ready(mode="local")
        assert (await client.verify(fresh, audience=AUD, mode="local")).subject == SUB

        await own_signer.start()  # same key directory: same keys
        await wait_for(client.ready, 15, "the key subscription")
        assert (await client.verify(fresh, audience=AUD, mode="remote")).subject == SUB
        newer = own_signer.sign()
        assert (await client.verify(newer, audience=AUD, mode="remote")).subject == SUB


async def test_rotation_without_failures(own_signer: SignerProcess) -> None:
    async with client_of(own_signer) as client:
        await wait_for(lambda: client.ready(mode="local"), 15, "the key set")
        kids: list[str] = []
        failures: list[str] = []
        rotated_at: float | None = None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            token = await asyncio.to_thread(own_signer.sign)
            for mode in MODES:
                try:
                    got = await client.verify(token, audience=AUD, mode=mode)  # type: ignore[arg-type]
                except Exception as exc:
                    failures.append(f"{mode}: {exc!r}")
                else:
                    if not kids or kids[-1] != got.kid:
                        kids.append(got.kid)
            if rotated_at is None and len(kids) == 1:
                await asyncio.to_thread(own_signer.rotate)
                rotated_at = time.monotonic()
            if len(kids) >= 2 and time.monotonic() - (rotated_at or 0) > 2.5:
                break
            await asyncio.sleep(0.02)
    assert failures == []
    assert len(kids) == 2, kids  # the prepared key activated and signed, verified at once


def _tls_config(tmp: Path, spiffe_id: str, cert: str = "gateway") -> SignerClientConfig:
    return SignerClientConfig.model_validate(
        {
            "address": "placeholder:1",
            "timeout": "2s",
            "issuer": ISS,
            "tls": {
                "cert": f"{cert}.crt",
                "key": f"{cert}.key",
                "bundle": "bundle.pem",
                "spiffe_id": spiffe_id,
                "server_name": "localhost",
            },
        },
        context={"base_dir": tmp},
    )


@pytest.fixture
def tcp_signer(tmp_path: Path, pki: Pki) -> Iterator[SignerProcess]:
    """This module's signer, also on mTLS TCP with the session PKI's ``signer`` SVID (DNS SAN
    ``localhost``)."""
    cert, key = pki.files("signer")
    tcp = {
        "listen": {"tcp": f"127.0.0.1:{free_port()}"},
        "tls": {"cert": str(cert), "key": str(key), "bundle": str(pki.bundle())},
    }
    proc = SignerProcess.file_keys(tmp_path / "tcp", deep_merge(SIGNER_CONFIG, tcp))
    proc.start_sync()
    yield proc
    if proc.running:
        proc.stop()


def _tcp_client(
    pki: Pki, proc: SignerProcess, spiffe_id: str, cert: str = "gateway"
) -> SignerClient:
    cfg = _tls_config(pki.dir, spiffe_id, cert).model_copy(
        update={"address": f"127.0.0.1:{proc.tcp_port}"}
    )
    client = SignerClient.from_config(cfg)
    client.clock_skew = timedelta(0)
    return client


async def test_tcp_mtls_checks_the_signer_identity(tcp_signer: SignerProcess, pki: Pki) -> None:
    token = tcp_signer.sign()
    async with _tcp_client(pki, tcp_signer, SIGNER_ID) as client:
        await wait_for(client.ready, 15, "the key subscription")
        for mode in MODES:
            got = await client.verify(token, audience=AUD, mode=mode)  # type: ignore[arg-type]
            assert got.subject == SUB
    # the same signer, but the gateway expects another SPIFFE ID: never used
    unexpected = "spiffe://example.org/not-the-signer"
    async with _tcp_client(pki, tcp_signer, unexpected) as client:
        # the event: the client dialled the signer and refused it on its SPIFFE ID
        await wait_for(lambda: client.identity_error is not None, 15, "the identity refusal")
        assert f"presented {SIGNER_ID}, expected {unexpected}" in str(client.identity_error)
        assert not client.ready() and not client.ready(mode="local")
        for mode in MODES:
            with pytest.raises(SignerUnavailable):
                await client.verify(token, audience=AUD, mode=mode)  # type: ignore[arg-type]


async def test_tcp_caller_not_allowed_to_verify(tcp_signer: SignerProcess, pki: Pki) -> None:
    token = tcp_signer.sign()
    async with _tcp_client(pki, tcp_signer, SIGNER_ID, cert="web") as client:
        # the event: the signer refused this caller on the client's verified connection
        with pytest.raises(SignerUnavailable, match="signer Verify failed: PERMISSION_DENIED"):
            await client.verify(token, audience=AUD, mode="remote")
        # a non-event cannot be awaited: a short grace for the key subscription's GetJWKS (sent
        # before that Verify, refused the same way) to have been answered; it must not be ready
        await asyncio.sleep(0.2)
        assert not client.ready()
        with pytest.raises(SignerUnavailable):
            await client.verify(token, audience=AUD, mode="remote")


async def test_unknown_kid_refetches_once_rate_limited(signer: SignerProcess) -> None:
    token = signer.sign()
    async with client_of(signer) as client:
        await wait_for(lambda: client.ready(mode="local"), 15, "the key set")
        empty = KeySet.parse('{"keys": []}', 0, max_ttl_seconds=900)
        # a stale key set (as if a push was missed): the unknown kid triggers one GetJWKS
        client._state.keyset = empty
        client._state.last_refetch = float("-inf")
        assert (await client.verify(token, audience=AUD, mode="local")).subject == SUB
        assert client.keyset is not None and client.keyset.keys
        # again at once: the refetch is rate-limited, so the kid stays unknown
        client._state.keyset = empty
        with pytest.raises(TokenRejected) as info:
            await client.verify(token, audience=AUD, mode="local")
        assert info.value.reason == "unknown_kid"


async def test_unreadable_tls_files_are_a_config_error(tmp_path: Path) -> None:
    client = SignerClient.from_config(
        _tls_config(tmp_path, SIGNER_ID).model_copy(update={"address": "127.0.0.1:1"})
    )
    with pytest.raises(ConfigError, match="cannot read"):
        await client.start()


# ---------------------------------------------------------------------------------------------
# local verification cache (same rules as the remote one)


def _push(client: SignerClient, *signers: Signer, sequence: int, **rules: int) -> None:
    """What a WatchKeys message from the signer installs: keys, issuer, max_ttl and skew."""
    rules = {"max_ttl_seconds": 900, "clock_skew_seconds": 30, **rules}
    document = {"keys": [s.jwk for s in signers], "issuer": ISS}
    client._install_keyset(json.dumps(document), sequence, **rules)


def _local_client(*signers: Signer, **kwargs: Any) -> SignerClient:
    client = SignerClient(
        address="unix:/nonexistent/s.sock", timeout=timedelta(seconds=1), **kwargs
    )
    _push(client, *signers, sequence=1)
    return client


def _live_token(s: Signer, **overrides: Any) -> str:
    now = int(time.time())
    return s.token(**{"iat": now - 5, "exp": now + 120, **overrides})


async def test_local_verifications_are_cached_per_token_audience_subject_and_thumbprint(
    es: Signer,
) -> None:
    client = _local_client(es)
    token = _live_token(es)
    first = await client.verify(token, audience=AUD, mode="local", expected_subject=SUB)
    again = await client.verify(token, audience=AUD, mode="local", expected_subject=SUB)
    assert again is first and len(client.local_cache) == 1 and len(client.cache) == 0
    # any other input is another entry, verified on its own
    with pytest.raises(TokenRejected) as exc:
        await client.verify(token, audience="other", mode="local", expected_subject=SUB)
    assert exc.value.reason == "bad_audience"
    with pytest.raises(TokenRejected) as exc:
        await client.verify(token, audience=AUD, mode="local", expected_subject=SUB + "x")
    assert exc.value.reason == "bad_subject"
    assert len(client.local_cache) == 1


async def test_local_cache_still_enforces_the_certificate_binding(es: Signer) -> None:
    client = _local_client(es)
    thumb = "A" * 43
    bound = _live_token(es, cnf={"x5t#S256": thumb})
    got = await client.verify(bound, audience=AUD, mode="local", certificate_thumbprint=thumb)
    assert got.claims["cnf"] == {"x5t#S256": thumb}
    for other in ("B" * 43, None):
        with pytest.raises(TokenRejected) as exc:
            await client.verify(bound, audience=AUD, mode="local", certificate_thumbprint=other)
        assert exc.value.reason == "binding_mismatch"
    unbound = _live_token(es)
    with pytest.raises(TokenRejected) as exc:
        await client.verify(
            unbound, audience=AUD, mode="local", certificate_thumbprint=thumb, require_binding=True
        )
    assert exc.value.reason == "binding_mismatch"


async def test_local_cache_entries_end_with_the_key_or_the_token(es: Signer) -> None:
    other = Signer("other")
    client = _local_client(es, other)
    token = _live_token(es)
    await client.verify(token, audience=AUD, mode="local")
    await client.verify(_live_token(other), audience=AUD, mode="local")
    assert len(client.local_cache) == 2
    # the same key set again (a reconnect) keeps both
    _push(client, es, other, sequence=2)
    assert len(client.local_cache) == 2
    # the key removed: its verification is gone, and the token no longer verifies
    _push(client, other, sequence=3)
    assert len(client.local_cache) == 1
    client._state.last_refetch = time.monotonic()  # no signer to refetch from
    with pytest.raises(TokenRejected) as exc:
        await client.verify(token, audience=AUD, mode="local")
    assert exc.value.reason == "unknown_kid"
    # a different key published under the same kid also drops the entry
    impostor = Signer("other")
    _push(client, impostor, sequence=4)
    assert len(client.local_cache) == 0
    # an expiring token is cached only until its exp
    short = _live_token(impostor, exp=int(time.time()) + 1)
    await client.verify(short, audience=AUD, mode="local")
    assert len(client.local_cache) == 1
    key = cache_key(short, AUD, None, None)
    assert client.local_cache.get(key, now=time.time() + 2) is None


# ---------------------------------------------------------------------------------------------
# local mode applies the signer's max_ttl (pushed with the keys); config can only tighten it


async def test_local_mode_applies_the_pushed_max_ttl(es: Signer) -> None:
    long_lived = _live_token(es, exp=int(time.time()) + 600)  # 605 s: above 300, below 900
    client = _local_client(es)  # pushed: 900 s
    assert (await client.verify(long_lived, audience=AUD, mode="local")).subject == SUB
    _push(client, es, sequence=2, max_ttl_seconds=300)  # new rules drop the cached entry
    assert len(client.local_cache) == 0
    with pytest.raises(TokenRejected) as exc:
        await client.verify(long_lived, audience=AUD, mode="local")
    assert exc.value.reason == "malformed"
    # a configured max_ttl only ever makes it stricter
    for configured, reason in ((timedelta(minutes=5), "malformed"), (timedelta(hours=1), "ok")):
        strict = _local_client(es, max_ttl=configured)
        try:
            await strict.verify(long_lived, audience=AUD, mode="local")
        except TokenRejected as err:
            assert err.reason == reason
        else:
            assert reason == "ok"
    loose = _local_client(es, max_ttl=timedelta(hours=1))
    _push(loose, es, sequence=2, max_ttl_seconds=300)
    with pytest.raises(TokenRejected) as exc:
        await loose.verify(long_lived, audience=AUD, mode="local")
    assert exc.value.reason == "malformed"


async def test_local_mode_is_unavailable_without_any_max_ttl(es: Signer) -> None:
    client = SignerClient(address="unix:/nonexistent/s.sock", timeout=timedelta(seconds=1))
    await client.start()
    try:
        _push(client, es, sequence=1, max_ttl_seconds=0)  # a signer that sends no max_ttl
        assert client.keyset is not None and not client.ready(mode="local")
        with pytest.raises(SignerUnavailable, match="max_ttl"):
            await client.verify(_live_token(es), audience=AUD, mode="local")
        with pytest.raises(TokenRejected):  # a broken token is still a 401, not a 503
            await client.verify("a.b", audience=AUD, mode="local")
        _push(client, es, sequence=2)
        assert client.ready(mode="local")
        assert (await client.verify(_live_token(es), audience=AUD, mode="local")).subject == SUB
    finally:
        await client.close()
    configured = _local_client(es, max_ttl=timedelta(minutes=5))
    _push(configured, es, sequence=2, max_ttl_seconds=0)
    assert (await configured.verify(_live_token(es), audience=AUD, mode="local")).subject == SUB


def test_configured_max_ttl(tmp_path: Path) -> None:
    cfg = SignerClientConfig.model_validate(
        {"address": "unix:s.sock", "max_ttl": "5m"}, context={"base_dir": tmp_path}
    )
    assert SignerClient.from_config(cfg).max_ttl == timedelta(minutes=5)
    unset = SignerClientConfig.model_validate(
        {"address": "unix:s.sock"}, context={"base_dir": tmp_path}
    )
    assert SignerClient.from_config(unset).max_ttl is None
    with pytest.raises(ConfigError, match=r"signer\.max_ttl"):
        SignerClient(address="unix:s.sock", timeout=timedelta(seconds=1), max_ttl=timedelta(0))


def _out_of_band_token(s: SignerProcess, lifetime: int) -> str:
    """A token signed with the signer's own key file, but not by the signer (no max_ttl cap)."""
    from cryptography.hazmat.primitives import serialization

    pem = sorted((s.config.parent / "keys").glob("*.pem"))[-1]
    key = serialization.load_pem_private_key(pem.read_bytes(), password=None)
    now = int(time.time())
    claims = {"iss": ISS, "sub": SUB, "aud": AUD, "iat": now - 5, "exp": now - 5 + lifetime}
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": pem.stem})  # type: ignore[arg-type]


async def test_real_signer_pushes_max_ttl_and_both_modes_refuse_longer_tokens(
    signer: SignerProcess,
) -> None:
    async with client_of(signer) as client:
        await wait_for(lambda: client.ready(mode="local"), 15, "the key set")
        assert client.keyset is not None
        assert client.keyset.max_ttl == timedelta(minutes=15)
        assert client.keyset.clock_skew == timedelta(0)
        fits = _out_of_band_token(signer, 15 * 60)
        too_long = _out_of_band_token(signer, 15 * 60 + 1)
        for mode in MODES:
            got = await client.verify(fits, audience=AUD, mode=mode)  # type: ignore[arg-type]
            assert got.subject == SUB
            with pytest.raises(TokenRejected) as info:
                await client.verify(too_long, audience=AUD, mode=mode)  # type: ignore[arg-type]
            assert info.value.reason == "malformed", mode
