"""Rendering chat templates with bounded time, memory and output: `ChatTemplateRenderer`.

Owns: a small pool of sandbox processes (`TemplateProcess`, each a fresh interpreter running
`template_worker` under an address-space limit), started on first use and reused; handing each
render to a free one (callers wait, boundedly, while all are busy; the wait is not render time);
replacing one that overran its time, ran out of memory or died; the limits (template size, prompt
size, memory, wait); and turning every template problem into a typed error that names it:
`RequestInvalid` from `render`, `AdapterInvalid` from `check`.

Templates come from tenants' adapters, so they are hostile input: nothing here compiles or runs
one in the server's process. Must not: let a template's failure out as anything but the typed
errors above, or hold the pool's lock while a process starts or renders.
"""

import threading
import time
from collections.abc import Mapping

from loraplex.api.template_process import TemplateProcess, WorkerLost, WorkerTimedOut
from loraplex.errors import AdapterInvalid, QueueFull, RequestInvalid

MAX_TEMPLATE_CHARS = 256 * 1024  # the longest template accepted
MAX_PROMPT_CHARS = 4 * 1024 * 1024  # the longest rendered prompt the server accepts
WORKER_MEMORY_BYTES = 1 << 30  # each worker's address-space limit (RLIMIT_AS)
KILL_GRACE = 0.5  # seconds past the timeout a worker has to report its own deadline before it is killed
MAX_WAIT = 30.0  # seconds a render waits for a free worker before a 429
# A conversation every serviceable template renders: user and assistant turns, alternating.
SAMPLE_CONVERSATION = (
    {"role": "user", "content": "Hello."},
    {"role": "assistant", "content": "Hi! How can I help?"},
    {"role": "user", "content": "What is 2 + 2?"},
)


