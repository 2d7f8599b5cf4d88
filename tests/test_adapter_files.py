"""Reading adapter directories safely: what is served lies inside the roots, is bounded, and is what was checked.

Real PEFT adapters (tests/tiny.py) are laid out in tmp_path: one inside an allowed root, one in a
directory outside it whose bytes must never be served. Every case is refused with a typed error or
served with the inside adapter's exact bytes. The live test drives `POST /v1/load_lora_adapter`.
"""

import ctypes
import functools
import json
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from live_server import LiveServer, server_config
from loraplex.errors import (
    AdapterMalformed,
    AdapterNotFound,
    AdapterTooLarge,
    Forbidden,
    LoraplexError,
    RequestInvalid,
)
from loraplex.lora.files import (
    CHAT_TEMPLATE_FILE,
    CONFIG_FILE,
    MAX_CONFIG_BYTES,
    WEIGHTS_FILE,
    read_adapter_files,
)
from tiny import make_adapter, make_model

RACE_TRIES = 300


@dataclass(frozen=True)
class Layout:
    root: Path  # the one allowed root
    inside: Path  # root/ad: a valid adapter
    outside: Path  # a valid adapter outside the root, with other bytes
    config: bytes  # the inside adapter's files
    weights: bytes

    def read(self, path: Path | str, limit: int = 1 << 30):
        return read_adapter_files(path, (self.root,), limit, param="lora_path")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("base") / "tiny")


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory) -> tuple[Path, Path]:
    made = tmp_path_factory.mktemp("adapters")
    return make_adapter(model_dir, made / "ours", rank=4, seed=1), make_adapter(model_dir, made / "theirs", rank=4, seed=2)


@pytest.fixture
def layout(adapters, tmp_path) -> Layout:
    ours, theirs = adapters
    root = tmp_path / "root"
    root.mkdir()
    inside = shutil.copytree(ours, root / "ad")
    outside = shutil.copytree(theirs, tmp_path / "outside" / "theirs")
    assert (outside / WEIGHTS_FILE).read_bytes() != (inside / WEIGHTS_FILE).read_bytes()
    return Layout(root, inside, outside, (inside / CONFIG_FILE).read_bytes(), (inside / WEIGHTS_FILE).read_bytes())


