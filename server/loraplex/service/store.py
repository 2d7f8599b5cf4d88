"""The on-disk adapter store: one directory per adapter, written atomically, owned by tenants.

Owns: the layout of the store root, adapter names, who owns each stored adapter, and crash safety.
It stores bytes; it must not parse or validate adapter files (adapter.py does), load anything onto a
device, or know about HTTP.

Layout of the root:

    <name>/                 an adapter: exactly what PEFT's `save_pretrained` writes
        adapter_config.json, adapter_model.safetensors, [chat_template.jinja],
        [loraplex.json]     {"owner": tenant or null, "created": unix time}; absent in directories
                            an operator placed by hand, which are shared (owner None)
    .staging/<id>/          a save being written; becomes <name>/ by one rename
    .replaced/<id>/<name>   the old version while an overwrite swaps in the new one
    .deleted/<id>/<name>    versions already removed from the store, waiting to be erased

Every change to `<root>/<name>` is a directory rename, and every rename is followed by an fsync of
the root, so after a crash `<root>/<name>` holds a complete old version, a complete new version, or
nothing; `recover()` tidies the hidden areas. Hidden entries (starting with ".") are never adapters.
"""

import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from loraplex.errors import (
    AdapterExists,
    AdapterMalformed,
    AdapterNotFound,
    RequestInvalid,
)
from loraplex.lora.adapter import CONFIG_FILE, WEIGHTS_FILE
from loraplex.lora.files import CHAT_TEMPLATE_FILE, METADATA_FILE, directory_version, read_chat_template, read_small_file

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_METADATA_BYTES = 64 << 10

_STAGING = ".staging"
_REPLACED = ".replaced"
_DELETED = ".deleted"


def check_name(name: str) -> None:
    """Refuse an adapter name that could not be a plain directory name in the store.

    Args:
        name: the adapter name to check.

    Raises:
        RequestInvalid: `name` does not match NAME_PATTERN; the message states the rule.
    """
    if not NAME_PATTERN.fullmatch(name):
        raise RequestInvalid(
            f"adapter name {name!r} is invalid: use 1 to 64 characters from A-Z, a-z, 0-9, '.', '_' and '-', "
            "starting with a letter or digit"
        )


@dataclass(frozen=True)
class StoredAdapter:
    """An adapter as the store holds it: where its files are and who owns it.

    `owner` None means shared: placed by the operator, usable by every tenant, managed by admins only.
    """

    name: str
    path: Path
    owner: str | None
    created: float
    chat_template: str | None
    version: str = ""  # changes whenever the directory's contents may have: see `directory_version`


