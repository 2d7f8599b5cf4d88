"""Grammar matchers of constrained requests: built off the engine thread, stepped with their tokens.

Owns: `GrammarMatchers`, the engine's side of structured outputs. A request whose params carry a
`grammar` (an llguidance grammar string the API layer built and validated: api/structured_output.py)
gets an `llguidance.LLMatcher` built on a small thread pool, so the step never waits for one; the
engine holds the request back from the scheduler until its matcher is ready (`poll`), as the
scheduler passes over a request whose adapter is still being read. Matchers are copied
(`deep_copy`) from a template per grammar string, kept in a bounded LRU, so a repeated schema
costs one build. The llguidance tokenizer is built once, from the base's Hugging Face tokenizer,
on the pool when the first grammar needs it. Each step, `fill_bitmask` gives the
[M, ceil(V/32)] int32 bitmask of the constrained rows (llguidance's parser limits bound each
mask's work), and `advance` feeds the matcher the sampled token.
Once a step's tokens are in, `prefetch` starts computing the next masks on a background thread,
so they are ready when the next forward pass (which does not need them) ends, as vLLM overlaps
mask computation with the model; a request without a prefetched mask has its own computed then.
The matcher lives on the `Request`, so preemption (recompute) leaves it consistent: output ids
never shrink and the matcher has consumed exactly them.

It knows token ids and grammar strings, never request text or JSON schemas, and never touches the
scheduler, the KV cache or the model.
"""

import collections
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import llguidance
import llguidance.hf
import torch

from loraplex.engine.request import Request

log = logging.getLogger(__name__)

BUILD_THREADS = 2  # matchers built at once (llguidance drops the GIL while it builds)
TEMPLATE_CACHE_SIZE = 128  # grammars whose built matcher is kept to copy from


def parser_limits() -> llguidance.LLParserLimits:
    """llguidance's limits, the same on both sides: they bound a grammar's size and each mask's work."""
    return llguidance.LLParserLimits(verbose_errors=False)


def grammar_tokenizer(hf_tokenizer, eos_ids: set[int] | None = None) -> llguidance.LLTokenizer:
    """The llguidance tokenizer of a Hugging Face fast tokenizer (about a second for a large vocabulary).

    Args:
        hf_tokenizer: the base's tokenizer.
        eos_ids: the model's end-of-sequence tokens, which a grammar allows where it accepts;
            the tokenizer's own EOS when None or empty.
    """
    eos = sorted(eos_ids) if eos_ids else None
    return llguidance.hf.from_tokenizer(hf_tokenizer, eos_token=eos)


@dataclass(eq=False)
class _Build:
    request: Request
    future: Future


