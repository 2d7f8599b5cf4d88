"""API keys: who is calling, and may they do this.

Owns: reading the keys file (TOML), or taking the one `--api-key` (an admin of the default
tenant), turning an `Authorization: Bearer <key>` header into a `Principal` (a tenant, a role and
the tenant's weight), and the open single-tenant mode used when neither is given.
Keys are compared as SHA-256 digests with `hmac.compare_digest` against every entry, so timing
says nothing about which key (or how much of one) matched. Keys are never logged or echoed.

The keys file:

    [[keys]]
    key = "sk-acme-1"            # or key_sha256 = "<hex digest>", to keep keys out of the file
    tenant = "acme"
    role = "tenant"              # or "admin", or "metrics" (may only read /metrics)
    weight = 2.0                 # optional, 1 by default; 0 < weight <= 1000

A tenant's weight is its share of a busy server against the other tenants under fair scheduling
(acme above is served twice the tokens of a weight-1 tenant while both wait); every key of one
tenant gives the same weight (a key without one gives 1).

The `RequestGate` (gate.py) authenticates every `/v1` request from its headers before the body is
read, and leaves the principal in the request state, where `caller` finds it.
"""

import hashlib
import hmac
import tomllib
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request

from loraplex.config import ServerConfig
from loraplex.errors import Unauthorized
from loraplex.tenancy import DEFAULT_TENANT, DEFAULT_WEIGHT, MAX_WEIGHT, Principal


@dataclass(frozen=True)
class _KeyEntry:
    digest: bytes
    principal: Principal


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _weight(raw: dict, where: str) -> float:
    """An entry's `weight`: a number in (0, MAX_WEIGHT], DEFAULT_WEIGHT when absent."""
    weight = raw.get("weight", DEFAULT_WEIGHT)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not (0 < weight <= MAX_WEIGHT):
        raise ValueError(f"{where}: weight must be a number > 0 and <= {MAX_WEIGHT:g}, got {weight!r}")
    return float(weight)


class ApiKeys:
    """The keys a server accepts; `ApiKeys.open()` accepts everyone as one default tenant."""

    def __init__(self, entries: list[_KeyEntry], open_access: bool = False):
        self._entries = entries
        self.open_access = open_access

    @classmethod
    def open(cls) -> "ApiKeys":
        return cls([], open_access=True)

    @classmethod
    def single(cls, key: str) -> "ApiKeys":
        """One admin key of the default tenant (`--api-key`); the config has checked its length."""
        return cls([_KeyEntry(_digest(key), Principal(DEFAULT_TENANT, "admin"))])

    @classmethod
    def of(cls, config: ServerConfig) -> "ApiKeys":
        """The keys a server's config names: its keys file, its one key, or none (open)."""
        if config.api_keys is not None:
            return cls.load(config.api_keys)
        return cls.single(config.api_key) if config.api_key is not None else cls.open()

    @classmethod
    def load(cls, path: Path) -> "ApiKeys":
        """Read a keys file; raises ValueError naming the first problem (never the key itself)."""
        try:
            document = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"cannot read API keys file {path}: {exc}") from None
        raw_entries = document.get("keys")
        if not isinstance(raw_entries, list) or not raw_entries:
            raise ValueError(f"{path}: expected one or more [[keys]] tables")
        entries, seen = [], set()
        weights: dict[str, tuple[float, int]] = {}  # tenant -> (weight, entry number) of its first entry
        for number, raw in enumerate(raw_entries, start=1):
            where = f"{path}: [[keys]] entry {number}"
            if not isinstance(raw, dict):
                raise ValueError(f"{where} must be a table")
            unknown = set(raw) - {"key", "key_sha256", "tenant", "role", "weight"}
            if unknown:
                raise ValueError(f"{where} has unknown fields: {', '.join(sorted(unknown))}")
            if ("key" in raw) == ("key_sha256" in raw):
                raise ValueError(f"{where} needs exactly one of key or key_sha256")
            if "key" in raw:
                if not isinstance(raw["key"], str) or len(raw["key"]) < 8:
                    raise ValueError(f"{where}: key must be a string of at least 8 characters")
                digest = _digest(raw["key"])
            else:
                try:
                    digest = bytes.fromhex(str(raw["key_sha256"]))
                except ValueError:
                    digest = b""
                if len(digest) != 32:
                    raise ValueError(f"{where}: key_sha256 must be 64 hex digits")
            tenant, role = raw.get("tenant"), raw.get("role", "tenant")
            if not isinstance(tenant, str) or not tenant:
                raise ValueError(f"{where}: tenant must be a non-empty string")
            if role not in ("admin", "tenant", "metrics"):
                raise ValueError(f"{where}: role must be 'admin', 'tenant' or 'metrics', got {role!r}")
            weight = _weight(raw, where)
            first_weight, first_number = weights.setdefault(tenant, (weight, number))
            if first_weight != weight:
                raise ValueError(
                    f"{where} gives tenant {tenant!r} weight {weight:g}, entry {first_number} gave it {first_weight:g} "
                    f"(a missing weight is {DEFAULT_WEIGHT:g}); every key of a tenant must give the same weight"
                )
            if digest in seen:
                raise ValueError(f"{where} repeats a key already listed")
            seen.add(digest)
            entries.append(_KeyEntry(digest, Principal(tenant, role, weight)))
        return cls(entries)

    def tenant_weights(self) -> dict[str, float]:
        """Each tenant of the keys file and its weight; empty for an open server."""
        return {entry.principal.tenant: entry.principal.weight for entry in self._entries}

    def authenticate(self, authorization: str | None) -> Principal:
        """The caller named by an `Authorization` header value.

        Raises:
            Unauthorized: the header is missing, not a bearer token, or the key is unknown.
        """
        if self.open_access:
            return Principal(DEFAULT_TENANT, "admin")
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        presented = _digest(key.strip())
        found = None
        for entry in self._entries:  # no early exit: every entry is compared
            if hmac.compare_digest(presented, entry.digest):
                found = entry.principal
        if found is None:
            raise Unauthorized("unknown API key")
        return found


def caller(request: Request) -> Principal:
    """FastAPI dependency: the `Principal` behind this request's `Authorization` header."""
    principal = getattr(request.state, "principal", None)
    if principal is None:  # not through the gate's /v1 prefix
        principal = request.app.state.services.keys.authenticate(request.headers.get("authorization"))
    return principal
