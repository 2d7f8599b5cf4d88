"""The adapter store: metadata, ownership, names, and no half-written adapter after a crash."""

import errno
import json
import logging
import os
import shutil
import time

import pytest

from loraplex.errors import AdapterExists, AdapterNotFound, RequestInvalid
from loraplex.service.store import AdapterStore, check_name

CONFIG = b'{"r": 4, "lora_alpha": 8}'
WEIGHTS = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      fake-tensors"
NEW_CONFIG = b'{"r": 8, "lora_alpha": 16}'
NEW_WEIGHTS = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      new-tensors"
HIDDEN_AREAS = (".staging", ".replaced", ".deleted")


class SimulatedCrash(BaseException):
    """Raised mid-operation to stand for a power cut: no `except Exception` clean-up runs."""


@pytest.fixture
def root(tmp_path):
    return tmp_path / "adapters"


@pytest.fixture
def store(root):
    return AdapterStore(root)


def files_of(adapter_dir):
    return (adapter_dir / "adapter_config.json").read_bytes(), (adapter_dir / "adapter_model.safetensors").read_bytes()


def place_peft_dir(root, name, **extra_files):
    """Put a PEFT directory in the store by hand, as an operator would (no loraplex.json)."""
    path = root / name
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_bytes(CONFIG)
    (path / "adapter_model.safetensors").write_bytes(WEIGHTS)
    for filename, text in extra_files.items():
        (path / filename).write_text(text)
    return path


def leftovers(root):
    return [entry for area in HIDDEN_AREAS if (root / area).is_dir() for entry in (root / area).iterdir()]


def crash_on_rename(monkeypatch, from_area):
    """Make the rename of a directory out of `from_area` crash; other renames go through."""
    real_rename = os.rename

    def rename(src, dst):
        if f"/{from_area}/" in os.fspath(src):
            raise SimulatedCrash
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)


def test_save_then_get_returns_metadata_and_the_exact_bytes(store):
    before = time.time()
    saved = store.save("tenant-a.v1", CONFIG, WEIGHTS, owner="acme", chat_template="{{ messages }}")
    stored = store.get("tenant-a.v1")
    assert stored == saved
    assert (stored.name, stored.owner, stored.chat_template) == ("tenant-a.v1", "acme", "{{ messages }}")
    assert before <= stored.created <= time.time()
    assert stored.path == store.root / "tenant-a.v1"
    assert files_of(stored.path) == (CONFIG, WEIGHTS)


def test_list_is_sorted_by_name(store):
    for name in ("b", "a", "c"):
        store.save(name, CONFIG, WEIGHTS, owner=None)
    assert [adapter.name for adapter in store.list()] == ["a", "b", "c"]


def test_a_restarted_store_lists_the_same_adapters(store, root):
    store.save("one", CONFIG, WEIGHTS, owner="acme")
    store.save("two", CONFIG, WEIGHTS, owner=None, chat_template="t")
    restarted = AdapterStore(root)
    restarted.recover()
    assert restarted.list() == store.list()


def test_get_of_a_missing_adapter_is_none(store):
    assert store.get("nothing-here") is None


def test_operator_placed_directory_is_shared_and_dated_by_its_config(store, root):
    path = place_peft_dir(root, "demo")
    os.utime(path / "adapter_config.json", (1_700_000_000, 1_700_000_000))
    demo = store.get("demo")
    assert (demo.owner, demo.created, demo.chat_template) == (None, 1_700_000_000, None)


def test_chat_template_is_read_from_chat_template_jinja(store, root):
    place_peft_dir(root, "demo", **{"chat_template.jinja": "{{ jinja }}", "tokenizer_config.json": "{}"})
    assert store.get("demo").chat_template == "{{ jinja }}"


@pytest.mark.parametrize(
    ("tokenizer_config", "template"),
    [
        ({"chat_template": "{{ from_tokenizer }}"}, "{{ from_tokenizer }}"),
        ({"chat_template": [{"name": "default", "template": "x"}]}, None),
        ({"bos_token": "<s>"}, None),
    ],
)
def test_chat_template_falls_back_to_a_string_in_tokenizer_config(store, root, tokenizer_config, template):
    place_peft_dir(root, "demo", **{"tokenizer_config.json": json.dumps(tokenizer_config)})
    assert store.get("demo").chat_template == template


def test_save_of_an_existing_name_without_overwrite_changes_nothing(store):
    store.save("a", CONFIG, WEIGHTS, owner="acme")
    with pytest.raises(AdapterExists, match="'a'.*overwrite"):
        store.save("a", NEW_CONFIG, NEW_WEIGHTS, owner="other")
    assert store.get("a").owner == "acme"
    assert files_of(store.get("a").path) == (CONFIG, WEIGHTS)
    assert leftovers(store.root) == []


def test_save_with_overwrite_replaces_the_files(store):
    store.save("a", CONFIG, WEIGHTS, owner="acme", chat_template="old")
    store.save("a", NEW_CONFIG, NEW_WEIGHTS, owner="acme", overwrite=True)
    replaced = store.get("a")
    assert files_of(replaced.path) == (NEW_CONFIG, NEW_WEIGHTS)
    assert replaced.chat_template is None
    assert leftovers(store.root) == []


def test_delete_removes_the_adapter(store):
    store.save("a", CONFIG, WEIGHTS, owner="acme")
    store.delete("a")
    assert store.get("a") is None
    assert not (store.root / "a").exists()
    assert leftovers(store.root) == []


