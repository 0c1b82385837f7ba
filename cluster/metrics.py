"""Every metric m1serve exports, defined in one place (names follow vLLM's, prefix m1serve_).

Inside Ray Serve replicas the metrics go through `ray.serve.metrics`, which Ray's per-node metrics agent exports
on the metrics port (8080 on KubeRay, `--metrics-port` locally); Prometheus then sees them with Ray's `ray_`
prefix, e.g. `ray_m1serve_generation_tokens_total`. Outside Ray (tests, benchmarks) a prometheus_client registry
holds them under their own names. Label sets are small and bounded.
"""

from __future__ import annotations

from dataclasses import dataclass

# Buckets for LLM latencies: 10 ms .. minutes for request-level times, 1 ms .. 10 s for per-token ones, 0.5 ms ..
# 5 s for engine steps (fine around a decode step's few ms).
REQUEST_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80, 160, 320, 640]
TOKEN_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5, 10]
STEP_BUCKETS = [5e-4, 1e-3, 2e-3, 3e-3, 4e-3, 5e-3, 6e-3, 8e-3, 1e-2, 1.5e-2, 2e-2, 3e-2, 5e-2, 0.1, 0.25, 1, 5]
LAYER_BUCKETS = [1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1]


@dataclass(frozen=True)
class Family:
    name: str  # without the counter's _total suffix
    kind: str  # counter | gauge | histogram
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


FAMILIES = [
    Family("m1serve_time_to_first_token_seconds", "histogram", "Time from arrival to the first generated token.",
           buckets=tuple(REQUEST_BUCKETS)),
    Family("m1serve_inter_token_latency_seconds", "histogram", "Time between two generated tokens of a request.",
           buckets=tuple(TOKEN_BUCKETS)),
    Family("m1serve_e2e_request_latency_seconds", "histogram", "Time from arrival to the end of a request.",
           buckets=tuple(REQUEST_BUCKETS)),
    Family("m1serve_request_queue_time_seconds", "histogram", "Time a request waited before it was scheduled.",
           buckets=tuple(REQUEST_BUCKETS)),
    Family("m1serve_dispatch_latency_seconds", "histogram",
           "One MoE layer's round trip router -> expert shards -> router (rows out, expert compute, answers back).",
           buckets=tuple(LAYER_BUCKETS)),
    Family("m1serve_engine_step_seconds", "histogram",
           "One engine step, from scheduling to its outputs streamed, by kind: prefill (any prompt tokens), decode "
           "(read back in the same step) or ahead (a decode step read back after the next one was launched).",
           labels=("kind",), buckets=tuple(STEP_BUCKETS)),
    Family("m1serve_shard_compute_seconds", "histogram",
           "Expert compute of one MoE layer on one shard, in eager steps (on GPU: steps over 2048 tokens; decode "
           "steps and smaller ones replay CUDA graphs, which are not timed).",
           labels=("shard",), buckets=tuple(LAYER_BUCKETS)),
    Family("m1serve_prompt_tokens", "counter", "Prompt tokens processed."),
    Family("m1serve_generation_tokens", "counter", "Tokens generated."),
    Family("m1serve_requests", "counter", "Requests finished, by finish reason.", labels=("finish_reason",)),
    Family("m1serve_request_errors", "counter", "Requests answered with an error, by HTTP status / gRPC code.",
           labels=("code",)),
    Family("m1serve_expert_tokens", "counter", "Tokens routed to each expert, summed over the MoE layers.",
           labels=("shard", "expert")),
    Family("m1serve_expert_layer_tokens", "counter", "Tokens routed to each expert of each layer (opt-in).",
           labels=("layer", "expert")),
    Family("m1serve_dispatch_bytes", "counter", "Bytes the router sent to the expert shards."),
    Family("m1serve_num_requests_running", "gauge", "Sequences in the running batch."),
    Family("m1serve_num_requests_waiting", "gauge", "Requests waiting to be scheduled."),
    Family("m1serve_state_slots_used", "gauge", "Lightning state slots in use."),
    Family("m1serve_state_slots_total", "gauge", "Lightning state slots."),
    Family("m1serve_kv_cache_usage_ratio", "gauge", "Fraction of softmax-layer KV blocks in use."),
]
BY_NAME = {f.name: f for f in FAMILIES}


