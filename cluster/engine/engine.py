"""The engine: requests in, tokens out. A background thread runs steps; each step schedules a continuous batch,
runs the router model (experts local or over the shard group), samples, detokenizes and streams results.

Thread model: submit()/abort() may be called from any thread; they only validate and enqueue. Everything else,
including the collectives, happens on the engine thread.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from kernels.triton_utils import log_kernel_builds
from model_shards.batch import ForwardBatch, ModelCache, SeqChunk
from model_shards.config import ModelConfig
from model_shards.expert_part import shard_expert_range
from model_shards.loading import default_dtype, load_expert_part, load_router_part
from model_shards.tokenizer import IncrementalDetokenizer, Tokenizer, TokenizerError

from ..dispatch import LAYER_GRAPH_MAX_TOKENS, DispatchError
from ..metrics import Metrics
from ..shard_group import LocalExperts, ProcessShardGroup, RendezvousShardGroup, load_router_share
from .cache_manager import CacheManager
from .decode_graphs import DecodeGraphs, PendingTokens
from .sampling import InvalidRequest, SamplingParams, device_tensor, sample
from .scheduler import ScheduledChunk, Scheduler
from .sequence import RequestOutput, Sequence, Sink, Status, merge_outputs

log = logging.getLogger("m1serve.engine")

# default tokens per step: on GPU, big steps read the expert weights once per many tokens (64 x 1K prompts on 4x
# H200 served 35% faster at 16384 than at 4096; 32768 and up were slower, see bench/results)
STEP_TOKENS = {"cpu": 256, "cuda": 16384}
SLOW_STEP_S = 1.0  # a step slower than this is logged (a Triton compile for a shape the warm-up missed, a slow shard)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def expert_holder_labels(num_experts: int, shards: int, router_experts: bool) -> list[str]:
    """Per expert, the `shard` label of its metrics: the shard's index, or "router" for the router's own share (all
    experts in the router process: "0")."""
    if not shards:
        return ["0"] * num_experts
    labels = ["router"] * num_experts  # what no shard holds: the router's share
    for s in range(shards):
        first, last = shard_expert_range(num_experts, shards, s, router_experts)
        labels[first:last] = [str(s)] * (last - first)
    return labels


def warmup_step_tokens(max_num_batched_tokens: int, layer_graphs: bool = False) -> list[int]:
    """The warm-up's step sizes before its full step, largest first: half a full step's tokens, a quarter, ... down to
    16 (the kernels' tile configs change at powers of two of the rows per expert, kernels.experts, so these build
    each). layer_graphs: also every power of two below the full step up to LAYER_GRAPH_MAX_TOKENS (the sizes of the
    MoE layer graphs that steps that small replay: each is captured here)."""
    sizes, n = set(), max_num_batched_tokens
    while n > 16:
        n //= 2
        sizes.add(n)
    p = 1
    while layer_graphs and p < max_num_batched_tokens and p <= LAYER_GRAPH_MAX_TOKENS:
        sizes.add(p)
        p *= 2
    return sorted(sizes, reverse=True)


class QueueFull(RuntimeError):
    """Too many requests are waiting (HTTP 429 / gRPC RESOURCE_EXHAUSTED)."""


class EngineUnavailable(RuntimeError):
    """The engine cannot take requests now (its shard group is down or it is shutting down): HTTP 503."""


@dataclass
class EngineConfig:
    model: str
    expert_shards: int = 0  # 0: experts in the router process
    router_experts: bool = False  # with shards: the router holds a share of the experts too (1/(shards + 1) of them)
    device: str = "cpu"
    dtype: str | None = None  # default: float32 on CPU, bfloat16 on GPU
    expert_dtype: str | None = None  # "int8": weight-only int8 experts
    max_num_seqs: int = 16  # running sequences (= lightning state slots)
    max_num_batched_tokens: int | None = None  # tokens per step, bounds a prefill chunk; None: STEP_TOKENS[device]
    max_model_len: int = 4096  # prompt + generated tokens
    max_queue_len: int = 256
    max_tokens_per_request: int | None = None  # cap on max_tokens (None: only the context limit)
    request_timeout_s: float | None = None  # a request still unfinished after this fails with "timeout"
    kv_block_size: int = 16
    cache_memory_gb: float | None = None  # state slots + KV blocks; default: 0.5 GB on CPU, 85% of free GPU memory
    collective_timeout_s: float = 30.0
    profile: bool = False  # time each part of a step (syncs the GPU: for benchmarks)
    warmup: bool | None = None  # throwaway requests before serving (None: on GPU only; see Engine.warmup)
    # decode steps padded to fixed sizes and replayed from CUDA graphs (see decode_graphs.py), and the MoE layers of
    # small eager steps too, with expert shards (see dispatch.py); None: on GPU only. On CPU, True runs the same
    # padded paths eagerly (what the CPU tests check).
    cuda_graphs: bool | None = None


class RequestStream:
    """What submit() returns: iterate it for RequestOutputs (the last one has finished=True)."""

    def __init__(self, engine: "Engine", request_id: str):
        self.engine, self.request_id = engine, request_id
        self.queue: queue.Queue[RequestOutput] = queue.Queue()
        self.seen: list[RequestOutput] = []  # outputs already taken from the queue

    def __iter__(self):
        while not (self.seen and self.seen[-1].finished):
            out = self.queue.get()
            self.seen.append(out)
            yield out

    def result(self) -> RequestOutput:
        """Waits for the end and merges every output (including those already iterated) into one."""
        for _ in self:
            pass
        return merge_outputs(self.seen)

    def abort(self) -> None:
        self.engine.abort(self.request_id)


class StepProfile:
    """Wall time per part of the step, summed (seconds)."""

    def __init__(self, device: torch.device, enabled: bool):
        self.device, self.enabled = device, enabled
        self.seconds: dict[str, float] = defaultdict(float)
        self.steps = 0
        self.tokens = 0

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, name: str):
        if not self.enabled:
            yield
            return
        self._sync()
        t0 = time.perf_counter()
        yield
        self._sync()
        self.seconds[name] += time.perf_counter() - t0


class Engine:
    def __init__(self, config: EngineConfig, experts=None, metrics: Metrics | None = None, start: bool = True,
                 rendezvous=None):
        """experts: where the experts live (LocalExperts or a shard group); by default local experts, or, when
        config.expert_shards > 0, shard processes of this engine, or shards started elsewhere that
        rendezvous() gathers (see RendezvousShardGroup)."""
        self.device = torch.device(config.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # the current device of this thread (and the engine thread's, below)
            log_kernel_builds(log)
        if config.max_num_batched_tokens is None:
            config = replace(config, max_num_batched_tokens=STEP_TOKENS[self.device.type])
        self.config = config
        self.dtype = DTYPES[config.dtype] if config.dtype else default_dtype(self.device)
        self.model_config = cfg = ModelConfig.from_file(config.model)
        try:
            self.tokenizer: Tokenizer | None = Tokenizer.from_dir(config.model)
        except TokenizerError as e:
            log.warning("no tokenizer (%s): prompts must be token ids", e)
            self.tokenizer = None
        if config.router_experts and not config.expert_shards:
            raise ValueError("router_experts needs expert shards (with none, the router holds every expert anyway)")
        self.model = load_router_part(config.model, self.dtype, self.device)
        if experts is not None:
            self.experts = experts
        elif config.expert_shards:
            local = (load_router_share(config.model, config.expert_shards, self.dtype, self.device,
                                       config.expert_dtype) if config.router_experts else None)
            if rendezvous is not None:
                self.experts = RendezvousShardGroup(rendezvous, config.expert_shards, cfg, self.device, self.dtype,
                                                    config.collective_timeout_s, sync_timing=config.profile,
                                                    local=local, layer_graphs=config.cuda_graphs)
            else:
                self.experts = ProcessShardGroup(config.model, config.expert_shards, self.device, self.dtype,
                                                 config.collective_timeout_s, sync_timing=config.profile,
                                                 expert_dtype=config.expert_dtype, local=local,
                                                 layer_graphs=config.cuda_graphs)
        else:
            self.experts = LocalExperts(load_expert_part(config.model, dtype=self.dtype, device=self.device,
                                                         expert_dtype=config.expert_dtype))
        num_slots, num_blocks = self._cache_sizes(cfg)
        self.cache = ModelCache(cfg, num_slots, num_blocks, config.kv_block_size, self.dtype, self.device)
        self.cache_manager = CacheManager(num_slots, num_blocks, config.kv_block_size)
        self.scheduler = Scheduler(self.cache_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.profile = StepProfile(self.device, config.profile)
        self.metrics = metrics or Metrics(None)
        self.graphs = None
        if config.cuda_graphs or (config.cuda_graphs is None and self.device.type == "cuda"):
            self.graphs = DecodeGraphs(self.model, self.cache, self.experts, self._moe, config.max_num_seqs,
                                       config.max_model_len, self.device, config.collective_timeout_s)
        self._expert_counts = torch.zeros(cfg.num_hidden_layers, cfg.num_local_experts, dtype=torch.long,
                                          device=self.device)
        self._expert_holders = expert_holder_labels(cfg.num_local_experts, config.expert_shards,
                                                    config.router_experts)
        self._expert_counts_time = 0.0  # when the expert counts were last read back (a device sync) and exported
        # a graphed decode step whose greedy tokens are not read back yet: (its plan, its tokens)
        self._pending: tuple[list[ScheduledChunk], PendingTokens] | None = None
        self._bytes_reported = 0
        self._gauges_time = 0.0
        self._last_collective = time.monotonic()
        self.stop_ids = set(self.tokenizer.stop_token_ids) if self.tokenizer else set()
        self._inbox: queue.Queue = queue.Queue()
        # requests put in the inbox and not yet taken by the engine thread: they count as queued (an abort or any
        # other command in the inbox does not)
        self._arriving = 0
        self._arriving_lock = threading.Lock()
        self._seqs: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self._stopping = False
        self.error: str | None = None  # why the shard group is down, while it is (details go to the log)
        self.counters = defaultdict(int)
        self._thread = threading.Thread(target=self._loop, name="m1serve-engine", daemon=True)
        self.warmup_s: float | None = None  # how long the warm-up took (None: not run, or skipped)
        if start:
            self._thread.start()
            if config.warmup or (config.warmup is None and self.device.type == "cuda"):
                self.warmup()

    def warmup(self) -> None:
        """Runs throwaway requests through the whole path before the engine serves: steps of each size
        warmup_step_tokens gives (the expert kernels' tile configs, the MoE layer graphs' sizes), then a full
        step with a batch of short prompts joining its decode (mixed and batched decode steps), then, with CUDA graphs,
        a decode step at each graph size (each is captured here, not during a user's step). A step holds several
        prompts where max_model_len is shorter than the step.
        On GPU each Triton kernel config a real step needs compiles here instead of inside the first users' time to
        first token. Leaves no trace: metrics are off meanwhile and the counters start from zero afterwards. A
        failure only skips it."""
        metrics, self.metrics = self.metrics, Metrics(None)
        t0 = time.perf_counter()
        try:
            c, vocab = self.config, self.model_config.vocab_size
            gen = torch.Generator().manual_seed(0)
            params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)

            def run(*prompt_lens: int) -> None:
                prompts = [torch.randint(vocab, (n,), generator=gen).tolist() for n in prompt_lens]
                for stream in self.submit_together(prompts, params):
                    out = stream.result()
                    if out.error:
                        raise RuntimeError(out.error)

            longest = max(1, min(c.max_num_batched_tokens, c.max_model_len - 2))  # one prompt's most tokens

            def filling(total: int) -> list[int]:
                """Prompt lengths that fill one step of `total` tokens (several when one prompt cannot)."""
                k = min(-(-total // longest), c.max_num_seqs)
                return [total // k] * k

            dispatcher = getattr(self.experts, "dispatcher", None)
            for n in warmup_step_tokens(c.max_num_batched_tokens, dispatcher is not None and dispatcher.layer_graphs):
                run(*filling(n))
            # the full step's prompts take the first step alone; the short ones join their decode (a mixed step),
            # then all decode together
            full = filling(c.max_num_batched_tokens)
            run(*full, *[8] * max(0, min(c.max_num_seqs, 8) - len(full)))
            if self.graphs is not None:  # a one-token prefill of `size` sequences, then their decode at that size
                for size in self.graphs.sizes:
                    run(*[1] * size)
            self.warmup_s = time.perf_counter() - t0
            log.info("warm-up done in %.1f s", self.warmup_s)
        except Exception as e:  # noqa: BLE001 - an optimisation: serving goes on (a broken group is handled as usual)
            log.warning("warm-up skipped: %s: %s", type(e).__name__, e)
        finally:
            dispatcher = getattr(self.experts, "dispatcher", None)
            if dispatcher is not None:
                dispatcher.times.samples.clear()
                self._bytes_reported = dispatcher.times.bytes_sent
            self.counters.clear()
            self._expert_counts.zero_()
            self.profile = StepProfile(self.device, self.config.profile)
            self.metrics = metrics

    # ---- sizing ----------------------------------------------------------------------------------------
    def _cache_sizes(self, cfg: ModelConfig) -> tuple[int, int]:
        c = self.config
        if c.cache_memory_gb is not None:
            budget = int(c.cache_memory_gb * 2**30)
        elif self.device.type == "cuda":
            budget = int(torch.cuda.mem_get_info(self.device)[0] * 0.85)
        else:
            budget = 2**29
        slot_bytes = ModelCache.bytes_per_slot(cfg) * (c.max_num_seqs + 1)  # + the scratch slot and block
        block_bytes = ModelCache.bytes_per_kv_block(cfg, c.kv_block_size, self.dtype)
        budget -= block_bytes
        if slot_bytes + block_bytes > budget:
            raise ValueError(f"cache_memory_gb: {budget / 2**30:.3f} GB cannot hold {c.max_num_seqs} lightning state "
                             f"slots ({slot_bytes / 2**30:.3f} GB); lower max_num_seqs or raise the budget")
        wanted = c.max_num_seqs * -(-c.max_model_len // c.kv_block_size)
        blocks = min(wanted, (budget - slot_bytes) // block_bytes) if block_bytes else wanted
        return c.max_num_seqs, max(int(blocks), 1)

    # ---- public API (any thread) -----------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread.is_alive() and not self._stopping

    def submit(self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None,
               sink: Sink | None = None) -> RequestStream:
        seq, stream = self._sequence(prompt, params, request_id, sink)
        self._enqueue([seq])
        return stream

    def submit_together(self, prompts: list, params: SamplingParams) -> list[RequestStream]:
        """Requests that reach the scheduler at once, so that the next step sees all of them (the warm-up's
        batches; separate submits race with the engine thread's steps)."""
        made = [self._sequence(p, params, None, None) for p in prompts]
        self._enqueue([seq for seq, _ in made])
        return [stream for _, stream in made]

    def _enqueue(self, seqs: list[Sequence]) -> None:
        with self._arriving_lock:
            self._arriving += len(seqs)
        self._inbox.put(("add", seqs))

    def _taken(self, seqs: list[Sequence]) -> None:
        """The engine thread took these requests out of the inbox."""
        with self._arriving_lock:
            self._arriving -= len(seqs)

    def _sequence(self, prompt, params: SamplingParams | None, request_id: str | None,
                  sink: Sink | None) -> tuple[Sequence, RequestStream]:
        """The checked request as a Sequence, and its stream (raises what submit documents)."""
        params = (params or SamplingParams()).validate()
        prompt_ids = self._prompt_ids(prompt)
        self._check_length(len(prompt_ids), params)
        if self._stopping:
            raise EngineUnavailable("the engine is shutting down")
        if self.error is not None:
            raise EngineUnavailable(f"expert shards are unavailable ({self.error}); the group is being re-formed")
        queued = len(self.scheduler.waiting) + self._arriving
        if queued >= self.config.max_queue_len:
            raise QueueFull(f"{queued} requests are queued (max_queue_len={self.config.max_queue_len})")
        request_id = request_id or f"req-{next(self._ids)}"
        stream = RequestStream(self, request_id)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.stop_ids)
        detok = IncrementalDetokenizer(self.tokenizer, prompt_ids) if self.tokenizer else None
        gen = None
        if params.seed is not None and not params.greedy:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
        guide = None
        if params.guided is not None:  # compiled here, so a schema llguidance cannot enforce is the client's 400
            from .guided import create_guide

            guide = create_guide(self.tokenizer, self.model_config.vocab_size, params.guided)
        seq = Sequence(request_id, prompt_ids, params, sink or stream.queue.put, stop_ids, detok, generator=gen,
                       guide=guide)
        return seq, stream

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None) -> RequestOutput:
        return self.submit(prompt, params).result()

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def stats(self) -> dict:
        cm = self.cache_manager
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "slots_used": cm.slots.num_used, "slots_total": cm.slots.total,
                "kv_blocks_used": cm.blocks.num_used, "kv_blocks_total": cm.blocks.total,
                "healthy": self.healthy, **self.counters}

    def shutdown(self, drain_timeout_s: float = 0.0) -> None:
        """Stops taking requests, lets those in flight finish for up to drain_timeout_s, aborts the rest."""
        self._stopping = True
        deadline = time.monotonic() + drain_timeout_s
        while (self._thread.is_alive() and (self.scheduler.has_work() or not self._inbox.empty())
               and time.monotonic() < deadline):
            time.sleep(0.05)
        self._inbox.put(("stop", None))
        if self._thread.is_alive():
            self._thread.join(timeout=60)
        if self.graphs is not None:
            self.graphs.clear()
        self.experts.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequest("prompt: this model has no tokenizer; send token ids", "prompt")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < self.model_config.vocab_size]
            if bad:
                raise InvalidRequest(f"prompt: token id {bad[0]} is outside the vocabulary "
                                     f"(0..{self.model_config.vocab_size - 1})", "prompt")
        else:
            raise InvalidRequest("prompt: must be a string or a list of token ids", "prompt")
        if not ids:
            raise InvalidRequest("prompt: must not be empty", "prompt")
        return ids

    def _check_length(self, num_prompt: int, params: SamplingParams) -> None:
        cap = self.config.max_tokens_per_request
        if cap is not None and params.max_tokens > cap:
            raise InvalidRequest(f"max_tokens: {params.max_tokens} is over this server's limit of {cap} tokens per "
                                 f"request", "max_tokens")
        limit = self.config.max_model_len
        if num_prompt + params.max_tokens > limit:
            param = "max_tokens" if num_prompt < limit else "prompt"
            raise InvalidRequest(f"{param}: this model's maximum context length is {limit} tokens, but the prompt "
                                 f"has {num_prompt} tokens and max_tokens is {params.max_tokens}", param)
        if not self.cache_manager.can_ever_fit(num_prompt + params.max_tokens):
            raise InvalidRequest(f"prompt: {num_prompt + params.max_tokens} tokens can never fit the KV cache "
                                 f"({self.cache_manager.blocks.total * self.config.kv_block_size} tokens)", "prompt")

    # ---- engine thread ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        while True:
            try:
                block = not self.scheduler.has_work()
                cmd = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                cmd = None
            if cmd is not None:
                if cmd[0] == "stop":
                    self._fail_all("the engine shut down", "abort")
                    if self.metrics.enabled:
                        self._record_expert_counts()
                    return
                self._apply(cmd)
                continue  # drain the inbox before the next step
            try:
                self._tick()
            except Exception as e:  # never leave requests hanging (or the thread dead) on an unexpected bug
                log.exception("engine step failed")
                self._fail_running(f"internal error: {type(e).__name__}: {e}")

    def _tick(self) -> None:
        """One turn of the loop once the inbox is drained: timeouts, gauges, recovery or heartbeat, a step."""
        if self.config.request_timeout_s is not None:
            self._expire(time.monotonic() - self.config.request_timeout_s)
        if self.metrics.enabled and time.monotonic() - self._gauges_time > 0.5:
            self._record_gauges()  # Ray's OpenTelemetry export drops gauges not set recently
        if self.error is not None:
            self._recover()
        elif not self.scheduler.has_work():
            self._heartbeat_if_idle()
            if self.metrics.enabled:
                self._record_expert_counts()
        else:
            self.step()

    def _heartbeat_if_idle(self) -> None:
        if time.monotonic() - self._last_collective < self.config.collective_timeout_s / 4:
            return
        self._last_collective = time.monotonic()
        try:
            self.experts.heartbeat()
        except DispatchError as e:
            log.error("expert-shard group failed while idle: %s", e)
            self.error = "an expert shard failed or timed out"

    def _expire(self, arrived_before: float) -> None:
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            if seq.arrival_time < arrived_before:
                self._finish(seq, "timeout", f"the request did not finish within {self.config.request_timeout_s}s")

    def _apply(self, cmd) -> None:
        kind, arg = cmd
        if kind == "add":
            self._taken(arg)
            for seq in arg:
                if self.error is not None:
                    self._finish(seq, "error", f"expert shards are unavailable ({self.error})")
                else:
                    self._seqs[seq.request_id] = seq
                    self.scheduler.add(seq)
        elif kind == "abort":
            seq = self._seqs.get(arg)
            if seq is not None:
                self._finish(seq, "abort")

    @torch.inference_mode()
    def step(self) -> None:
        self._last_collective = time.monotonic()
        if self._pending is not None:
            self._step_ahead()
            return
        plan, admitted = self.scheduler.schedule()
        if not plan:
            return
        now = time.monotonic()
        for seq in admitted:
            self.cache.reset_slot(seq.slot)
            seq.scheduled_time = now
            self.metrics.record("m1serve_request_queue_time_seconds", now - seq.arrival_time)
        chunks = [c.chunk for c in plan]
        sampling = [c for c in plan if c.samples]
        num_tokens = sum(len(c.token_ids) for c in chunks)
        graphed = self.graphs is not None and self.graphs.fits(chunks)
        launched_ahead = False
        try:
            if (graphed and len(plan) == len(self.scheduler.running)
                    and all(self._sampled_on_device(c.seq, len(c.seq.output_ids)) for c in plan)):
                self._pending = (plan, PendingTokens(self.graphs.launch(chunks), [c.seq.params for c in plan],
                                                     self.graphs))
                sampling, launched_ahead = [], True  # read back by the next step, after it has launched its own
            elif graphed:
                logits = self.graphs.run(chunks)
            else:
                batch = ForwardBatch.build(chunks, self.config.kv_block_size, self.device)
                batch.last_token_rows = batch.last_token_rows[[i for i, c in enumerate(plan) if c.samples]]
                self.experts.begin_step(num_tokens)
                logits = self.model(batch, self.cache, self._moe, timer=self.profile)
                self.experts.finish_step()
        except DispatchError as e:
            self._group_failed(e)
            return
        for c in plan:
            c.seq.num_cached += len(c.chunk.token_ids)
        self.profile.steps += 1
        self.profile.tokens += num_tokens
        if sampling:
            with self.profile("sampling"):
                self._sample(sampling, logits)  # reads the tokens back: the step's GPU work is done after this
        seconds = time.monotonic() - now
        if seconds > SLOW_STEP_S:
            log.warning("a step of %d tokens (%d sequences) took %.1f s: a kernel compiling for a new shape, or a slow "
                        "shard", num_tokens, len(plan), seconds)
        if self.metrics.enabled:
            if not launched_ahead:
                decode = all(len(c.token_ids) == 1 and c.start > 0 for c in chunks)
                self.metrics.record("m1serve_engine_step_seconds", seconds, kind="decode" if decode else "prefill")
            self._record_step()

    # ---- decode steps launched one ahead ---------------------------------------------------------------------
    # While every running sequence's next token can be drawn on the device (greedy, or sampled without a seed), step
    # k+1 is launched (its inputs: step k's tokens, still on the device) before step k's tokens are read back and
    # processed, so that host work overlaps the GPU. A sequence that step k ends (EOS, a stop string) has one wasted
    # row in step k+1: it wrote only into its own state slot and KV blocks, before any later step can reuse them.
    def _sampled_on_device(self, seq: Sequence, num_outputs: int) -> bool:
        """The sequence's token after num_outputs outputs can be drawn on the device with the batch's
        (sampling.sample_on_device) and nothing else is read from the logits: no seed (its own generator), no
        logprobs, no grammar, no min_tokens ban."""
        p = seq.params
        return (seq.generator is None and p.logprobs is None and seq.guide is None and num_outputs >= p.min_tokens
                and not self.config.profile)

    def _continues(self, seq: Sequence) -> bool:
        """After the pending step's token, the sequence needs another one (unless that token ends it)."""
        n = len(seq.output_ids)
        return (seq.status == Status.RUNNING and n + 2 <= seq.params.max_tokens
                and seq.num_tokens + 1 < self.config.max_model_len and self._sampled_on_device(seq, n + 1))

    def _step_ahead(self) -> None:
        """Launches the next decode step from the pending one's device tokens (unless a waiting request can be
        admitted: it gets a normal step next), then reads the pending tokens back and processes them."""
        started = time.monotonic()
        plan, pending = self._pending
        self._pending = None
        ahead = [] if self.scheduler.can_admit() else [i for i, c in enumerate(plan) if self._continues(c.seq)]
        try:
            if ahead:
                seqs = [plan[i].seq for i in ahead]  # each one's next input: the pending token, at num_tokens
                nxt = [ScheduledChunk(s, SeqChunk([0], s.num_tokens, s.slot, s.blocks), True) for s in seqs]
                tokens = (pending.device if len(ahead) == len(plan)
                          else pending.device[device_tensor(ahead, pending.device.device)])
                logits = self.graphs.launch([c.chunk for c in nxt], tokens)
                self._pending = (nxt, PendingTokens(logits, [c.seq.params for c in nxt], self.graphs))
                for c in nxt:
                    c.seq.num_cached += 1
                self.counters["decode_steps_launched_ahead"] += 1
                self.profile.steps += 1
                self.profile.tokens += len(nxt)
            tokens = pending.result()
        except DispatchError as e:
            self._group_failed(e)
            return
        live = [(c.seq, t) for c, t in zip(plan, tokens) if c.seq.status == Status.RUNNING]  # not aborted meanwhile
        self.counters["generation_tokens"] += len(live)
        self.metrics.record("m1serve_generation_tokens", len(live))
        for seq, token in live:
            self._append(seq, token, None)
        if self.metrics.enabled:
            self.metrics.record("m1serve_engine_step_seconds", time.monotonic() - started, kind="ahead")
            self._record_step()

    def _moe(self, layer: int, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # tokens per expert, without a host sync (bincount reads its max back): also inside a CUDA graph, where the
        # padding rows count 0
        real = self.graphs.real_rows if self.graphs is not None else None
        if real is not None or self.metrics.enabled:
            ones = torch.ones_like(ids) if real is None else real[:, None].expand_as(ids)
            self._expert_counts[layer].index_add_(0, ids.flatten(), ones.flatten())
        return self.experts.moe(layer, h, ids, weights)

    def _record_gauges(self) -> None:
        self._gauges_time = time.monotonic()
        m, cm = self.metrics, self.cache_manager
        m.record("m1serve_num_requests_running", len(self.scheduler.running))
        m.record("m1serve_num_requests_waiting", len(self.scheduler.waiting))
        m.record("m1serve_state_slots_used", cm.slots.num_used)
        m.record("m1serve_state_slots_total", cm.slots.total)
        m.record("m1serve_kv_cache_usage_ratio", cm.blocks.num_used / cm.blocks.total)

    def _record_step(self) -> None:
        m = self.metrics
        self._record_gauges()
        if time.monotonic() - self._expert_counts_time > 0.5:
            self._record_expert_counts()
        dispatcher = getattr(self.experts, "dispatcher", None)
        if dispatcher is not None:
            times = dispatcher.times
            for seconds in times.samples:
                m.record("m1serve_dispatch_latency_seconds", seconds)
            times.samples.clear()
            m.record("m1serve_dispatch_bytes", times.bytes_sent - self._bytes_reported)
            self._bytes_reported = times.bytes_sent

    def _record_expert_counts(self) -> None:
        """Exports the tokens per expert counted on the device since the last call: reading them back waits for
        the GPU, so this runs every 0.5 s and when the engine goes idle, not every step."""
        self._expert_counts_time = time.monotonic()
        counts = self._expert_counts.to("cpu", copy=True)  # (on CPU, .cpu() would be the tensor zeroed below)
        self._expert_counts.zero_()
        if counts.any():
            self.metrics.expert_tokens(counts, self._expert_holders)

    def _sample(self, chunks: list[ScheduledChunk], logits: torch.Tensor) -> None:
        seqs = [c.seq for c in chunks]
        banned = [sorted(s.stop_ids) if len(s.output_ids) < s.params.min_tokens and s.guide is None else []
                  for s in seqs]
        guided = [i for i, s in enumerate(seqs) if s.guide is not None]
        if guided:  # grammar masks of all guided rows, computed together, applied before sampling
            from .guided import apply_guides

            logits = apply_guides(logits.float(), guided, [seqs[i].guide for i in guided])
        tokens, logprobs = sample(logits, [s.params for s in seqs], [s.generator for s in seqs], banned)
        self.counters["generation_tokens"] += len(seqs)
        self.metrics.record("m1serve_generation_tokens", len(seqs))  # once per step: Ray's metric calls cost ~5 us
        for seq, token, lp in zip(seqs, tokens, logprobs):
            self._append(seq, token, lp)

    def _append(self, seq: Sequence, token: int, lp) -> None:
        now = time.monotonic()
        seq.output_ids.append(token)
        if seq.first_token_time is None:
            seq.first_token_time = now
            self.counters["prompt_tokens"] += len(seq.prompt_ids)
            self.metrics.record("m1serve_prompt_tokens", len(seq.prompt_ids))
            self.metrics.record("m1serve_time_to_first_token_seconds", now - seq.arrival_time)
        else:
            self.metrics.record("m1serve_inter_token_latency_seconds", now - seq.last_token_time)
        seq.last_token_time = now
        reason = None
        grammar_ended = seq.guide is not None and seq.guide.advance(token)  # EOS after a complete guided output
        if token in seq.stop_ids:
            reason = "stop"
        elif seq.detokenizer is not None:
            seq.text += seq.detokenizer.add(token)
            if seq.params.stop:
                reason = self._cut_at_stop_string(seq)
        if reason is None and grammar_ended:  # also with ignore_eos: the grammar's end is the request's end
            reason = "stop"
            if seq.detokenizer is not None:
                seq.text += seq.detokenizer.flush()
        if reason is None and (len(seq.output_ids) >= seq.params.max_tokens
                               or seq.num_tokens >= self.config.max_model_len):
            reason = "length"
        if reason is not None and reason != "stop" and seq.detokenizer is not None:
            seq.text += seq.detokenizer.flush()
        self._emit(seq, [token], [lp] if lp is not None else [], reason)
        if reason is not None:
            self.scheduler.finish(seq)
            self._retire(seq)

    @staticmethod
    def _cut_at_stop_string(seq: Sequence) -> str | None:
        longest = max(len(s) for s in seq.params.stop)
        search_from = max(0, seq.text_sent - longest)
        hits = [i for i in (seq.text.find(s, search_from) for s in seq.params.stop) if i >= 0]
        if hits:
            seq.text = seq.text[: min(hits)]
            return "stop"
        return None

    def _emit(self, seq: Sequence, token_ids: list[int], logprobs, reason: str | None, error: str | None = None):
        finished = reason is not None
        end = len(seq.text)
        if not finished and seq.params.stop:  # hold back what could still become a stop string
            end = max(seq.text_sent, end - (max(len(s) for s in seq.params.stop) - 1))
        out = RequestOutput(seq.request_id, token_ids, seq.text[seq.text_sent:end], finished, reason, error, logprobs,
                            None if seq.sent_prompt else seq.prompt_ids, len(seq.prompt_ids), len(seq.output_ids))
        seq.text_sent, seq.sent_prompt = end, True
        if finished:
            self.counters[f"requests_{reason}"] += 1
            self.metrics.record("m1serve_requests", 1, finish_reason=reason)
            self.metrics.record("m1serve_e2e_request_latency_seconds", time.monotonic() - seq.arrival_time)
        try:
            seq.sink(out)
        except Exception:  # a client that went away must not take the engine down
            log.exception("output sink failed for %s", seq.request_id)
            if not finished:
                self.abort(seq.request_id)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        if seq.status == Status.FINISHED:
            return
        self.scheduler.finish(seq)
        self._emit(seq, [], [], reason, error)
        self._retire(seq)

    def _retire(self, seq: Sequence) -> None:
        self._seqs.pop(seq.request_id, None)
        if self.metrics.enabled:
            self._record_gauges()  # a freed slot shows at once, not at the next step

    def _group_failed(self, e: DispatchError) -> None:
        log.error("expert-shard group failed: %s", e)
        self._expert_counts.zero_()  # this step's routing never completed
        self.error = "an expert shard failed or timed out"
        self._fail_running("an expert shard failed or timed out during this request")

    def _fail_running(self, message: str) -> None:
        self._pending = None
        for seq in list(self.scheduler.running):
            self._finish(seq, "error", message)

    def _fail_all(self, message: str, reason: str = "error") -> None:
        self._pending = None
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            self._finish(seq, reason, message if reason == "error" else None)
        while True:
            try:
                kind, arg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._taken(arg)
                for seq in arg:
                    self._finish(seq, reason, message if reason == "error" else None)

    def _recover(self) -> None:
        """Re-forms the shard group; waiting requests stay queued and run once it is back."""
        try:
            if self.graphs is not None:
                self.graphs.clear()  # they hold the old group's collectives
            self.experts.restart()
        except Exception as e:
            log.error("re-forming the expert-shard group failed: %s", e)
            self._fail_all("expert shards are unavailable (re-forming the group failed)")
            time.sleep(1.0)
            return
        log.info("expert-shard group re-formed")
        self.error = None
        self.counters["group_restarts"] += 1