def relink(path: Path, target: Path | str) -> Path:
    """Replace `path` with a symlink to `target`."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    path.symlink_to(target)
    return path


# ----- each arrangement: a function of the layout that returns the lora_path to read ----------


def plain_directory(t: Layout) -> Path:
    return t.inside


def weights_linked_outside(t: Layout) -> Path:
    relink(t.inside / WEIGHTS_FILE, t.outside / WEIGHTS_FILE)
    return t.inside


def config_linked_outside(t: Layout) -> Path:
    relink(t.inside / CONFIG_FILE, t.outside / CONFIG_FILE)
    return t.inside


def chat_template_linked_outside(t: Layout) -> Path:
    secret = t.outside / "secret.jinja"
    secret.write_text("another tenant's template")
    relink(t.inside / CHAT_TEMPLATE_FILE, secret)
    return t.inside


def weights_linked_to_a_blob_inside(t: Layout) -> Path:
    """The Hugging Face cache layout: snapshots/<rev>/<file> -> ../../blobs/<hash>."""
    blobs = t.root / "blobs"
    blobs.mkdir()
    (t.inside / WEIGHTS_FILE).rename(blobs / "0123abcd")
    snapshot = t.root / "snapshots" / "main"
    snapshot.parent.mkdir()
    t.inside.rename(snapshot)
    relink(snapshot / WEIGHTS_FILE, "../../blobs/0123abcd")
    return snapshot


def a_chain_of_links_that_ends_outside(t: Layout) -> Path:
    (t.root / "hop2").symlink_to(t.outside / WEIGHTS_FILE)
    (t.root / "hop1").symlink_to("hop2")
    relink(t.inside / WEIGHTS_FILE, "../hop1")
    return t.inside


def weights_linked_through_a_directory_link_leading_outside(t: Layout) -> Path:
    (t.root / "shortcut").symlink_to(t.outside, target_is_directory=True)
    relink(t.inside / WEIGHTS_FILE, f"../shortcut/{WEIGHTS_FILE}")
    return t.inside


def directory_linked_outside(t: Layout) -> Path:
    link = t.root / "link-out"
    link.symlink_to(t.outside, target_is_directory=True)
    return link


def directory_linked_inside(t: Layout) -> Path:
    link = t.root / "link-in"
    link.symlink_to(t.inside, target_is_directory=True)
    return link


def dotdot_traversal(t: Layout) -> str:
    return f"{t.inside}/../../outside/theirs"


def outside_directory(t: Layout) -> Path:
    return t.outside


def missing_directory(t: Layout) -> Path:
    return t.root / "nowhere"


def a_file_not_a_directory(t: Layout) -> Path:
    return t.inside / CONFIG_FILE


def missing_config(t: Layout) -> Path:
    (t.inside / CONFIG_FILE).unlink()
    return t.inside


def pickled_weights_only(t: Layout) -> Path:
    (t.inside / WEIGHTS_FILE).rename(t.inside / "adapter_model.bin")
    return t.inside


def weights_are_a_directory(t: Layout) -> Path:
    (t.inside / WEIGHTS_FILE).unlink()
    (t.inside / WEIGHTS_FILE).mkdir()
    return t.inside


def oversized_config(t: Layout) -> Path:
    os.truncate(t.inside / CONFIG_FILE, MAX_CONFIG_BYTES + 1)
    return t.inside


@pytest.mark.parametrize(
    "arrange, refused_with",
    [
        (plain_directory, None),
        (weights_linked_to_a_blob_inside, None),
        (directory_linked_inside, None),
        (weights_linked_outside, Forbidden),
        (config_linked_outside, Forbidden),
        (chat_template_linked_outside, Forbidden),
        (a_chain_of_links_that_ends_outside, Forbidden),
        (weights_linked_through_a_directory_link_leading_outside, Forbidden),
        (directory_linked_outside, Forbidden),
        (dotdot_traversal, Forbidden),
        (outside_directory, Forbidden),
        (missing_directory, AdapterNotFound),
        (a_file_not_a_directory, AdapterNotFound),
        (missing_config, AdapterNotFound),
        (pickled_weights_only, AdapterMalformed),
        (weights_are_a_directory, AdapterMalformed),
        (oversized_config, AdapterMalformed),
    ],
    ids=lambda case: getattr(case, "__name__", str(case)),
)
def test_a_directory_is_served_only_from_inside_the_roots(layout, arrange, refused_with):
    path = arrange(layout)
    if refused_with is None:
        files = layout.read(path)
        assert (files.config, files.weights) == (layout.config, layout.weights)
        assert files.path == Path(os.path.realpath(path))
    else:
        with pytest.raises(refused_with):
            layout.read(path)


@pytest.mark.parametrize("member", [CONFIG_FILE, WEIGHTS_FILE, CHAT_TEMPLATE_FILE])
def test_a_fifo_in_place_of_a_file_is_refused_without_blocking(layout, member):
    (layout.inside / member).unlink(missing_ok=True)
    os.mkfifo(layout.inside / member)
    outcome = []
    reader = threading.Thread(target=lambda: outcome.append(_raised(layout.read, layout.inside)), daemon=True)
    reader.start()
    reader.join(timeout=10)
    if reader.is_alive():  # open a writer so the blocked reader can finish, then fail
        os.close(os.open(layout.inside / member, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"reading a FIFO named {member} blocked")
    assert isinstance(outcome[0], AdapterMalformed) and "not a regular file" in str(outcome[0])


def test_weights_over_the_limit_are_refused_from_their_size_without_reading_them(layout):
    limit = len(layout.weights)
    os.truncate(layout.inside / WEIGHTS_FILE, 20 << 30)  # sparse: nothing is written
    with pytest.raises(AdapterTooLarge, match=f"is {20 << 30} bytes; the limit is {limit}"):
        layout.read(layout.inside, limit=limit)


def test_weights_at_the_limit_are_read(layout):
    assert layout.read(layout.inside, limit=len(layout.weights)).weights == layout.weights


@pytest.mark.parametrize(
    "lora_path, problem",
    [("", "must not be empty"), ("/tmp/ad\x00/etc/passwd", "NUL byte"), ("/tmp/\udc80ad", "valid UTF-8")],
    ids=["empty", "nul-byte", "lone-surrogate"],
)
def test_a_path_the_filesystem_cannot_take_is_a_request_error_naming_lora_path(layout, lora_path, problem):
    with pytest.raises(RequestInvalid, match=problem) as refused:
        layout.read(lora_path)
    assert refused.value.param == "lora_path"


def test_the_chat_template_comes_from_the_directory_read(layout):
    (layout.inside / CHAT_TEMPLATE_FILE).write_text("{{ ours }}")
    assert layout.read(layout.inside).chat_template == "{{ ours }}"


def test_without_roots_links_are_followed_but_sizes_stay_bounded(layout):
    relink(layout.inside / WEIGHTS_FILE, layout.outside / WEIGHTS_FILE)
    files = read_adapter_files(layout.inside, None, 1 << 30)
    assert files.weights == (layout.outside / WEIGHTS_FILE).read_bytes()
    with pytest.raises(AdapterTooLarge):
        read_adapter_files(layout.inside, None, 16)


# ----- races: something is swapped for a symlink to the outside while it is read --------------

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def exchange(a: Path, b: Path) -> None:
    """Swap two names in one step (Linux renameat2), so the swapped name never goes missing."""
    if _libc().renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error), str(a))


def swap_directory(t: Layout) -> tuple[Path, Path, Path]:
    """(what is read, what is swapped, what the swap links to)."""
    return t.inside, t.inside, t.outside


def swap_parent_directory(t: Layout) -> tuple[Path, Path, Path]:
    parent = t.root / "tenant"
    parent.mkdir()
    t.inside.rename(parent / "ad")
    shutil.copytree(t.outside, t.outside.parent / "ad")
    return parent / "ad", parent, t.outside.parent


def swap_weights_file(t: Layout) -> tuple[Path, Path, Path]:
    return t.inside, t.inside / WEIGHTS_FILE, t.outside / WEIGHTS_FILE


@pytest.mark.parametrize("swap", [swap_directory, swap_parent_directory, swap_weights_file], ids=lambda f: f.__name__)
def test_swapping_in_a_symlink_to_the_outside_mid_read_never_serves_outside_bytes(layout, swap):
    path, swapped, target = swap(layout)
    link = swapped.with_name(swapped.name + ".swap")
    link.symlink_to(target)
    try:
        exchange(swapped, link)
        exchange(swapped, link)
    except (OSError, AttributeError) as exc:
        pytest.skip(f"this filesystem cannot exchange two names atomically: {exc}")
    stop = threading.Event()

    def swapper():
        while not stop.is_set():
            exchange(swapped, link)

    thread = threading.Thread(target=swapper, daemon=True)
    thread.start()
    try:
        outcomes = [_raised(layout.read, path) for _ in range(RACE_TRIES)]
    finally:
        stop.set()
        thread.join(timeout=10)
    for outcome in outcomes:
        if not isinstance(outcome, LoraplexError):
            assert (outcome.config, outcome.weights) == (layout.config, layout.weights)
    assert any(isinstance(outcome, LoraplexError) for outcome in outcomes), "the swap never raced a read"


def _raised(read, path):
    try:
        return read(path)
    except LoraplexError as exc:
        return exc


# ----- over HTTP ----------------------------------------------------------------------------


def test_load_lora_adapter_refuses_escapes_bad_paths_and_oversize_over_http(model_dir, adapters, tmp_path):
    ours, theirs = adapters
    root = tmp_path / "root"
    valid = shutil.copytree(ours, root / "valid")
    escape = shutil.copytree(ours, root / "escape")
    relink(escape / WEIGHTS_FILE, theirs / WEIGHTS_FILE)
    big = shutil.copytree(ours, root / "big")
    limit = len((ours / WEIGHTS_FILE).read_bytes())
    os.truncate(big / WEIGHTS_FILE, 20 << 30)
    config = server_config(model_dir, tmp_path / "store").model_copy(update={"lora_roots": (root,), "max_adapter_bytes": limit})
    with LiveServer(config) as server, httpx.Client(base_url=server.url, timeout=60) as http:

        def load(name: str, path: str) -> httpx.Response:
            body = json.dumps({"lora_name": name, "lora_path": path})  # ASCII: a lone surrogate goes as \udc80
            return http.post("/v1/load_lora_adapter", content=body, headers={"content-type": "application/json"})

        escaped = load("escape", str(escape))
        assert escaped.status_code == 403, escaped.text
        assert "adapter_model.safetensors" in escaped.json()["error"]["message"]
        assert "outside the allowed adapter roots" in escaped.json()["error"]["message"]
        for bad_path in (f"{valid}\x00/etc/passwd", f"{valid}\udc80", ""):
            refused = load("bad-path", bad_path)
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "lora_path", refused.text
        oversize = load("big", str(big))
        assert oversize.status_code == 413 and oversize.json()["error"]["code"] == "adapter_too_large", oversize.text
        assert load("valid", str(valid)).status_code == 200
        completion = http.post("/v1/completions", json={"model": "valid", "prompt": [17, 42, 99], "max_tokens": 4, "ignore_eos": True})
        assert completion.status_code == 200 and completion.json()["usage"]["completion_tokens"] == 4, completion.text
        served = [entry["id"] for entry in http.get("/v1/models").json()["data"]]
        assert "valid" in served and not {"escape", "bad-path", "big"} & set(served)
        assert http.get("/health").json() == {"status": "ok"}
