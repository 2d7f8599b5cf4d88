"""The engine: adapters in, requests in, one step at a time, tokens out.

Owns: the step loop (schedule, forward, sample, detokenize, stop checks, finish), the adapter name
table, and the two front doors built on it: a synchronous `generate` for scripts and tests, and
`add_request` with a sink (and `submit`, from `EngineFront`) for async callers, with the loop on
a thread of its own (or, in an engine process, driven by core_process.py). Requests, cancels
and adapter changes from other threads arrive through an inbox and take effect at the next step
boundary, so the scheduler and the slots are only touched here.
"""

import contextlib
import functools
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence

import torch

from loraplex.config import EngineConfig
from loraplex.engine.adapter_tiers import AdapterTiers
from loraplex.engine.base_model import BaseModel, load_base_model
from loraplex.engine.detokenizer import Detokenizer
from loraplex.engine.front import EngineFront
from loraplex.engine.fused_projections import fuse_projections
from loraplex.engine.grammar import GrammarMatchers
from loraplex.engine.host_tier import HostState
from loraplex.engine.kv_cache import KVCache
from loraplex.engine.kv_sizing import block_bytes, profile_peak_bytes, size_kv_cache
from loraplex.engine.lora_layer import LoraContext, module_shapes, wrap_lora_targets
from loraplex.engine.ops.backend import make_step_ops
from loraplex.engine.outputs import LiveRequest, OutputProcessor
from loraplex.engine.packed_linear import pack_linears
from loraplex.engine.request import (
    Completion,
    FinishReason,
    Request,
    SamplingParams,
    TokenEvent,
    check_prompt,
)
from loraplex.engine.runner import ModelRunner
from loraplex.engine.scheduler import ScheduledSeq, Scheduler, SchedulerLimits
from loraplex.engine.stats import EngineObserver, EngineSnapshot
from loraplex.engine.stream import LoopBridges, Sink
from loraplex.engine.warmup import check_model_runs
from loraplex.errors import AdapterNotFound, EngineUnavailable, ModelLoadError, QueueFull
from loraplex.lora.adapter import LoraAdapter
from loraplex.tenancy import DEFAULT_TENANT

log = logging.getLogger(__name__)

MAX_FAILED_STEPS = 3  # steps in a row that fail every request in them before the engine stops


class EngineStopped(Exception):
    """The engine cannot go on (raised on its own thread, which then stops and reports why)."""


