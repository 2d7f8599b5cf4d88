"""Several replicas on one shared store: each polls it and takes up what the others changed.

Owns: the poller thread that calls `AdapterCatalog.sync_store` every `store_poll_interval`
seconds while the app runs, logging what changed. Polling (a directory listing and a few stats
per adapter) works on every shared filesystem, NFS and the Kubernetes RWX volume included, where
change notifications do not. Reading a new version happens on this thread, never on the event
loop or the engine's. It must not write to the store.
"""

import logging
import threading

from loraplex.service.catalog import AdapterCatalog

log = logging.getLogger(__name__)


class StoreSync:
    """Polls the store for adapters other replicas added, replaced or deleted.

    Args:
        catalog: the replica's catalog, which reads and registers what changed.
        interval: seconds between polls.
    """

    def __init__(self, catalog: AdapterCatalog, interval: float):
        self.catalog = catalog
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="loraplex-store-sync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                changes = self.catalog.sync_store()
            except Exception:  # a failed poll (a store briefly unreachable) is retried at the next one
                log.exception("could not sync with the adapter store")
                continue
            for kind in ("added", "replaced", "removed"):
                for name in getattr(changes, kind):
                    log.info("adapter %s %s by another replica", name, kind)
            for name, problem in changes.problems:
                log.warning("adapter %s in the store cannot be served: %s", name, problem)
