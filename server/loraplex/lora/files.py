"""The files of a PEFT adapter directory, read safely: only what was opened is checked, and only that is read.

Owns: the names of an adapter directory's files, and reading them with every check made on the
opened file descriptors, never on a path that could change in between: the directory is opened
once and proven to lie inside the allowed roots by walking its real parents (`..`) up to a root;
each file is opened relative to that directory, and a symlinked file is followed one link at a time,
each hop's directory proven the same way, so a link (or a directory swapped for one mid-read) can
never lead outside. Only regular files are read, each with a hard size bound checked with `fstat`
before reading. It reads bytes and decodes text; it must not parse safetensors or validate an
adapter (adapter.py does), unpickle anything, or know about HTTP.
"""

import errno
import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loraplex.errors import AdapterInvalid, AdapterMalformed, AdapterNotFound, AdapterTooLarge, Forbidden, RequestInvalid

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
CHAT_TEMPLATE_FILE = "chat_template.jinja"
METADATA_FILE = "loraplex.json"  # the store's owner and creation time (service/store.py writes it)
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

MAX_CONFIG_BYTES = 1 << 20
MAX_CHAT_TEMPLATE_BYTES = 1 << 20
MAX_TOKENIZER_CONFIG_BYTES = 16 << 20  # some tokenizers list 100k+ added tokens here
MAX_HEADER_BYTES = 16 << 20  # a safetensors header: ~150 bytes per tensor; an 8B base's adapter needs ~70 KB

_Ids = set[tuple[int, int]]  # (st_dev, st_ino) of each root
_SizeError = Callable[[str, int, int], Exception]  # (file name, size, limit) -> the error to raise

_SHOWN_CHARS = 200  # of a path quoted back in an error
_MAX_LINK_HOPS = 40  # as the kernel's own symlink limit
_MAX_DEPTH = 4096  # parents walked before giving up on finding a root
_DIR_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC  # O_NONBLOCK: a FIFO must not block the open


class _Escape(Exception):
    """A file of the directory links outside the roots; its name is the message."""


@dataclass(frozen=True)
class AdapterFiles:
    """An adapter directory's files, exactly as read through descriptors checked to be inside the roots."""

    path: Path  # the directory's real path
    config: bytes  # adapter_config.json
    weights: bytes  # adapter_model.safetensors, or only its header (`header_only`)
    chat_template: str | None  # chat_template.jinja, else tokenizer_config.json's "chat_template" string
    weights_size: int = 0  # the weights file's size in bytes


def check_path(path: str | os.PathLike, param: str | None = None) -> str:
    """The adapter path as text, refusing one the filesystem could not take as given.

    Args:
        path: the path as the caller gave it.
        param: the request field it came from, named in the error.

    Raises:
        RequestInvalid: the path is empty, holds a NUL byte, or is not valid UTF-8 text.
    """
    field = param or "the adapter path"
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")
    if not text:
        raise RequestInvalid(f"{field} must not be empty", param=param)
    if "\x00" in text:
        raise RequestInvalid(f"{field} must not contain a NUL byte", param=param)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestInvalid(f"{field} must be valid UTF-8 text", param=param) from None
    return text


def read_adapter_files(
    path: str | os.PathLike,
    roots: tuple[Path, ...] | None,
    max_weights_bytes: int | None,
    param: str | None = None,
    with_chat_template: bool = True,
    header_only: bool = False,
) -> AdapterFiles:
    """Read a PEFT adapter directory's config, weights and chat template, refusing anything outside `roots`.

    Args:
        path: the adapter directory.
        roots: the directories it (and every file it links to) must lie inside; None trusts any place.
        max_weights_bytes: the largest `adapter_model.safetensors` read; None reads any size.
        param: the request field `path` came from, named in errors about it.
        with_chat_template: also read the chat template (else `chat_template` is None).
        header_only: read only the weights' safetensors header (its 8-byte length and JSON), not the
            tensors: what indexing a store needs.

    Raises:
        RequestInvalid: `path` is empty, holds a NUL byte or is not UTF-8.
        Forbidden: the directory, or a file it links to, is outside `roots`, or it moved while opened.
        AdapterNotFound: the directory or its config is missing.
        AdapterTooLarge: the weights are over `max_weights_bytes`.
        AdapterMalformed: the weights are missing or pickled, or a file is not a regular file or too large.
    """
    text = check_path(path, param)
    quoted = repr(text) if len(text) <= _SHOWN_CHARS else repr(text[:_SHOWN_CHARS]) + "..."
    shown = f"{param} {quoted}" if param else f"adapter directory {text}"
    try:
        real = Path(os.path.realpath(text))
        root_ids = None
        if roots is not None:
            resolved = [Path(os.path.realpath(root)) for root in roots]
            if not any(real.is_relative_to(root) for root in resolved):
                raise Forbidden(f"{shown} is outside the allowed adapter roots", param=param)
            root_ids = _ids(resolved)
        dir_fd = os.open(real, _DIR_FLAGS)
        try:
            if root_ids is not None and not _inside(dir_fd, root_ids):
                raise Forbidden(f"{shown} moved outside the allowed adapter roots while it was opened", param=param)
            if _id(os.stat(real)) != _id(os.fstat(dir_fd)):
                raise Forbidden(f"{shown} changed while it was opened; refusing to read it", param=param)
            return _read_all(dir_fd, real, root_ids, max_weights_bytes, shown, with_chat_template, header_only)
        finally:
            os.close(dir_fd)
    except _Escape as exc:
        raise Forbidden(f"{exc} in {shown} links to a file outside the allowed adapter roots", param=param) from None
    except OSError as exc:
        raise _typed(exc, shown, param) from None