class _Ray:
    def __init__(self):
        from ray.serve import metrics as rm

        self.metrics = {}
        for f in FAMILIES:
            if f.kind == "histogram":
                self.metrics[f.name] = rm.Histogram(f.name, f.help, boundaries=list(f.buckets), tag_keys=f.labels)
            else:
                cls = rm.Counter if f.kind == "counter" else rm.Gauge
                self.metrics[f.name] = cls(f.name, f.help, tag_keys=f.labels)

    def record(self, name: str, value: float, labels: dict[str, str]) -> None:
        m, kind = self.metrics[name], BY_NAME[name].kind
        tags = labels or None
        if kind == "counter":
            m.inc(value, tags=tags)
        elif kind == "gauge":
            m.set(value, tags=tags)
        else:
            m.observe(value, tags=tags)


class _Prometheus:
    def __init__(self, registry=None):
        import prometheus_client as pc

        self.registry = registry or pc.CollectorRegistry()
        self.metrics = {}
        for f in FAMILIES:
            if f.kind == "histogram":
                m = pc.Histogram(f.name, f.help, f.labels, buckets=f.buckets, registry=self.registry)
            else:
                m = (pc.Counter if f.kind == "counter" else pc.Gauge)(f.name, f.help, f.labels, registry=self.registry)
            self.metrics[f.name] = m

    def record(self, name: str, value: float, labels: dict[str, str]) -> None:
        m, kind = self.metrics[name], BY_NAME[name].kind
        if labels:
            m = m.labels(**labels)
        if kind == "counter":
            m.inc(value)
        elif kind == "gauge":
            m.set(value)
        else:
            m.observe(value)


class _Forward:
    """Each record handed to put() as ("metric", name, value, labels): how the engine process's metrics reach the
    replica that exports them."""

    def __init__(self, put):
        self.put = put

    def record(self, name: str, value: float, labels: dict[str, str]) -> None:
        self.put(("metric", name, value, labels))


class Metrics:
    """What the engine, the shards and the APIs record. backend: "ray", "prometheus", "forward" (to forward(record),
    see _Forward) or None (off)."""

    def __init__(self, backend: str | None = None, per_layer_experts: bool = False, registry=None, forward=None):
        self._sink = {"ray": _Ray, "prometheus": lambda: _Prometheus(registry), "forward": lambda: _Forward(forward),
                      None: lambda: None}[backend]()
        self.per_layer_experts = per_layer_experts

    @property
    def enabled(self) -> bool:
        return self._sink is not None

    @property
    def registry(self):
        return getattr(self._sink, "registry", None)

    def record(self, name: str, value: float, **labels: str) -> None:
        if self._sink is None or value is None:
            return
        if not value and BY_NAME[name].kind == "counter":
            return  # nothing to add (and Ray's Counter.inc raises on 0)
        self._sink.record(name, float(value), labels)

    def request_error(self, code: int | str) -> None:
        self.record("m1serve_request_errors", 1, code=str(code))

    def expert_tokens(self, counts, holders: list[str]) -> None:
        """counts: [layers, experts] tokens routed in this period (a host tensor); holders: each expert's shard label."""
        totals = counts.sum(0).tolist()
        for e, n in enumerate(totals):
            if n:
                self.record("m1serve_expert_tokens", n, shard=holders[e], expert=str(e))
        if self.per_layer_experts:
            for layer, row in enumerate(counts.tolist()):
                for e, n in enumerate(row):
                    if n:
                        self.record("m1serve_expert_layer_tokens", n, layer=str(layer), expert=str(e))
