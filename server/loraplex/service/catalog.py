"""The adapters a server offers, who owns each, and who may see, use and change them.

Owns: the name -> `AdapterRecord` table kept in step with the engine (which serves the weights)
and the store (which keeps them across restarts); the rules of tenancy (a tenant sees its own
adapters and the shared ones, an admin sees all; another tenant's adapter is reported missing,
exactly as a missing one is); uploads (validated by the engine's own adapter checks before
anything is written); and vLLM-style loading from a path inside the allowed roots. HTTP is not
its business: it raises typed errors and the API layer maps them.
"""

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import save as save_safetensors

from loraplex.engine.client import EngineClient
from loraplex.engine.engine import Engine
from loraplex.errors import AdapterExists, AdapterNotFound, AdapterTooLarge, Forbidden, RequestInvalid
from loraplex.lora.adapter import AdapterSource, LoraAdapter, parse_config, parse_weights, read_adapter_dir
from loraplex.lora.files import directory_version, read_adapter_files
from loraplex.merging import merge_adapters
from loraplex.service.store import AdapterStore, StoredAdapter, check_name
from loraplex.tenancy import Principal

log = logging.getLogger(__name__)

# Names an adapter may not take because /v1/adapters/<name> is one of the API's own paths.
ROUTE_NAMES = frozenset({"merge"})


@dataclass(frozen=True)
class AdapterRecord:
    """An adapter the server offers: the engine's version of it plus who owns it and where it came from.

    `owner` None means shared: usable by every tenant, managed by admins only.
    `source` is "store" (kept across restarts) or "path" (loaded from a directory for this run only).
    """

    adapter: LoraAdapter
    owner: str | None
    created: float
    source: str
    path: Path
    chat_template: str | None
    version: str = ""  # the store's version of it (`StoredAdapter.version`); empty for path adapters

    @property
    def name(self) -> str:
        return self.adapter.name

    def visible_to(self, principal: Principal) -> bool:
        return principal.is_admin or self.owner is None or self.owner == principal.tenant

    def managed_by(self, principal: Principal) -> bool:
        return principal.is_admin or (self.owner is not None and self.owner == principal.tenant)

    def describe(self, tier: str) -> dict:
        """The API's view of the adapter; `tier`: where the engine holds this version now (`adapter_tier`)."""
        adapter = self.adapter
        return {
            "name": adapter.name,
            "object": "adapter",
            "rank": adapter.rank,
            "alpha": adapter.alpha,
            "use_rslora": adapter.use_rslora,
            "target_modules": adapter.target_modules,
            "size_bytes": adapter.nbytes,
            "owner": self.owner,
            "shared": self.owner is None,
            "created": int(self.created),
            "source": self.source,
            "has_chat_template": self.chat_template is not None,
            "tier": tier,
        }


@dataclass
class StoreChanges:
    """What one `sync_store` took up from the shared store, by adapter name."""

    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (name, why it cannot be served)