class GrammarMatchers:
    """The matchers of the engine's constrained requests.

    Args:
        hf_tokenizer: the base's Hugging Face tokenizer.
        eos_ids: the model's end-of-sequence tokens.
        wake: called on a pool thread when a matcher is built (or fails), so the engine takes it up.
    """

    def __init__(self, hf_tokenizer, eos_ids: set[int], wake: Callable[[], None]):
        self._hf_tokenizer = hf_tokenizer
        self._eos_ids = eos_ids
        self._wake = wake
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()  # the tokenizer's first build and the template cache
        self._templates: collections.OrderedDict[str, llguidance.LLMatcher] = collections.OrderedDict()
        self._pool: ThreadPoolExecutor | None = None
        self._builds: dict[str, _Build] = {}  # request id -> its matcher being built
        self._mask_pool: ThreadPoolExecutor | None = None
        self._executor: llguidance.LLExecutor | None = None  # llguidance's, for a batch of masks in one call
        self._next: dict[str, tuple[Future, int]] = {}  # request id -> (its prefetched masks, its row in them)

    @property
    def pending(self) -> int:
        """Requests whose matcher is still being built (or built and not yet taken up)."""
        return len(self._builds)

    def build(self, request: Request) -> None:
        """Start building `request`'s matcher on the pool; `poll` hands the request back once it is ready."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(BUILD_THREADS, thread_name_prefix="loraplex-grammar")
        future = self._pool.submit(self._matcher, request.params.grammar)
        self._builds[request.request_id] = _Build(request, future)
        future.add_done_callback(lambda _: self._wake())

    def poll(self) -> tuple[list[Request], list[tuple[Request, str]]]:
        """The requests whose matcher is now built (set on them), and those whose grammar could not be built, with why.

        Requests finished meanwhile (cancelled) are dropped.
        """
        ready, failed = [], []
        for request_id, build in list(self._builds.items()):
            if not build.future.done():
                continue
            del self._builds[request_id]
            if build.request.finished:
                continue
            try:
                build.request.matcher = build.future.result()
            except Exception as exc:
                failed.append((build.request, f"its grammar cannot be enforced: {exc}"))
            else:
                ready.append(build.request)
        return ready, failed

    def free(self, request: Request) -> None:
        """Forget `request`'s matcher (finished or cancelled); a build in flight is dropped when it ends."""
        self._builds.pop(request.request_id, None)
        self._next.pop(request.request_id, None)
        request.matcher = None

    def fill_bitmask(self, requests: list[Request]) -> torch.Tensor:
        """The next-token bitmask of each request, on the CPU.

        Args:
            requests: M requests, each with a matcher.

        Returns:
            [M, ceil(V_tok / 32)] int32: bit j of word w of row i allows token 32 * w + j, over the
            tokenizer's vocabulary V_tok.
        """
        prefetched = [self._next.pop(request.request_id, None) for request in requests]
        first = prefetched[0]
        if first is not None and all(
            ahead is not None and ahead[0] is first[0] and ahead[1] == row for row, ahead in enumerate(prefetched)
        ):
            masks = first[0].result()  # the usual step: the same requests, in the same order, as the last one
            return masks if masks.shape[0] == len(requests) else masks[: len(requests)]
        missing = [request for request, ahead in zip(requests, prefetched) if ahead is None]
        computed = iter(self._fill([request.matcher for request in missing]) if missing else [])
        rows = [next(computed) if ahead is None else ahead[0].result()[ahead[1]] for ahead in prefetched]
        return torch.stack(rows)

    def prefetch(self, requests: list[Request]) -> None:
        """Start computing the next masks of `requests` that still run with a matcher, off the engine thread.

        Their matchers must not advance before `fill_bitmask` took the masks (which waits for them).
        """
        running = [request for request in requests if request.matcher is not None and not request.finished]
        if not running:
            return
        if self._mask_pool is None:
            self._mask_pool = ThreadPoolExecutor(1, thread_name_prefix="loraplex-masks")
        future = self._mask_pool.submit(self._fill, [request.matcher for request in running])
        for row, request in enumerate(running):
            self._next[request.request_id] = (future, row)

    def _fill(self, matchers: list[llguidance.LLMatcher]) -> torch.Tensor:
        """[len(matchers), W] int32: each matcher's next-token bitmask.

        One llguidance call for the whole batch, on an executor of one thread: the GIL is dropped
        once, not once per matcher (a background thread taking the GIL back 16 times a step slowed
        the forward pass by 5 to 20% here), and no idle worker spins on a core the forward pass
        needs (a mask is tens of microseconds). llguidance.torch's fill_next_token_bitmask_par
        does the same; importing that module compiles a torch function (seconds) unused here.
        """
        if self._executor is None:
            self._executor = llguidance.LLExecutor(1)
        words = -(-self._tokenizer.vocab_size // 32)
        bitmask = torch.zeros(len(matchers), words, dtype=torch.int32)  # [M, W]
        self._executor.unsafe_compute_mask_ptr(
            [(matcher, row) for row, matcher in enumerate(matchers)], bitmask.data_ptr(), 4 * words, len(matchers)
        )
        return bitmask

    def advance(self, request: Request, token: int) -> bool:
        """Feed `request`'s matcher the token it sampled; returns whether the grammar is complete.

        Raises:
            ValueError: the grammar refused the token (it was masked, so only a broken mask does this).
        """
        ahead = self._next.pop(request.request_id, None)
        if ahead is not None:  # not taken by fill_bitmask (a row sampled alone): let it finish before the matcher moves
            ahead[0].result()
        matcher = request.matcher
        if not matcher.consume_token(token):
            raise ValueError(f"the grammar refused token {token}: {matcher.get_error()}")
        return matcher.is_stopped()

    def _matcher(self, grammar: str) -> llguidance.LLMatcher:
        """On a pool thread: a fresh matcher for `grammar`, copied from its cached template."""
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = grammar_tokenizer(self._hf_tokenizer, self._eos_ids)
            template = self._templates.get(grammar)
            if template is not None:
                self._templates.move_to_end(grammar)
                return template.deep_copy()
        template = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0, limits=parser_limits())
        # The first mask builds the lexer states every copy shares (up to the limits' initial lexer
        # fuel: 0.45 s for `a{1000000}` here), so it is paid here, never on the engine's step.
        template.compute_bitmask()
        if template.is_error():
            raise ValueError(template.get_error())
        with self._lock:
            self._templates[grammar] = template
            while len(self._templates) > TEMPLATE_CACHE_SIZE:
                self._templates.popitem(last=False)
            return template.deep_copy()