class ChatTemplateRenderer:
    """Renders chat templates in sandbox processes, with bounded time, memory and output.

    Thread-safe. Workers start on first use; `close` stops them (a later call starts new ones).

    Args:
        timeout: seconds one render may take (the worker's own deadline; a worker still silent
            KILL_GRACE seconds later is killed and replaced).
        max_output_chars: the longest prompt a render may produce.
        workers: how many renders may run at once (one process each).
        max_wait: seconds a render waits for a free worker before `QueueFull`.
    """

    def __init__(
        self, timeout: float, max_output_chars: int = MAX_PROMPT_CHARS, workers: int = 2, max_wait: float = MAX_WAIT
    ):
        self.timeout = timeout
        self.max_output_chars = max_output_chars
        self.workers = workers
        self.max_wait = max_wait
        self._free = threading.Condition()
        self._idle: list[TemplateProcess] = []
        self._running: set[TemplateProcess] = set()  # every live worker, idle or busy
        self._starting = 0  # workers being started, counted against `workers`
        self._epoch = 0  # bumped by close: workers of an older epoch are killed when handed back

    def render(
        self,
        template: str,
        messages: list[dict],
        add_generation_prompt: bool,
        special_tokens: Mapping[str, str],
        tools: list[dict] | None = None,
    ) -> str:
        """The prompt `template` makes of `messages`, exactly as transformers' `apply_chat_template`.

        Args:
            template: the Jinja chat template.
            messages: the conversation, as `{"role", "content", ...}` dicts (keys set to None are
                dropped); an assistant's `tool_calls` and a tool message's `tool_call_id` as
                tool-calling templates read them.
            add_generation_prompt: end with the header that opens the assistant's turn.
            special_tokens: the tokenizer's `special_tokens_map` (bos_token, eos_token, ...), which
                templates see as variables.
            tools: the request's tools in OpenAI's shape (`{"type": "function", "function": {...}}`),
                the template's `tools` variable; None when there are none.

        Raises:
            RequestInvalid: the template cannot render these messages; the message says why.
            QueueFull: every worker stayed busy for `max_wait` seconds.
            EngineFailed: a sandbox process cannot start (the server's fault, not the caller's).
        """
        reply = self._ask(template, messages, add_generation_prompt, special_tokens, tools)
        if "error" in reply:
            raise RequestInvalid(f"the chat template cannot render these messages: {reply['message']}", param="messages")
        return reply["text"]

    def check(self, template: str, special_tokens: Mapping[str, str]) -> None:
        """Refuse a template that does not compile or cannot render `SAMPLE_CONVERSATION`.

        Args:
            template: the Jinja chat template, as uploaded.
            special_tokens: the base tokenizer's `special_tokens_map`, as `render` will get it.

        Raises:
            AdapterInvalid: the problem (a syntax error and its line, a timeout, an output past
                the limit, or the error the sample conversation raised), with param chat_template.
        """
        reply = self._ask(template, list(SAMPLE_CONVERSATION), True, special_tokens)
        error = reply.get("error")
        if error is None and reply["text"]:
            return
        if error is None:
            problem = "it renders nothing for a plain user/assistant conversation"
        elif error in ("template_size", "syntax"):
            problem = reply["message"]
        else:
            problem = f"rendering a plain user/assistant conversation: {reply['message']}"
        raise AdapterInvalid(f"the chat template cannot be served: {problem}", param="chat_template")

    def close(self) -> None:
        """Stop every worker now (a render in flight fails); a later call starts new ones."""
        with self._free:
            self._epoch += 1
            idle, self._idle = self._idle, []
            busy = self._running.difference(idle)
            self._running.difference_update(idle)
            self._free.notify_all()
        for worker in idle:
            worker.kill()
        for worker in busy:  # their threads reap them as they hand them back
            worker.interrupt()

    def _ask(
        self, template: str, messages: list[dict], add_generation_prompt: bool, special_tokens, tools=None
    ) -> dict:
        if len(template) > MAX_TEMPLATE_CHARS:
            return {"error": "template_size", "message": f"the template is over {MAX_TEMPLATE_CHARS} characters"}
        request = {
            "template": template,
            "messages": [{key: value for key, value in m.items() if value is not None} for m in messages],
            "add_generation_prompt": add_generation_prompt,
            "special_tokens": dict(special_tokens),
            "tools": tools,
        }
        worker, epoch = self._acquire()
        try:
            reply = worker.ask(request, self.timeout + KILL_GRACE)
        except WorkerTimedOut:
            self._hand_back(worker, epoch, alive=False)
            return {"error": "timeout", "message": f"rendering took longer than {self.timeout:g} s"}
        except WorkerLost as exc:
            self._hand_back(worker, epoch, alive=False)
            return {"error": "crash", "message": f"the sandbox process rendering it died: {exc}"}
        except BaseException:
            self._hand_back(worker, epoch, alive=False)
            raise
        self._hand_back(worker, epoch, alive=reply.get("error") != "memory")  # a fresh heap after a MemoryError
        return reply

    def _acquire(self) -> tuple[TemplateProcess, int]:
        deadline = time.monotonic() + self.max_wait
        with self._free:
            while True:
                while self._idle:
                    worker = self._idle.pop()
                    if worker.alive():
                        return worker, self._epoch
                    self._running.discard(worker)  # it died while idle
                    worker.kill()
                if len(self._running) + self._starting < self.workers:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise QueueFull(f"every chat template worker stayed busy for {self.max_wait:g} s; retry later")
                self._free.wait(left)
            epoch = self._epoch
            self._starting += 1
        worker = None
        try:
            worker = TemplateProcess(self.timeout, self.max_output_chars, WORKER_MEMORY_BYTES)
        finally:
            with self._free:
                self._starting -= 1
                if worker is not None:
                    self._running.add(worker)
                self._free.notify()
        return worker, epoch

    def _hand_back(self, worker: TemplateProcess, epoch: int, alive: bool) -> None:
        with self._free:
            keep = alive and epoch == self._epoch
            if keep:
                self._idle.append(worker)
            else:
                self._running.discard(worker)
            self._free.notify()
        if not keep:
            worker.kill()