def test_delete_of_a_missing_adapter_raises_not_found(store):
    with pytest.raises(AdapterNotFound, match="'ghost'"):
        store.delete("ghost")


BAD_NAMES = ["", ".hidden", "..", "a/b", "../a", "a" * 65, "has space", "naïve", "trailing\n", "-dash", "_under"]
GOOD_NAMES = ["a", "7", "Tenant_1.v2-x", "a" * 64]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused(name):
    with pytest.raises(RequestInvalid, match="adapter name"):
        check_name(name)


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_names_are_accepted(store, name):
    check_name(name)
    store.save(name, CONFIG, WEIGHTS, owner=None)
    assert store.get(name).name == name


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_never_reach_the_disk(store, name):
    with pytest.raises(RequestInvalid):
        store.save(name, CONFIG, WEIGHTS, owner=None)
    with pytest.raises(RequestInvalid):
        store.delete(name)
    assert store.get(name) is None
    assert list(store.root.iterdir()) == []


def test_list_ignores_hidden_entries_junk_files_and_directories_without_a_config(store, root):
    store.save("real", CONFIG, WEIGHTS, owner=None)
    place_peft_dir(root, ".hidden")
    (root / "notes.txt").write_text("junk")
    (root / "half-copied").mkdir()
    (root / "half-copied" / "adapter_model.safetensors").write_bytes(WEIGHTS)
    assert [adapter.name for adapter in store.list()] == ["real"]


def test_list_skips_a_bad_name_or_unreadable_metadata_with_a_warning(store, root, caplog):
    store.save("good", CONFIG, WEIGHTS, owner="acme")
    place_peft_dir(root, "bad name")
    broken = place_peft_dir(root, "broken")
    (broken / "loraplex.json").write_text("{not json")
    wrong_shape = place_peft_dir(root, "wrong-shape")
    (wrong_shape / "loraplex.json").write_text(json.dumps({"owner": 7, "created": "yesterday"}))
    with caplog.at_level(logging.WARNING):
        assert [adapter.name for adapter in store.list()] == ["good"]
    warned = caplog.text
    assert "bad name" in warned
    assert "broken" in warned
    assert "wrong-shape" in warned


def test_a_failed_overwrite_keeps_the_old_version_without_a_restart(store, monkeypatch):
    store.save("a", CONFIG, WEIGHTS, owner="acme")
    real_rename = os.rename

    def rename(src, dst):
        if "/.staging/" in os.fspath(src):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="No space"):
        store.save("a", NEW_CONFIG, NEW_WEIGHTS, owner="acme", overwrite=True)
    assert files_of(store.get("a").path) == (CONFIG, WEIGHTS)
    assert leftovers(store.root) == []


def test_crash_before_an_overwrite_lands_restores_the_old_version(store, root, monkeypatch):
    store.save("a", CONFIG, WEIGHTS, owner="acme")
    crash_on_rename(monkeypatch, ".staging")
    with pytest.raises(SimulatedCrash):
        store.save("a", NEW_CONFIG, NEW_WEIGHTS, owner="acme", overwrite=True)
    monkeypatch.undo()
    restarted = AdapterStore(root)
    restarted.recover()
    assert [adapter.name for adapter in restarted.list()] == ["a"]
    assert restarted.get("a").owner == "acme"
    assert files_of(restarted.get("a").path) == (CONFIG, WEIGHTS)
    assert leftovers(root) == []


def test_crash_after_an_overwrite_lands_keeps_the_new_version(store, root, monkeypatch):
    store.save("a", CONFIG, WEIGHTS, owner="acme")
    crash_on_rename(monkeypatch, ".replaced")
    with pytest.raises(SimulatedCrash):
        store.save("a", NEW_CONFIG, NEW_WEIGHTS, owner="acme", overwrite=True)
    monkeypatch.undo()
    restarted = AdapterStore(root)
    restarted.recover()
    assert files_of(restarted.get("a").path) == (NEW_CONFIG, NEW_WEIGHTS)
    assert leftovers(root) == []


def test_crash_while_writing_a_new_adapter_leaves_nothing_behind(store, root, monkeypatch):
    def fsync(fd):
        raise SimulatedCrash

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(SimulatedCrash):
        store.save("fresh", CONFIG, WEIGHTS, owner="acme")
    monkeypatch.undo()
    assert store.list() == []
    restarted = AdapterStore(root)
    restarted.recover()
    assert restarted.list() == []
    assert leftovers(root) == []


def test_crash_at_the_final_rename_of_a_new_adapter_leaves_nothing_behind(store, root, monkeypatch):
    crash_on_rename(monkeypatch, ".staging")
    with pytest.raises(SimulatedCrash):
        store.save("fresh", CONFIG, WEIGHTS, owner="acme")
    monkeypatch.undo()
    restarted = AdapterStore(root)
    restarted.recover()
    assert restarted.list() == []
    assert leftovers(root) == []


def test_crash_while_erasing_a_deleted_adapter_does_not_bring_it_back(store, root, monkeypatch):
    store.save("a", CONFIG, WEIGHTS, owner="acme")

    def rmtree(path, *args, **kwargs):
        raise SimulatedCrash

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    with pytest.raises(SimulatedCrash):
        store.delete("a")
    monkeypatch.undo()
    restarted = AdapterStore(root)
    restarted.recover()
    assert restarted.list() == []
    assert leftovers(root) == []