def read_chat_template(path: Path) -> str | None:
    """The chat template an adapter directory ships, if any (no root check: for trusted directories).

    Args:
        path: an adapter directory.

    Returns:
        The text of `chat_template.jinja`; else `tokenizer_config.json`'s "chat_template" when it is a
        string; else None.

    Raises:
        OSError: the directory or a template file cannot be opened or read.
        AdapterMalformed: a template file is not a regular file, too large, not UTF-8, or not JSON.
    """
    dir_fd = os.open(path, _DIR_FLAGS)
    try:
        return _read_chat_template(dir_fd, None)
    finally:
        os.close(dir_fd)


def read_small_file(path: Path, limit: int) -> bytes:
    """The bytes of the regular file at `path`, refused over `limit` bytes (no root check).

    Raises:
        OSError: it cannot be opened or read.
        AdapterMalformed: it is not a regular file, or is over `limit` bytes.
    """
    fd = os.open(path, _FILE_FLAGS)
    try:
        return _read_bounded(fd, Path(path).name, limit, _malformed_size)
    finally:
        os.close(fd)


def _read_all(
    dir_fd: int,
    real: Path,
    root_ids: _Ids | None,
    max_weights_bytes: int | None,
    shown: str,
    with_chat_template: bool,
    header_only: bool,
) -> AdapterFiles:
    config = _read_member(dir_fd, CONFIG_FILE, root_ids, MAX_CONFIG_BYTES, _malformed_size)
    if config is None:
        raise AdapterNotFound(f"{shown} has no {CONFIG_FILE}")
    read = _read_header if header_only else _read_bounded
    weights, size = None, 0
    fd = _open_member(dir_fd, WEIGHTS_FILE, root_ids)
    if fd is not None:
        try:
            size = os.fstat(fd).st_size
            weights = read(fd, WEIGHTS_FILE, max_weights_bytes, _too_large)
        finally:
            os.close(fd)
    if weights is None:
        pickled = [name for name in PICKLE_FILES if _lexists(name, dir_fd)]
        if pickled:
            raise AdapterMalformed(
                f"{shown} holds {pickled[0]}, a pickle file; loraplex reads safetensors only "
                "(save with safe_serialization=True)"
            )
        raise AdapterMalformed(f"{shown} has no {WEIGHTS_FILE}")
    template = _read_chat_template(dir_fd, root_ids) if with_chat_template else None
    return AdapterFiles(path=real, config=config, weights=weights, chat_template=template, weights_size=size)


def _read_chat_template(dir_fd: int, root_ids: _Ids | None) -> str | None:
    raw = _read_member(dir_fd, CHAT_TEMPLATE_FILE, root_ids, MAX_CHAT_TEMPLATE_BYTES, _malformed_size)
    if raw is not None:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise AdapterMalformed(f"{CHAT_TEMPLATE_FILE} is not UTF-8 text: {exc}") from None
    raw = _read_member(dir_fd, TOKENIZER_CONFIG_FILE, root_ids, MAX_TOKENIZER_CONFIG_BYTES, _malformed_size)
    if raw is None:
        return None
    try:
        tokenizer_config = json.loads(raw)
    except ValueError as exc:
        raise AdapterMalformed(f"{TOKENIZER_CONFIG_FILE} is not valid JSON: {exc}") from None
    template = tokenizer_config.get("chat_template") if isinstance(tokenizer_config, dict) else None
    return template if isinstance(template, str) else None


def _read_member(dir_fd: int, name: str, root_ids: _Ids | None, limit: int | None, too_large: _SizeError) -> bytes | None:
    """The bytes of `name` in the directory `dir_fd`; None when there is no such file."""
    fd = _open_member(dir_fd, name, root_ids)
    if fd is None:
        return None
    try:
        return _read_bounded(fd, name, limit, too_large)
    finally:
        os.close(fd)


