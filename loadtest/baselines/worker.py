"""The one thread that runs the model for a baseline server, fed by a first-in-first-out queue.

Owns: the queue of waiting requests, taking up to `max_batch` of them at a time in arrival order,
running them (`run`, which the naive and mixed workers define), failing whatever a run left
unfinished, and counting the batches it ran by size. It must not touch the event loop except
through `Request`, and knows nothing of HTTP or text.
"""

import logging
import threading
from collections import Counter, deque

from peft import PeftModel

from loadtest.baselines.request import Request

logger = logging.getLogger(__name__)


class Worker:
    """Runs batches of waiting requests, one batch at a time, on its own thread.

    Args:
        model: the PEFT model with every adapter loaded; only this worker's thread uses it.
        eos_ids: the checkpoint's EOS ids (see `take_over_eos`).
        max_batch: the most requests one run takes.
    """

    def __init__(self, model: PeftModel, eos_ids: frozenset[int], max_batch: int):
        self.model = model
        self.eos_ids = eos_ids
        self.max_batch = max_batch
        self.adapters = tuple(model.peft_config)
        self.max_positions = model.config.max_position_embeddings
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.device = model.device
        self.batch_sizes: Counter[int] = Counter()  # how many runs took each number of requests
        self._waiting: deque[Request] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=type(self).__name__, daemon=True)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Fail the waiting requests, then wait for the running batch to end."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()

    def submit(self, request: Request) -> None:
        """Queue a validated request: anything `generate` could raise on must be refused before this.

        Args:
            request: a request whose adapter exists and whose prompt and `max_tokens` fit the model.
        """
        with self._wake:
            self._waiting.append(request)
            self._wake.notify()

    def run(self, batch: list[Request]) -> None:
        """Generate for `batch`, handing each request its tokens as they come."""
        raise NotImplementedError

    def _loop(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._waiting or self._stopping)
                if self._stopping:
                    break
                batch = [self._waiting.popleft() for _ in range(min(self.max_batch, len(self._waiting)))]
            self.batch_sizes[len(batch)] += 1
            try:
                self.run(batch)
                reason = "generation ended before this request finished"
            except Exception as error:  # a failed batch fails its requests, never the server
                logger.exception("generation failed for a batch of %d", len(batch))
                reason = f"generation failed: {error!r}"
            for request in batch:
                request.fail(reason)
        for request in self._waiting:
            request.fail("the server is shutting down")