class AdapterCatalog:
    """Adapters by name, backed by an engine and a store.

    Args:
        engine: validates and serves adapters.
        store: keeps uploaded adapters on disk.
        reserved_names: names no adapter may take (the served base model's).
        max_adapter_bytes: the largest weights file accepted.
        lora_roots: directories `load_path` may read from (what is opened must lie inside one).
        on_registered: called with (source, seconds) after each adapter is read, validated and
            registered; source is `store`, `upload` or `path`.
        check_template: raises AdapterInvalid for a chat template that cannot render (a syntax
            error, a sample conversation that fails or runs too long); run on uploads and paths.
    """

    def __init__(
        self,
        engine: Engine | EngineClient,
        store: AdapterStore,
        reserved_names: set[str],
        max_adapter_bytes: int,
        lora_roots: tuple[Path, ...],
        on_registered: Callable[[str, float], None] | None = None,
        check_template: Callable[[str], None] | None = None,
    ):
        self._engine = engine
        self._check_template = check_template or (lambda template: None)
        self._store = store
        self._reserved = reserved_names
        self._max_bytes = max_adapter_bytes
        self._roots = tuple(Path(root).resolve() for root in lora_roots)
        self._records: dict[str, AdapterRecord] = {}
        self._lock = threading.Lock()
        self._on_registered = on_registered or (lambda source, seconds: None)
        self._unservable: dict[str, str] = {}  # name -> a store version `sync_store` could not serve

    def load_store(self) -> list[tuple[str, str]]:
        """Serve every adapter in the store; returns (name, problem) for those that cannot be served."""
        self._store.recover()
        problems = []
        for stored in self._store.list():
            if stored.name in self._reserved or stored.name in ROUTE_NAMES:
                problems.append((stored.name, "the name is the served base model's, or an API path's"))
                continue
            started = time.perf_counter()
            try:
                record = self._read_stored(stored)
            except Exception as exc:  # one bad directory must not keep the server from starting
                problems.append((stored.name, str(exc)))
                continue
            self._engine.register_adapter(record.adapter)
            self._records[stored.name] = record
            self._on_registered("store", time.perf_counter() - started)
        return problems

    def _read_stored(self, stored: StoredAdapter) -> AdapterRecord:
        """Index a stored adapter into a record from its config and header (no tensor read, nothing registered)."""
        adapter = self._engine.index_adapter(stored.name, stored.path, self._max_bytes)
        version = adapter.source.version
        return AdapterRecord(adapter, stored.owner, stored.created, "store", stored.path, stored.chat_template, version)

    def sync_store(self) -> StoreChanges:
        """Take up what other replicas changed in a shared store: new adapters, new versions, deletions.

        Reading and validating happen outside the lock; a version is registered only if the store
        still holds it then, so an upload through this replica is never overwritten by an older
        read. A version that cannot be served is reported once and skipped until it changes;
        adapters loaded from a path are never touched.
        """
        changes = StoreChanges()
        versions = self._store.versions()  # stats only: a poll reads no file unless a version changed
        for name, version in versions.items():
            record = self._records.get(name)
            if name in self._reserved or name in ROUTE_NAMES or (record is not None and record.source != "store"):
                continue
            if (record is not None and record.version == version) or self._unservable.get(name) == version:
                continue
            stored = self._store.get(name)
            if stored is None:  # deleted since the listing
                continue
            started = time.perf_counter()
            try:
                fresh = self._read_stored(stored)
            except Exception as exc:  # another replica's bad write must not stop this one's sync
                self._unservable[name] = stored.version
                changes.problems.append((name, str(exc)))
                continue
            with self._lock:
                held = self._records.get(name)
                if self._store.version(name) != stored.version or (held is not None and held.version == stored.version):
                    continue
                self._engine.register_adapter(fresh.adapter)
                self._records[name] = fresh
            (changes.replaced if record is not None else changes.added).append(name)
            self._on_registered("store", time.perf_counter() - started)
        with self._lock:
            for name, record in list(self._records.items()):
                if record.source == "store" and name not in versions and self._store.version(name) is None:
                    self._engine.remove_adapter(name)
                    del self._records[name]
                    changes.removed.append(name)
        return changes

    def _check_free(self, name: str, param: str) -> None:
        if name in self._reserved:
            raise RequestInvalid(f"{name!r} is the base model's name; pick another adapter name", param=param)
        if name in ROUTE_NAMES:
            raise RequestInvalid(f"{name!r} is reserved (POST /v1/adapters/{name}); pick another adapter name", param=param)

    def footprint(self) -> tuple[int, int]:
        """(adapters registered, their bytes in the serving dtype): what the disk tier holds."""
        records = list(self._records.values())
        return len(records), sum(record.adapter.nbytes for record in records)

    def names(self) -> list[str]:
        return sorted(self._records)

    def visible_to(self, principal: Principal) -> list[AdapterRecord]:
        return sorted((r for r in self._records.values() if r.visible_to(principal)), key=lambda r: r.name)

    def get(self, name: str, principal: Principal) -> AdapterRecord:
        """The adapter `name` as `principal` may use it; another tenant's is reported missing."""
        record = self._records.get(name)
        if record is None or not record.visible_to(principal):
            raise AdapterNotFound(f"the model {name!r} does not exist", param="model")
        return record

    def _manageable(self, name: str, principal: Principal) -> AdapterRecord:
        record = self.get(name, principal)
        if not record.managed_by(principal):
            raise Forbidden(f"adapter {name!r} is shared; only admins may change it")
        return record

    def upload(
        self,
        name: str,
        config: bytes,
        weights: bytes,
        principal: Principal,
        chat_template: str | None = None,
        overwrite: bool = False,
        shared: bool = False,
    ) -> tuple[AdapterRecord, bool]:
        """Validate, store and serve an adapter; returns its record and whether it replaced one.

        Raises:
            RequestInvalid: a bad name, or `shared` asked for by a non-admin.
            AdapterTooLarge: the weights are over the size limit.
            AdapterMalformed / AdapterInvalid: the files cannot be read / served on this base.
            AdapterExists: the name is taken and `overwrite` was not given (or not allowed).
        """
        check_name(name)
        self._check_free(name, "name")
        if shared and not principal.is_admin:
            raise Forbidden("only admins may upload shared adapters")
        if len(weights) > self._max_bytes:
            raise AdapterTooLarge(
                f"adapter_model.safetensors is {len(weights)} bytes; the limit is {self._max_bytes} (--max-adapter-bytes)"
            )
        started = time.perf_counter()
        adapter = self._engine.validate_adapter(name, parse_config(config), parse_weights(weights))
        if chat_template is not None:
            self._check_template(chat_template)
        with self._lock:
            previous = self._records.get(name)
            if previous is not None:
                if not previous.visible_to(principal):
                    raise AdapterExists(f"the adapter name {name!r} is taken; pick another")
                if not previous.managed_by(principal):
                    raise Forbidden(f"adapter {name!r} is shared; only admins may replace it")
                if not overwrite:
                    raise AdapterExists(f"adapter {name!r} exists; pass overwrite=true to replace it")
                if previous.source != "store":
                    raise AdapterExists(f"adapter {name!r} was loaded from a path; unload it first")
            owner = None if shared else (previous.owner if previous is not None else principal.tenant)
            stored = self._store.save(name, config, weights, owner, chat_template, overwrite=previous is not None)
            adapter = adapter.on_disk(AdapterSource(str(stored.path), stored.version))  # the weights are read back on demand
            record = AdapterRecord(adapter, stored.owner, stored.created, "store", stored.path, stored.chat_template, stored.version)
            self._engine.register_adapter(adapter)
            self._records[name] = record
        self._on_registered("upload", time.perf_counter() - started)
        return record, previous is not None

    def merge(
        self,
        name: str,
        sources: list[str],
        weights: list[float],
        method: str,
        principal: Principal,
        density: float | None = None,
        rank: int | None = None,
        seed: int = 0,
        overwrite: bool = False,
    ) -> tuple[AdapterRecord, bool]:
        """Merge adapters into a new stored one owned by the caller (see merging.py).

        A tenant may merge only adapters it owns; admins may merge any. The result is validated,
        stored and served exactly like an upload.

        Raises:
            AdapterNotFound: a source is missing or another tenant's.
            Forbidden: a non-admin named a shared adapter.
            RequestInvalid / AdapterInvalid: the merge itself is impossible (see `merge_adapters`).
        """
        read = []
        for source in sources:
            record = self.get(source, principal)
            if not principal.is_admin and record.owner != principal.tenant:
                raise Forbidden(f"adapter {source!r} is shared; tenants may merge only their own adapters")
            read.append(read_adapter_dir(record.path, self._max_bytes, self._roots if record.source == "path" else None))
        config, tensors = merge_adapters(read, weights, method, self._engine.module_shapes, density, rank, seed)
        config_bytes = json.dumps(config, indent=2).encode()
        return self.upload(name, config_bytes, save_safetensors(tensors), principal, overwrite=overwrite)

    def delete(self, name: str, principal: Principal) -> AdapterRecord:
        """Stop offering `name` and remove it from the store; running requests finish on it."""
        with self._lock:
            record = self._manageable(name, principal)
            if record.source == "store":
                self._store.delete(name)
            self._engine.remove_adapter(name)
            del self._records[name]
        return record

    def load_path(self, name: str, path: str, principal: Principal) -> AdapterRecord:
        """Serve the PEFT directory at `path` (inside an allowed root) as a shared adapter, for this run.

        The directory and every file it links to must lie inside the roots, as opened (see
        adapter_files.py); the weights are bounded by `max_adapter_bytes`, as uploads are.

        Raises:
            RequestInvalid: a bad name, or `path` is empty, holds a NUL byte or is not UTF-8.
            Forbidden: not an admin, or the directory (or a file it links to) is outside the roots.
            AdapterNotFound: no such directory, or it has no adapter_config.json.
            AdapterTooLarge: the weights are over the size limit.
            AdapterMalformed / AdapterInvalid: the files cannot be read / served on this base.
            AdapterExists: an adapter of that name is loaded.
        """
        principal.require_admin()
        check_name(name)
        self._check_free(name, "lora_name")
        started = time.perf_counter()
        version = _version_or_none(path)
        files = read_adapter_files(path, self._roots, self._max_bytes, param="lora_path")
        adapter = self._engine.validate_adapter(name, parse_config(files.config), parse_weights(files.weights))
        roots = tuple(str(root) for root in self._roots)
        adapter = adapter.on_disk(AdapterSource(str(files.path), version or "", roots, self._max_bytes))
        if files.chat_template is not None:
            self._check_template(files.chat_template)
        with self._lock:
            if name in self._records:
                raise AdapterExists(f"adapter {name!r} is already loaded")
            record = AdapterRecord(adapter, None, time.time(), "path", files.path, files.chat_template)
            self._engine.register_adapter(adapter)
            self._records[name] = record
        self._on_registered("path", time.perf_counter() - started)
        return record

    def unload(self, name: str, principal: Principal) -> None:
        """Stop serving an adapter loaded from a path (store adapters are deleted instead)."""
        principal.require_admin()
        with self._lock:
            record = self.get(name, principal)
            if record.source == "store":
                raise RequestInvalid(
                    f"adapter {name!r} lives in the adapter store; DELETE /v1/adapters/{name} removes it",
                    param="lora_name",
                )
            self._engine.remove_adapter(name)
            del self._records[name]


def _version_or_none(path: str) -> str | None:
    """The directory's version before it is read (None: missing or not a valid path; the read says why)."""
    try:
        return directory_version(path)
    except (OSError, ValueError):
        return None