def _open_member(dir_fd: int, name: str, root_ids: _Ids | None) -> int | None:
    """Open `name` in `dir_fd`; with roots, each symlink hop must land in a directory inside them (else `_Escape`)."""
    if root_ids is None:
        try:
            return os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            return None
    held = None  # a hop's directory, opened here and closed here
    try:
        entry, at = name, dir_fd
        for _ in range(_MAX_LINK_HOPS):
            try:
                return os.open(entry, _FILE_FLAGS | os.O_NOFOLLOW, dir_fd=at)
            except FileNotFoundError:
                return None
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
            try:
                target = os.readlink(entry, dir_fd=at)
            except OSError as exc:
                if exc.errno == errno.EINVAL:  # replaced by a non-link since the open: try it again
                    continue
                raise
            parent, entry = os.path.split(target)
            hop = os.open(parent or ".", _DIR_FLAGS, dir_fd=at)
            if held is not None:
                os.close(held)
            held = at = hop
            if not _inside(hop, root_ids):
                raise _Escape(name)
        raise AdapterInvalid(f"{name} is a chain of more than {_MAX_LINK_HOPS} symlinks")
    finally:
        if held is not None:
            os.close(held)


def _regular_within(fd: int, name: str, limit: int | None, too_large: _SizeError) -> os.stat_result:
    """`fd`'s stat, refusing anything but a regular file of at most `limit` bytes."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise AdapterMalformed(f"{name} is not a regular file")
    if limit is not None and info.st_size > limit:
        raise too_large(name, info.st_size, limit)
    return info


def _read_bounded(fd: int, name: str, limit: int | None, too_large: _SizeError) -> bytes:
    """Read the regular file `fd`, never more than `limit` + 1 bytes even if it grows meanwhile."""
    info = _regular_within(fd, name, limit, too_large)
    with open(fd, "rb", closefd=False) as file:
        data = file.read(info.st_size + 1)
        if len(data) > info.st_size:  # it grew since fstat
            data += file.read() if limit is None else file.read(limit + 1 - len(data))
    if limit is not None and len(data) > limit:
        raise too_large(name, len(data), limit)
    return data


def _read_header(fd: int, name: str, limit: int | None, too_large: _SizeError) -> bytes:
    """The safetensors header of the regular file `fd` (its 8-byte length, then that much JSON), bounded."""
    info = _regular_within(fd, name, limit, too_large)
    with open(fd, "rb", closefd=False) as file:
        prefix = file.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if length < 0 or length > min(MAX_HEADER_BYTES, info.st_size - 8):
            raise AdapterMalformed(f"{name} is not a valid safetensors file: its header length is out of bounds")
        header = file.read(length)
    if len(header) != length:
        raise AdapterMalformed(f"{name} is not a valid safetensors file: it ends inside its header")
    return prefix + header


def directory_version(path: Path) -> str:
    """What tells one version of an adapter directory from the next, from stats alone (no file is read).

    The store saves by renaming a fresh directory into place (a new inode); an operator editing
    files in place changes their modification times or sizes. Both enter the version.

    Raises:
        OSError: the directory cannot be stat'ed (it is gone).
    """
    parts = [str(os.stat(path).st_ino)]
    for file in (CONFIG_FILE, WEIGHTS_FILE, CHAT_TEMPLATE_FILE, METADATA_FILE):
        try:
            info = os.stat(os.path.join(path, file))
        except FileNotFoundError:
            continue
        parts.append(f"{file}:{info.st_mtime_ns}:{info.st_size}")
    return "|".join(parts)


def _too_large(name: str, size: int, limit: int) -> Exception:
    return AdapterTooLarge(f"{name} is {size} bytes; the limit is {limit} (--max-adapter-bytes)")


def _malformed_size(name: str, size: int, limit: int) -> Exception:
    return AdapterMalformed(f"{name} is {size} bytes; at most {limit} are read")


def _inside(dir_fd: int, root_ids: _Ids) -> bool:
    """Whether the opened directory is a root or below one, by walking its real parents (never a symlink)."""
    current = os.dup(dir_fd)
    try:
        for _ in range(_MAX_DEPTH):
            here = _id(os.fstat(current))
            if here in root_ids:
                return True
            parent = os.open("..", _DIR_FLAGS, dir_fd=current)
            os.close(current)
            current = parent
            if _id(os.fstat(current)) == here:  # the filesystem's root is its own parent
                return False
        return False
    finally:
        os.close(current)


def _ids(roots: list[Path]) -> _Ids:
    ids = set()
    for root in roots:
        try:
            ids.add(_id(os.stat(root)))
        except OSError:
            continue  # a root that does not exist holds nothing
    return ids


def _id(info: os.stat_result) -> tuple[int, int]:
    return info.st_dev, info.st_ino


def _lexists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return False
    return True


def _typed(exc: OSError, shown: str, param: str | None) -> Exception:
    """A typed error for an OSError met while opening or reading an adapter directory."""
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return AdapterNotFound(f"{shown} does not exist", param=param)
    if exc.errno == errno.ENAMETOOLONG:
        return RequestInvalid(f"{shown} is too long a path", param=param)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return Forbidden(f"{shown} cannot be read by the server: {exc.strerror}", param=param)
    return AdapterInvalid(f"{shown} cannot be read: {exc.strerror}", param=param)
