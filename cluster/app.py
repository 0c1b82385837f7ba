"""The Serve application builder: `cluster.app:build_app` for `serve run`, KubeRay's serveConfigV2 and the CLI.

    serve run cluster.app:build_app model=/models/MiniMax-M1 expert_shards=8 gpus_per_shard=1 router_gpus=1
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve import Application

from model_shards.config import ModelConfig

from .deployments import NOSET_CUDA_VISIBLE_DEVICES, ExpertShard, Router

ROUTER_NAME = "Router"
ENGINE_FIELDS = ("dtype", "expert_dtype", "max_num_seqs", "max_num_batched_tokens", "max_model_len", "max_queue_len",
                 "max_tokens_per_request", "request_timeout_s", "cache_memory_gb", "collective_timeout_s", "warmup",
                 "cuda_graphs", "router_experts")
APP_NAME = "m1serve"


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="checkpoint folder; default: the embedded tiny demo checkpoint")
    model_name: str | None = Field(None, description="name served in /v1/models; default: the folder's name")
    expert_shards: int = Field(2, ge=0, description="expert-shard deployments; must divide the expert count")
    router_experts: bool = Field(False, description="the router holds a share of the experts too: shards + 1 "
                                                    "equal shares (e.g. 4 GPUs = router + 3 shards, 8 experts each)")
    router_gpus: float = Field(0, ge=0)
    gpus_per_shard: float = Field(0, ge=0)
    router_cpus: float = Field(0, ge=0)
    cpus_per_shard: float = Field(0, ge=0)
    shard_resources: dict[str, float] = Field(default_factory=dict,
                                              description="custom Ray resources each shard replica needs "
                                                          "(to place shards on chosen nodes)")
    dtype: str | None = Field(None, pattern="^(float32|bfloat16|float16)$")
    expert_dtype: str | None = Field(None, pattern="^int8$", description="int8: weight-only int8 experts (halves "
                                                                          "their memory; MiniMax-M1 on 80 GB GPUs)")
    max_num_seqs: int = Field(16, ge=1)
    max_num_batched_tokens: int | None = Field(None, ge=1, description="default: 256 on CPU, 16384 on GPU")
    max_model_len: int = Field(4096, ge=2)
    max_queue_len: int = Field(256, ge=1)
    max_tokens_per_request: int | None = Field(None, ge=1)
    request_timeout_s: float | None = Field(600.0, gt=0, description="unfinished requests fail after this")
    cache_memory_gb: float | None = Field(None, gt=0)
    collective_timeout_s: float = Field(30.0, gt=0)
    warmup: bool | None = Field(None, description="throwaway requests before serving, so the first users do not wait "
                                                   "for kernel compilation; default: on GPU only")
    cuda_graphs: bool | None = Field(None, description="decode steps replayed from CUDA graphs at fixed batch sizes; "
                                                       "default: on GPU only")
    api_key_env: str | None = Field("M1SERVE_API_KEY", description="env var holding the API key (unset: no auth)")
    per_layer_expert_metrics: bool = Field(False, description="export tokens per (layer, expert): layers x experts "
                                                              "series")
    env: dict[str, str] = Field(default_factory=dict, description="environment variables for every replica")

    @model_validator(mode="after")
    def _check(self):
        if self.model is None:
            from .cli import default_model_dir

            self.model = str(default_model_dir())
        if self.router_experts and not self.expert_shards:
            raise ValueError("router_experts needs expert_shards > 0 (with none, the router holds every expert)")
        if self.expert_shards:
            cfg = ModelConfig.from_file(self.model)
            holders = self.expert_shards + int(self.router_experts)
            if cfg.num_local_experts % holders:
                what = f"{self.expert_shards} shards + the router" if self.router_experts else str(self.expert_shards)
                raise ValueError(f"expert_shards: {what} does not divide the {cfg.num_local_experts} experts of "
                                 f"{self.model}")
        return self


def build_app(args: AppArgs | dict) -> Application:
    if not isinstance(args, AppArgs):
        args = AppArgs(**args)
    name = args.model_name or Path(args.model).name
    # every replica sees all GPUs of its node (each still uses only the one Ray assigned it: replica_device), so the
    # router and the shards on one node can write into each other's memory (cluster/peer_links.py)
    runtime_env = {"env_vars": {NOSET_CUDA_VISIBLE_DEVICES: "1", **args.env}}
    engine = {name: getattr(args, name) for name in ENGINE_FIELDS}
    shard_deployment = serve.deployment(ExpertShard)
    shards = [
        shard_deployment.options(
            name=f"ExpertShard{i}", num_replicas=1, max_ongoing_requests=8,
            health_check_period_s=2, health_check_timeout_s=10,
            ray_actor_options={"num_cpus": args.cpus_per_shard, "num_gpus": args.gpus_per_shard,
                               "resources": dict(args.shard_resources), "runtime_env": runtime_env},
        ).bind(args.model, i, args.expert_shards, args.dtype, args.expert_dtype, args.router_experts)
        for i in range(args.expert_shards)
    ]
    router = serve.deployment(serve.ingress()(Router)).options(
        name=ROUTER_NAME, num_replicas=1, max_ongoing_requests=4 * args.max_queue_len,
        health_check_period_s=5, health_check_timeout_s=30, graceful_shutdown_timeout_s=60,
        ray_actor_options={"num_cpus": args.router_cpus, "num_gpus": args.router_gpus, "runtime_env": runtime_env},
    )
    return router.bind(args.model, shards, engine, name, args.api_key_env, args.per_layer_expert_metrics)