class Engine(EngineFront):
    """One resident base model serving many adapters through continuous batching.

    Args:
        config: the engine configuration.
        base: an already loaded base model; loaded from `config.model` when omitted.
        observer: receives per-step, per-token and per-request callbacks (metrics).
    """

    def __init__(self, config: EngineConfig, base: BaseModel | None = None, observer: EngineObserver | None = None):
        self.config = config
        self.observer = observer or EngineObserver()
        self.base = base or load_base_model(config)
        self.dtype = self.base.dtype
        hf_config = self.base.model.config
        self.max_model_len = config.model_len(getattr(hf_config, "max_position_embeddings", None))
        self.vocab_size = hf_config.vocab_size
        self.lora_context = LoraContext()
        self.wrappers = (
            wrap_lora_targets(self.base.model, config.max_loras, config.max_lora_rank, self.base.dtype, self.lora_context)
            if config.enable_lora
            else {}
        )
        if config.linear_backend == "auto":
            fuse_projections(self.base.model)
            pack_linears(self.base.model)
        self.module_shapes = module_shapes(self.wrappers)
        self.null_slot = config.max_loras
        self._wake = threading.Event()
        self.on_wake: Callable[[], None] | None = None  # also called when an adapter read finishes (engine process)
        self.tiers = AdapterTiers(config, self.wrappers, self.module_shapes, self.base.dtype, self.base.device, self._loaded)
        self.adapters, self.host, self.slots = self.tiers.table, self.tiers.host, self.tiers.slots
        self.slot_writer = self.tiers.slot_writer
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        self._cache_layout = (hf_config.num_hidden_layers, config.block_size, hf_config.num_key_value_heads, head_dim)
        self.ops = make_step_ops(config.kernel_backend, self.base.device)
        self.kernel_backend = self.ops.name
        per_block = block_bytes(*self._cache_layout, self.base.dtype)
        self.kv_sizing = size_kv_cache(config, self.max_model_len, per_block, self.base.device, self._profile_peak)
        self.kv_cache = self._make_cache(self.kv_sizing.num_blocks)
        self.kv_summary = self.kv_sizing.summary(self.max_model_len)  # the start-up line
        limits = SchedulerLimits(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=max(config.max_num_batched_tokens, config.max_num_seqs),
            max_slot_bypass=config.max_num_seqs if config.max_slot_bypass is None else config.max_slot_bypass,
            fair=config.scheduling == "fair",
            tenant_weights=config.tenant_weights,
            prefix_caching=config.enable_prefix_caching,
            prefix_per_tenant=config.prefix_cache_scope == "tenant",
        )
        self.scheduler = Scheduler(limits, self.kv_cache, self.slots, self.host)
        self.runner = ModelRunner(
            self.base.model, self.kv_cache, self.lora_context, self.base.device, config.max_lora_rank, config.lora_strategy, self.ops
        )
        self.eos_ids = self._eos_ids()
        self.grammars = GrammarMatchers(self.base.tokenizer, self.eos_ids, self._loaded)
        self._live: dict[str, LiveRequest] = {}
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._bridges = LoopBridges(self.cancel)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._queued = 0  # requests added but never admitted yet (the bounded queue)
        self.queue_releases = 0  # places given back, ever: admitted, or ended before admission
        self._queued_lock = threading.Lock()
        self.outputs = OutputProcessor(
            self.runner, self.null_slot, self.eos_ids, self.max_model_len, config.logprobs_mode == "raw_logits",
            self._live, self._finish, lambda request, gap: self.observer.token(request, gap), self.grammars,
        )  # fmt: skip
        self.num_steps = 0
        self._failed_steps = 0  # consecutive steps in which every request failed
        self.failure: str | None = None  # why the loop stopped, once it has
        self.snapshot = EngineSnapshot(slots_total=config.max_loras)
        self._published_generation = 0
        check_model_runs(self)
        if config.cuda_graphs:
            self._capture_decode_graphs()

    def _make_cache(self, num_blocks: int) -> KVCache:
        num_layers, block_size, kv_heads, head_dim = self._cache_layout
        return KVCache(num_layers, num_blocks, block_size, kv_heads, head_dim, self.base.dtype, self.base.device)

    def _profile_peak(self) -> int:
        """CUDA bytes in use at the peak of the largest step: `max_num_batched_tokens` over up to `max_num_seqs` sequences."""
        tokens = min(self.config.max_num_batched_tokens, self.max_model_len - 1)
        num_seqs = max(1, min(self.config.max_num_seqs, tokens))
        length = max(1, tokens // num_seqs)
        probe = self._make_cache(num_seqs * -(-length // self.config.block_size))
        runner = ModelRunner(
            self.base.model, probe, self.lora_context, self.base.device, self.config.max_lora_rank, self.config.lora_strategy, self.ops
        )
        params = SamplingParams(max_tokens=1, temperature=0)
        requests = [Request(f"kv-profile-{i}", [0] * length, None, params) for i in range(num_seqs)]
        for request in requests:
            request.block_table = probe.allocator.allocate(probe.blocks_needed(length))
        cache_bytes = 2 * sum(keys.numel() * keys.element_size() for keys in probe.keys)
        batch = [ScheduledSeq(request, 0, length) for request in requests]
        peak = profile_peak_bytes(functools.partial(runner.run, batch, self.null_slot), cache_bytes, self.base.device)
        del probe, runner
        torch.cuda.empty_cache()
        return peak

    def _capture_decode_graphs(self) -> None:
        """Capture a decode graph per batch-size bucket (decode_graphs.py), after the start-up check compiled every kernel."""
        if self.base.device.type != "cuda" or self.ops.name != "triton":
            raise ModelLoadError(
                f"--cuda-graphs needs CUDA and the Triton kernels; this engine runs {self.ops.name} ops on {self.base.device}"
            )
        from loraplex.engine.decode_graphs import DecodeGraphs, bucket_sizes

        self.runner.graphs = DecodeGraphs(
            self.runner, bucket_sizes(self.config.max_num_seqs), self.null_slot, self.config.max_lora_rank,
            self.kv_cache.scratch_slot, self.max_model_len,
        )  # fmt: skip

    def _eos_ids(self) -> set[int]:
        eos = getattr(self.base.model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = self.base.tokenizer.eos_token_id
        if eos is None:
            return set()
        return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}

    # ----- adapters -------------------------------------------------------------------------

    def register_adapter(self, adapter: LoraAdapter) -> None:
        """Make `adapter` the version new requests for its name get; running ones keep theirs.

        An indexed adapter (`modules` None) is read from its source when a request first needs it
        (or now, when `pin_adapters` names it); one built in memory is laid out at first use.
        """
        previous = self.tiers.register(adapter)
        if adapter.name in self.config.pin_adapters:
            self._send("pin", adapter)
        if previous is not None:
            self._send("retire", previous)

    def prefetch(self, names: Sequence[str] | None = None, timeout: float = 60.0) -> None:
        """Read adapters into host memory now and wait for them: for scripts and tests that step by hand.

        The background loop must not be running (a served engine reads adapters as requests need them).

        Args:
            names: the adapters to read; None reads every registered one (up to the host tier's bounds).
            timeout: seconds to wait for the reads in all.

        Raises:
            AdapterNotFound / AdapterInvalid: a named adapter is not registered / could not be read.
            TimeoutError: the reads took longer than `timeout`.
        """
        if self._thread is not None:
            raise RuntimeError("prefetch() waits on the engine's own thread; stop the background loop first")
        self._drain_inbox()
        wanted = []
        for name in self.adapters if names is None else names:
            if name not in self.adapters:
                raise AdapterNotFound(f"adapter {name!r} is not loaded")
            wanted.append(self.adapters[name])
        for adapter in wanted:
            self.host.acquire(adapter)
        try:
            deadline = time.monotonic() + timeout
            while any(self.host.state(a) is HostState.LOADING for a in wanted):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"adapters were still being read after {timeout:g} s")
                self._wake.wait(0.05)
                self._wake.clear()
                self._poll_host()
            for adapter in wanted:
                if self.host.state(adapter) is HostState.FAILED:
                    raise self.host.error(adapter)
        finally:
            for adapter in wanted:
                self.host.release(adapter)
            self._poll_host()

    def adapter_tier(self, adapter: LoraAdapter) -> str:
        """Where this version is now: device (in a slot), host, loading, failed, or disk."""
        return self.tiers.tier(adapter, self.snapshot.slot_uids)

    def remove_adapter(self, name: str) -> None:
        """Forget `name`; requests already running on it finish, then its slot is freed."""
        adapter = self.adapters.pop(name, None)
        if adapter is None:
            raise AdapterNotFound(f"adapter {name!r} is not loaded")
        self._send("retire", adapter)

    def _loaded(self) -> None:
        """On a loader or grammar thread: a read or a matcher's build finished; wake the loop so a step takes it up."""
        self._wake.set()
        if self.on_wake is not None:
            self.on_wake()

    # ----- requests -------------------------------------------------------------------------

    def add_request(
        self,
        prompt_ids: Sequence[int],
        adapter: str | LoraAdapter | None = None,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        sink: Sink | None = None,
        *,
        bounded: bool = True,
        tenant: str = DEFAULT_TENANT,
    ) -> str:
        """Queue a request; its events go to `sink` from the engine's thread. Returns its id.

        `bounded` False skips the `max_queue` bound (`generate`, which runs the steps itself);
        `tenant` is who the fair scheduler counts its service to.
        """
        params = params or SamplingParams()
        prompt_ids = check_prompt(prompt_ids, self.max_model_len, self.vocab_size)
        if isinstance(adapter, str):
            if adapter not in self.adapters:
                raise AdapterNotFound(f"adapter {adapter!r} is not loaded")
            adapter = self.adapters[adapter]
        if self.failure is not None:
            raise EngineUnavailable(f"the engine stopped after an error and takes no requests: {self.failure}")
        generator = None
        if not params.greedy:
            generator = torch.Generator(device=self.base.device)
            seed = params.generator_seed
            generator.manual_seed(seed if seed is not None else int.from_bytes(uuid.uuid4().bytes[:8], "big"))
        request = Request(request_id or uuid.uuid4().hex, prompt_ids, adapter, params, generator, tenant=tenant)
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = []
        detokenizer = Detokenizer(
            self.base.tokenizer, prompt_ids, params.stop, params.include_stop_str_in_output, params.skip_special_tokens
        )
        live = LiveRequest(request, detokenizer, sink or (lambda event: None))
        self._reserve_queue_place(bounded)  # last: nothing after it can fail, so no place is ever lost
        self._send("add", live)
        return request.request_id

    def _reserve_queue_place(self, bounded: bool) -> None:
        with self._queued_lock:
            if bounded and self.config.max_queue is not None and self._queued >= self.config.max_queue:
                raise QueueFull(f"the queue is full ({self.config.max_queue} requests waiting); retry later")
            self._queued += 1

    def _release_queue_place(self) -> None:
        with self._queued_lock:
            self._queued -= 1
            self.queue_releases += 1

    def cancel(self, request_id: str) -> None:
        """Abort a request: its KV blocks and slot reference are freed at the next step boundary."""
        self._send("abort", request_id)

    def abort_all(self) -> None:
        """Abort every request at the next step boundary (a shutdown cutting what still runs)."""
        self._send("abort_all", None)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        adapters: Sequence[str | LoraAdapter | None] | None = None,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[Completion]:
        """Run requests to completion on the calling thread (the loop thread must not be running)."""
        if self._thread is not None:
            raise RuntimeError("generate() runs the engine itself; stop the background loop first")
        adapters = adapters if adapters is not None else [None] * len(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        collected: dict[str, list[TokenEvent]] = {}
        ids = []
        for prompt, adapter, request_params in zip(prompts, adapters, params, strict=True):
            events: list[TokenEvent] = []
            request_id = self.add_request(prompt, adapter, request_params, sink=events.append, bounded=False)
            collected[request_id] = events
            ids.append(request_id)
        self._drain_inbox()
        while self.has_work():
            if not self.step():  # every waiting request waits for its adapter's read
                self._wake.wait(0.05)
                self._wake.clear()
        return [Completion.from_events(collected[i], list(prompt)) for i, prompt in zip(ids, prompts)]

    # ----- the step loop --------------------------------------------------------------------

    def step(self) -> bool:
        """Schedule, run and post-process one iteration; returns whether anything ran.

        A failure one request causes fails that request alone. When the forward pass raises, or
        gives some sequences non-finite logits, those sequences are run one by one
        (`find_culprits`): the ones that fail alone are failed, naming what went wrong, and the
        others lose nothing but time (their chunk is recomputed next step). An error while
        sampling or post-processing one request fails only that request.
        """
        self._drain_inbox()
        self._poll_host()
        self._poll_grammars()
        batch = self.scheduler.schedule()
        if not batch:
            self._publish_host_changes()
            return False
        now = time.monotonic()
        for seq in batch:
            if seq.request.first_scheduled_time is None:
                seq.request.first_scheduled_time = now
                self._release_queue_place()
        outputs = self.outputs
        outputs.failures = 0
        try:
            self.slot_writer.ready_for_step()
            logits, rows = self.runner.run(batch, self.null_slot)
        except Exception as exc:
            log.exception("an engine step of %d sequences failed; running them one by one to find why", len(batch))
            outputs.blame(batch, f"{type(exc).__name__}: {exc}")
        else:
            outputs.process(batch, logits, rows)
        self._failed_steps = self._failed_steps + 1 if outputs.failures >= len(batch) else 0
        if self._failed_steps >= MAX_FAILED_STEPS:
            raise EngineStopped(f"{MAX_FAILED_STEPS} engine steps in a row failed every request in them; last: {outputs.last_failure}")
        self.tiers.free_retired()
        self.num_steps += 1
        self.observer.step(len(batch))
        self._publish(time.time())
        return True

    def _poll_host(self) -> None:
        """Take up finished adapter reads; fail the waiting requests of a version that could not be read."""
        failed = self.tiers.poll(self.observer)
        if failed:
            uids = {adapter.uid for adapter in failed}
            for request in [r for r in self.scheduler.waiting if r.adapter is not None and r.adapter.uid in uids]:
                self._fail_on_adapter(request)

    def has_work(self) -> bool:
        """Whether a request is queued, running, or waiting for its grammar's matcher."""
        return self.scheduler.has_work() or self.grammars.pending > 0

    def _poll_grammars(self) -> None:
        """Queue the constrained requests whose matcher is built; fail those whose grammar could not be built."""
        ready, failed = self.grammars.poll()
        for request in ready:
            self.scheduler.add(request)
        for request, reason in failed:
            self.outputs.fail(request, f"request {request.request_id}: {reason}", error_type="RequestInvalid")

    def _fail_on_adapter(self, request: Request) -> None:
        error = self.host.error(request.adapter)
        self.outputs.fail(request, f"adapter {request.adapter.name!r} cannot be served: {error}", error_type=type(error).__name__)

    def _publish_host_changes(self) -> None:
        """Republish the snapshot when a read finished or an eviction happened in a step that ran nothing."""
        if self.host.generation != self._published_generation:
            self._publish(self.snapshot.time)

    def _publish(self, step_time: float) -> None:
        scheduler, stats, host, host_stats = self.scheduler, self.slots.stats, self.host, self.host.stats

        def names(requests) -> tuple[str, ...]:
            return tuple(sorted({r.adapter.name for r in requests if r.adapter is not None}))

        self._published_generation = host.generation
        self.snapshot = EngineSnapshot(
            time=step_time,
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting) + self.grammars.pending,  # a matcher being built: waiting too
            running_adapters=names(scheduler.running),
            waiting_adapters=names(scheduler.waiting),
            kv_cache_usage=self.kv_cache.allocator.usage,
            slots_used=self.slots.used,
            slots_total=self.slots.num_slots,
            adapter_loads=stats.loads,
            adapter_evictions=stats.evictions,
            adapter_lookups=stats.lookups,
            adapter_hits=stats.hits,
            slot_uids=self.slots.resident_uids(),
            device_bytes=self.slots.bytes,
            host_adapters=host.ready_count,
            host_bytes=host.bytes,
            host_loading=host.loading(),
            host_loads=host_stats.loads,
            host_evictions=host_stats.evictions,
            host_hits=host_stats.hits,
            host_misses=host_stats.misses,
            host_failures=host_stats.failures,
            prefix_cache_queries=scheduler.prefix_cache.queries,
            prefix_cache_hits=scheduler.prefix_cache.hits,
        )

    def _finish(self, request: Request, reason: FinishReason) -> None:
        request.finish_reason = reason
        if request.first_scheduled_time is None:
            self._release_queue_place()
        self.scheduler.finish(request)
        self.grammars.free(request)
        if request.adapter is not None:
            self.host.release(request.adapter)
        self._live.pop(request.request_id, None)
        self.observer.finished(request, time.monotonic())

    # ----- inbox and background loop --------------------------------------------------------

    def _send(self, kind: str, payload) -> None:
        self._inbox.put((kind, payload))
        self._wake.set()

    def _drain_inbox(self) -> None:
        drained = False
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                break
            drained = True
            if kind == "add":
                request = payload.request
                self._live[request.request_id] = payload
                if request.params.grammar is None:
                    self.scheduler.add(request)
                else:
                    self.grammars.build(request)  # the scheduler gets it once its matcher is built
                if request.adapter is not None and self.host.acquire(request.adapter) is HostState.FAILED:
                    self._fail_on_adapter(request)
            elif kind == "pin":
                self.host.pin(payload)
            elif kind in ("abort", "abort_all"):
                for request_id in [payload] if kind == "abort" else list(self._live):
                    live = self._live.get(request_id)
                    if live is not None:
                        self._finish(live.request, FinishReason.ABORT)
                        live.sink(TokenEvent(request_id, None, "", finish_reason=FinishReason.ABORT))
            elif kind == "retire":
                self.tiers.retire(payload)
        if drained:
            self._publish(self.snapshot.time)

    def start(self) -> None:
        """Run the step loop on a background thread (needed by `submit`)."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="loraplex-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the background loop after the current step; unfinished requests are aborted."""
        if self._thread is not None:
            self._stopping = True
            self._wake.set()
            self._thread.join()
            self._thread = None
        self._drain_inbox()
        for request_id in list(self._live):
            self._send("abort", request_id)
        self._drain_inbox()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        try:
            while not self._stopping:
                self._wake.clear()
                if not self.step():  # idle, or every waiting request waits for its adapter's read
                    self._wake.wait(0.5)
        except BaseException as exc:  # the loop's state can no longer be trusted: stop serving, say why
            self.halt(exc)

    def halt(self, exc: BaseException) -> None:
        """The step loop broke on `exc`: take no more requests, and fail every one held, saying why."""
        log.exception("the engine loop stopped", exc_info=exc)
        self.failure = f"{type(exc).__name__}: {exc}"
        self._fail_everything(f"the engine stopped after an error: {self.failure}")

    def _fail_everything(self, message: str) -> None:
        """Answer every request the engine holds with `message`, whatever state the scheduler is in."""
        self._drain_inbox_quietly()
        for live in list(self._live.values()):
            try:
                self.outputs.fail(live.request, message, fatal=True)
            except Exception:  # the scheduler's books may be what broke: still tell the listener
                log.exception("could not release request %s", live.request.request_id)
                event = TokenEvent(live.request.request_id, None, "", finish_reason=FinishReason.ERROR, error=message, fatal=True)
                with contextlib.suppress(Exception):
                    live.sink(event)
        self._live.clear()

    def _drain_inbox_quietly(self) -> None:
        try:
            self._drain_inbox()
        except Exception:
            log.exception("could not drain the engine's inbox")