class AdapterStore:
    """Adapters kept on disk across restarts, one directory each under `root`.

    Saves write their files outside the lock and take it only to rename them into place, so a large
    upload does not hold up reads; reads take it so they never see a name mid-swap.

    Args:
        root: the store directory; created (with its parents) when missing.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def recover(self) -> None:
        """Finish or roll back what a crash interrupted; call once at start-up, before any save.

        The rule, area by area:
          - `.staging/<id>`: a save that never reached its rename. Removed; the adapter was never visible.
          - `.replaced/<id>/<name>`: the old version during an overwrite. If `<root>/<name>` is missing,
            the new version never landed and the old one is moved back; otherwise the overwrite
            completed and the old copy is removed.
          - `.deleted/<id>`: removals committed by their rename. Removed; a deleted adapter never returns.
        Restores are made durable before anything is erased, so a crash inside recover() leaves a
        state the next recover() handles by the same rule.
        """
        with self._lock:
            restored = False
            for holder in _entries(self.root / _REPLACED):
                for old_version in _entries(holder):
                    target = self.root / old_version.name
                    if not os.path.lexists(target):
                        os.rename(old_version, target)
                        log.warning("restored adapter %r: an overwrite of it was interrupted", old_version.name)
                        restored = True
            if restored:
                _fsync_dir(self.root)
            for area in (_STAGING, _REPLACED, _DELETED):
                for leftover in _entries(self.root / area):
                    shutil.rmtree(leftover)

    def list(self) -> list[StoredAdapter]:
        """Every complete adapter in the store, sorted by name.

        A non-hidden subdirectory holding `adapter_config.json` is an adapter. One with an invalid
        name or an unreadable `loraplex.json` is skipped with a warning; other entries are ignored.
        """
        with self._lock:
            adapters = [self._read(entry.name) for entry in self._adapter_dirs()]
            return [adapter for adapter in adapters if adapter is not None]

    def versions(self) -> dict[str, str]:
        """Each complete adapter's version (`StoredAdapter.version`) by name, from directory stats alone.

        What a replica polls: no file is read, so a poll costs a few stats per adapter.
        """
        with self._lock:
            return {entry.name: directory_version(entry) for entry in self._adapter_dirs()}

    def version(self, name: str) -> str | None:
        """The version of the adapter `name`, or None when the store has none."""
        if not NAME_PATTERN.fullmatch(name):
            return None
        with self._lock:
            path = self.root / name
            return directory_version(path) if (path / CONFIG_FILE).is_file() else None

    def _adapter_dirs(self) -> tuple[Path, ...]:
        """The adapter directories (hidden entries, and names that are not adapter names, left out with a warning)."""
        found = []
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(".") or not (entry / CONFIG_FILE).is_file():
                continue
            if not NAME_PATTERN.fullmatch(entry.name):
                log.warning("skipping %s: %r is not a valid adapter name", entry, entry.name)
                continue
            found.append(entry)
        return tuple(found)

    def get(self, name: str) -> StoredAdapter | None:
        """The stored adapter `name`, or None when there is none (or `name` is not a valid name).

        Args:
            name: the adapter name.
        """
        if not NAME_PATTERN.fullmatch(name):
            return None
        with self._lock:
            return self._read(name)

    def save(
        self,
        name: str,
        config: bytes,
        weights: bytes,
        owner: str | None,
        chat_template: str | None = None,
        overwrite: bool = False,
    ) -> StoredAdapter:
        """Store an adapter's files under `name`, atomically: readers see the old version or the new one.

        Args:
            name: the adapter name (checked with `check_name`).
            config: the bytes of `adapter_config.json`.
            weights: the bytes of `adapter_model.safetensors`.
            owner: the tenant it belongs to; None stores it as shared.
            chat_template: written as `chat_template.jinja` when given.
            overwrite: replace an existing adapter of that name.

        Raises:
            RequestInvalid: `name` is not a valid adapter name.
            AdapterExists: `name` is taken and `overwrite` is False; nothing is changed.
            OSError: writing or renaming failed; the store is left as it was (an old version is put back).
        """
        check_name(name)
        target = self.root / name
        if not overwrite and os.path.lexists(target):
            raise _exists(name)
        created = time.time()
        files = {
            CONFIG_FILE: config,
            WEIGHTS_FILE: weights,
            METADATA_FILE: json.dumps({"owner": owner, "created": created}).encode(),
        }
        if chat_template is not None:
            files[CHAT_TEMPLATE_FILE] = chat_template.encode("utf-8")
        staging = self.root / _STAGING / uuid.uuid4().hex
        staging.mkdir(parents=True)
        try:
            for filename, content in files.items():
                _write_durably(staging / filename, content)
            _fsync_dir(staging)
            replaced = self._rename_into_place(staging, target, overwrite)
        except Exception:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if replaced is not None:
            self._discard_replaced(replaced)
        return StoredAdapter(
            name=name, path=target, owner=owner, created=created, chat_template=chat_template, version=directory_version(target)
        )

    def delete(self, name: str) -> None:
        """Remove the adapter `name` from the store.

        Args:
            name: the adapter name.

        Raises:
            RequestInvalid: `name` is not a valid adapter name.
            AdapterNotFound: there is no adapter of that name.
        """
        check_name(name)
        with self._lock:
            target = self.root / name
            if not (target / CONFIG_FILE).is_file():
                raise AdapterNotFound(f"no adapter named {name!r} in the store")
            holder = self._move_aside(target, _DELETED)
            _fsync_dir(self.root)
        _erase(holder)

    def _rename_into_place(self, staging: Path, target: Path, overwrite: bool) -> Path | None:
        """Swap a fully written staging directory in as `target`; returns the old version's holder, if any.

        On a failed rename the old version is put back before the error propagates.
        """
        with self._lock:
            holder = None
            if os.path.lexists(target):
                if not overwrite:
                    raise _exists(target.name)
                holder = self._move_aside(target, _REPLACED)
            try:
                os.rename(staging, target)
            except OSError:
                if holder is not None:
                    os.rename(holder / target.name, target)
                    holder.rmdir()
                raise
            _fsync_dir(self.root)
            return holder

    def _discard_replaced(self, holder: Path) -> None:
        """Erase the old version of a committed overwrite, first moving it where recover() never restores from."""
        deleted = self.root / _DELETED / holder.name
        try:
            deleted.parent.mkdir(exist_ok=True)
            os.rename(holder, deleted)
        except OSError as exc:
            log.warning("could not move %s aside (%s); recover() at next start-up removes it", holder, exc)
            return
        _erase(deleted)

    def _move_aside(self, target: Path, area: str) -> Path:
        """Rename `target` to `<root>/<area>/<new id>/<its name>`; returns the `<new id>` directory."""
        holder = self.root / area / uuid.uuid4().hex
        holder.mkdir(parents=True)
        os.rename(target, holder / target.name)
        return holder

    def _read(self, name: str) -> StoredAdapter | None:
        """The adapter in `<root>/<name>`; None (with a warning if it is unreadable) when there is none."""
        path = self.root / name
        config_path = path / CONFIG_FILE
        if not config_path.is_file():
            return None
        try:
            owner, created = _read_metadata(path)
            chat_template = read_chat_template(path)
        except (OSError, AdapterMalformed) as exc:
            log.warning("skipping adapter directory %s: %s", path, exc)
            return None
        version = directory_version(path)
        return StoredAdapter(name=name, path=path, owner=owner, created=created, chat_template=chat_template, version=version)


def _read_metadata(path: Path) -> tuple[str | None, float]:
    """(owner, created) from `loraplex.json`; (None, the config's mtime) for an operator-placed directory."""
    metadata_path = path / METADATA_FILE
    if not metadata_path.exists():
        return None, (path / CONFIG_FILE).stat().st_mtime
    try:
        metadata = json.loads(read_small_file(metadata_path, MAX_METADATA_BYTES))
    except ValueError as exc:
        raise AdapterMalformed(f"{METADATA_FILE} is not valid JSON: {exc}") from None
    owner = metadata.get("owner") if isinstance(metadata, dict) else None
    created = metadata.get("created") if isinstance(metadata, dict) else None
    if not isinstance(owner, str | None) or isinstance(created, bool) or not isinstance(created, int | float):
        raise AdapterMalformed(f'{METADATA_FILE} must hold {{"owner": string or null, "created": number}}')
    return owner, float(created)


def _exists(name: str) -> AdapterExists:
    return AdapterExists(f"adapter {name!r} already exists; pass overwrite=true to replace it")


def _entries(directory: Path) -> list[Path]:
    return sorted(directory.iterdir()) if directory.is_dir() else []


def _write_durably(path: Path, content: bytes) -> None:
    with open(path, "wb") as file:
        file.write(content)
        file.flush()
        os.fsync(file.fileno())


def _fsync_dir(path: Path) -> None:
    """Make the entries of directory `path` (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _erase(holder: Path) -> None:
    """Remove a moved-aside version; what a failure leaves, recover() removes at next start-up."""
    try:
        shutil.rmtree(holder)
    except OSError as exc:
        log.warning("could not remove %s (%s); recover() at next start-up removes it", holder, exc)
