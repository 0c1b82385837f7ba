"""m1serve command line: make-tiny | generate | bench-engine (| serve, k8s as they land)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def default_model_dir() -> Path:
    """The embedded demo checkpoint: made by make-tiny on first use in a cache folder."""
    from model_shards.tiny import make_tiny

    root = Path(os.environ.get("M1SERVE_CACHE", Path.home() / ".cache" / "m1serve"))
    path = root / "tiny-v1"
    if not (path / "config.json").exists():
        tmp = root / f"tiny-v1.tmp{os.getpid()}"
        make_tiny(tmp)
        try:
            tmp.rename(path)
        except OSError:  # another process made it first
            pass
    return path


def _engine_config(args, **overrides):
    from cluster.engine.engine import EngineConfig

    fields = dict(model=str(args.model or default_model_dir()), expert_shards=args.expert_shards,
                  router_experts=args.router_experts, device=args.device, dtype=args.dtype,
                  expert_dtype=args.expert_dtype, max_model_len=args.max_model_len)
    fields.update(overrides)
    return EngineConfig(**fields)


def cmd_make_tiny(args) -> int:
    from model_shards.tiny import make_tiny, tiny_config

    cfg = tiny_config(num_layers=args.layers, num_experts=args.experts, hidden_size=args.hidden_size,
                      vocab_size=args.vocab_size)
    make_tiny(args.out, cfg, seed=args.seed)
    print(json.dumps({"path": str(args.out), "layers": cfg.num_hidden_layers, "experts": cfg.num_local_experts}))
    return 0


def cmd_generate(args) -> int:
    from cluster.engine.engine import Engine
    from cluster.engine.sampling import SamplingParams

    if (args.prompt is None) == (args.prompt_ids is None):
        print("error: give exactly one of --prompt and --prompt-ids", file=sys.stderr)
        return 2
    prompt = args.prompt if args.prompt is not None else [int(t) for t in args.prompt_ids.split(",") if t.strip()]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature or 0.0,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos)
    with Engine(_engine_config(args)) as engine:
        out = engine.generate(prompt, params)
    if out.finish_reason == "error":
        print(f"error: {out.error}", file=sys.stderr)
        return 1
    print(json.dumps({"prompt_token_ids": out.prompt_token_ids, "token_ids": out.token_ids, "text": out.text,
                      "finish_reason": out.finish_reason}, ensure_ascii=False))
    return 0


def cmd_bench_engine(args) -> int:
    from cluster.bench_engine import run_bench

    result = run_bench(_engine_config(args, profile=True, max_num_seqs=max(args.concurrency)), args.concurrency,
                       args.prompt_len, args.max_tokens)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


GRPC_SERVICER = "cluster.api.m1serve_pb2_grpc.add_M1ServeServicer_to_server"


def cmd_serve(args) -> int:
    import signal
    import threading

    from cluster.ingress import check_ports_free, end_orphaned_haproxy, ingress_env

    if not args.address:
        ports = {"--http-port": args.http_port, "--grpc-port": args.grpc_port, "--metrics-port": args.metrics_port}
        for pid in end_orphaned_haproxy(set(ports.values())):
            print(f"m1serve: ended pid {pid}, an HAProxy left on our ports by a server that did not shut down",
                  flush=True)
        check_ports_free(args.host, ports)
        # before Ray Serve's first import in this process, and before Ray starts its processes
        os.environ.update(ingress_env(args.ingress))
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from cluster.app import APP_NAME, AppArgs, build_app

    app_args = AppArgs(model=args.model, expert_shards=args.expert_shards, router_experts=args.router_experts,
                       max_model_len=args.max_model_len,
                       dtype=args.dtype, expert_dtype=args.expert_dtype, max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens, router_gpus=args.router_gpus,
                       gpus_per_shard=args.gpus_per_shard, collective_timeout_s=args.collective_timeout_s,
                       max_queue_len=args.max_queue_len, max_tokens_per_request=args.max_tokens_per_request,
                       request_timeout_s=args.request_timeout_s,
                       warmup={"auto": None, "on": True, "off": False}[args.warmup],
                       cuda_graphs={"auto": None, "on": True, "off": False}[args.cuda_graphs],
                       shard_resources=dict(args.shard_resource),
                       env={**({} if args.address else {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}),
                            **dict(args.replica_env)})
    print(f"m1serve: model {app_args.model}, {app_args.expert_shards} expert shards"
          f"{'' if args.address else f', ingress {args.ingress}'}", flush=True)
    if args.address:
        ray.init(address=args.address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", _metrics_export_port=args.metrics_port)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        # one proxy, on the head node: the router is a single replica, and nodes sharing a host can't share ports
        serve.start(proxy_location="HeadOnly", http_options=HTTPOptions(host=args.host, port=args.http_port),
                    grpc_options=gRPCOptions(port=args.grpc_port, grpc_servicer_functions=[GRPC_SERVICER]))
        print("m1serve: loading the model and forming the expert-shard group ...", flush=True)
        serve.run(build_app(app_args), name=APP_NAME, route_prefix="/")
        print(f"m1serve: ready\n  OpenAI HTTP  http://{args.host}:{args.http_port}/v1\n"
              f"  gRPC         {args.host}:{args.grpc_port} (m1serve.v1.M1Serve)\n"
              f"  metrics      http://127.0.0.1:{args.metrics_port}/metrics", flush=True)
        stop.wait()
        print(f"m1serve: shutting down (in-flight requests get up to {args.drain_timeout_s}s)", flush=True)
        try:
            serve.get_app_handle(APP_NAME).drain.remote(args.drain_timeout_s).result(
                timeout_s=args.drain_timeout_s + 30)
        except Exception as e:  # the app may already be broken; shut down regardless
            print(f"m1serve: drain failed: {e}", flush=True)
    finally:
        try:
            if args.address:
                serve.delete(APP_NAME)
            else:
                serve.shutdown()
        finally:
            ray.shutdown()
    return 0


def _key_value(convert):
    def parse(text: str):
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
        try:
            return key, convert(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad value in {text!r}") from None
    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="m1serve", description="Expert-parallel serving for MiniMax-M1 models")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny", help="write a small random checkpoint in the published layout")
    p.add_argument("out", type=Path)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_tiny)

    def engine_args(p):
        p.add_argument("--model", help="checkpoint folder (default: the embedded tiny demo checkpoint)")
        p.add_argument("--expert-shards", type=int, default=0, help="expert-shard processes (0: experts in-process)")
        p.add_argument("--router-experts", action="store_true",
                       help="the router holds a share of the experts too: shards + 1 equal shares (all 4 GPUs of a "
                            "4-GPU machine: router + 3 shards, 8 of 32 experts each)")
        p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the router's device)")
        p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
        p.add_argument("--expert-dtype", choices=["int8"], default=None, help="weight-only int8 experts")
        p.add_argument("--max-model-len", type=int, default=4096)

    p = sub.add_parser("generate", help="run one request and print JSON")
    engine_args(p)
    p.add_argument("--prompt")
    p.add_argument("--prompt-ids", help="comma-separated token ids")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=None, help="default: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="run the Ray Serve cluster: OpenAI HTTP + gRPC")
    p.add_argument("--model", help="checkpoint folder (default: the embedded tiny demo checkpoint)")
    p.add_argument("--expert-shards", type=int, default=2)
    p.add_argument("--router-experts", action="store_true",
                   help="the router holds a share of the experts too: shards + 1 equal shares (all 4 GPUs of a "
                        "4-GPU machine: router + 3 shards, 8 of 32 experts each)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--expert-dtype", choices=["int8"], default=None, help="weight-only int8 experts")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens per step (bounds a prefill chunk); default 256 on CPU, 16384 on GPU")
    p.add_argument("--router-gpus", type=float, default=0)
    p.add_argument("--gpus-per-shard", type=float, default=0)
    p.add_argument("--collective-timeout-s", type=float, default=30.0)
    p.add_argument("--max-queue-len", type=int, default=256, help="waiting requests beyond this get 429")
    p.add_argument("--max-tokens-per-request", type=int, default=None)
    p.add_argument("--request-timeout-s", type=float, default=600.0)
    p.add_argument("--drain-timeout-s", type=float, default=20.0, help="on SIGTERM, time for in-flight requests")
    p.add_argument("--warmup", choices=["auto", "on", "off"], default="auto",
                   help="throwaway requests before serving (compiles the GPU kernels); auto: on GPU only")
    p.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto",
                   help="replay decode steps from CUDA graphs on router and shards; auto: on GPU only")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=9000)
    p.add_argument("--metrics-port", type=int, default=8080)
    p.add_argument("--address", help="an existing Ray cluster (default: start a local one)")
    p.add_argument("--ingress", choices=["haproxy", "proxy"], default="haproxy",
                   help="haproxy: HAProxy on the HTTP/gRPC ports, straight to the router replica's own servers; "
                        "proxy: Ray Serve's Python proxy actor in between. Local Ray instance only (with --address "
                        "the cluster's environment decides: RAY_SERVE_ENABLE_HA_PROXY)")
    p.add_argument("--shard-resource", type=_key_value(float), action="append", default=[], metavar="NAME=AMOUNT",
                   help="a custom Ray resource each shard replica needs (places shards on the nodes that have it)")
    p.add_argument("--replica-env", type=_key_value(str), action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for every replica (e.g. NCCL_SOCKET_IFNAME=eth0)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench-engine", help="decode throughput and per-step time breakdown")
    engine_args(p)
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--out", help="write the results as JSON here")
    p.set_defaults(func=cmd_bench_engine)

    from cluster.k8s import add_k8s_parser

    add_k8s_parser(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError) as e:  # configuration and input errors: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
