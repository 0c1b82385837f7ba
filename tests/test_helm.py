"""The Helm chart (deploy/helm/m1serve) with a real helm binary: lint --strict and template for the default values,
the MiniMax-M1 values files, the CPU demo and edge values; every rendered object validated strictly (kubernetes-
validate + the kubernetes client's pydantic models for core kinds, the KubeRay CRD schema for the RayService, a
structural schema for PodMonitors); serveConfigV2 loaded by the real app builder; bad values rejected with a clear
message. helm comes from tests/k8s_tools.py (PyPI wheel, cached in .cache/k8s-tools)."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from k8s_tools import (CHART, KUBE_VERSION, RAYSERVICE_CRD, ROOT, client_model, ensure_helm,  # noqa: E402
                       helm_env, rayservice_validator, validation_errors)

import kubernetes_validate  # noqa: E402  (pip: kubernetes-validate; the test extra)

MONITORING = "monitoring.coreos.com/v1"
GPU = "nvidia.com/gpu"
SERVICER = "cluster.api.m1serve_pb2_grpc.add_M1ServeServicer_to_server"

# name -> (values files, --set / --set-string args, extra api versions)
CASES = {
    "default": ([], [], []),
    "default-with-monitoring": ([], [], [MONITORING]),
    "h200-bf16": (["values-minimax-m1-h200-bf16.yaml"], [], [MONITORING]),
    "h100-int8": (["values-minimax-m1-h100-int8.yaml"], [], []),
    "cpu-demo": (["values-cpu-demo.yaml"], [], []),
    "cpu-demo-with-monitoring-crds": (["values-cpu-demo.yaml"], [], [MONITORING]),
    "one-shard": ([], ["--set", "shards.count=1"], [MONITORING]),
    "eight-shards-two-pods": ([], ["--set", "shards.count=8,shards.pods=2"], []),
    "router-experts-seven-shards": ([], ["--set", "router.experts=true,shards.count=7"], []),
    "32-shards-half-gpu": ([], ["--set", "shards.count=32,shards.pods=2,shards.gpusPerShard=0.5"], []),
    "networkpolicy-apikey-hostpath": ([], [
        "--set", "networkPolicy.enabled=true,apiKey.existingSecret=m1serve-api-key,weights.source=hostPath",
        "--set", "fullnameOverride=m1",
        "--set-json", 'networkPolicy.clients=[{"namespaceSelector":{"matchLabels":{"team":"apps"}}}]',
        "--set-json", 'networkPolicy.metricsFrom=[{"namespaceSelector":{"matchLabels":'
                      '{"kubernetes.io/metadata.name":"monitoring"}}}]',
        "--set-json", 'imagePullSecrets=[{"name":"regcred"}]'], [MONITORING]),
    "pvc-created": ([], ["--set", "weights.pvc.create=true,weights.pvc.storageClassName=fast"], []),
    "image-weights-minimal": ([], ["--set", "weights.source=image,serviceAccount.create=false,tests.enabled=false,"
                                           "rayService.upgradeStrategy=None,service.type=LoadBalancer,"
                                           "service.ingress=proxy,model.dtype=,model.name=,gpu.tolerations=null",
                                   "--set-json", "model.cacheMemoryGB=null"],
                              []),
    "init-weights-gpu": ([], ["--set", "weights.source=init", "--set-json",
                              'weights.init.command=["sh","-c","huggingface-cli download MiniMaxAI/MiniMax-M1-80k '
                              '--local-dir $M1SERVE_MODEL_PATH"]'], []),
}


def values_of(case: str) -> dict:
    """The merged values of a case, read back from helm (helm template does not print them; `helm show values`
    shows only the defaults), so that the tests compare against what helm actually used."""
    files, sets, _ = CASES[case]
    merged = yaml.safe_load((CHART / "values.yaml").read_text())
    for f in files:
        _deep_merge(merged, yaml.safe_load((CHART / f).read_text()))
    it = iter(sets)
    for flag in it:
        arg = next(it)
        if flag == "--set-json":
            key, _, value = arg.partition("=")
            _set_path(merged, key, json.loads(value))
        else:
            for item in arg.split(","):
                key, _, value = item.partition("=")
                _set_path(merged, key, yaml.safe_load(value))
    return merged


def _deep_merge(base: dict, over: dict) -> None:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = v


def _set_path(d: dict, dotted: str, value) -> None:
    *head, last = dotted.split(".")
    for k in head:
        d = d.setdefault(k, {})
    d[last] = value


# ---- running helm ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def helm(tmp_path_factory):
    try:
        binary = ensure_helm()
    except RuntimeError as e:
        pytest.fail(f"could not obtain helm: {e}")
    env = helm_env(tmp_path_factory.mktemp("helm-home"))

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(binary), *args], capture_output=True, text=True, env=env, timeout=120)
        if check and proc.returncode:
            raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    return run


def template_args(files, sets, api_versions, release="m1"):
    args = ["template", release, str(CHART), "--namespace", "llm", "--kube-version", KUBE_VERSION]
    for f in files:
        args += ["-f", str(CHART / f)]
    args += list(sets)
    for v in api_versions:
        args += ["--api-versions", v]
    return args


@pytest.fixture(scope="session")
def rendered(helm):
    cache = {}

    def get(case: str) -> list[dict]:
        if case not in cache:
            out = helm(*template_args(*CASES[case])).stdout
            cache[case] = [d for d in yaml.safe_load_all(out) if d]
        return cache[case]

    return get


@pytest.fixture(scope="session")
def crd_validator():
    if not RAYSERVICE_CRD.exists():
        pytest.fail(f"the KubeRay RayService CRD is missing: {RAYSERVICE_CRD}")
    return rayservice_validator()


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def rayservice(docs) -> dict:
    (rs,) = by_kind(docs, "RayService")
    return rs


def ray_groups(rs) -> dict[str, dict]:
    """group name (head, router, shards) -> {"spec": group spec, "pod": pod template}."""
    cluster = rs["spec"]["rayClusterConfig"]
    out = {"head": {"spec": cluster["headGroupSpec"], "pod": cluster["headGroupSpec"]["template"]}}
    for g in cluster["workerGroupSpecs"]:
        out[g["groupName"]] = {"spec": g, "pod": g["template"]}
    return out


def all_pod_specs(docs) -> list[tuple[str, dict]]:
    out = [(f"RayService/{name}", g["pod"]["spec"]) for name, g in ray_groups(rayservice(docs)).items()]
    out += [(f"Pod/{d['metadata']['name']}", d["spec"]) for d in by_kind(docs, "Pod")]
    return out


def serve_config(docs) -> dict:
    return yaml.safe_load(rayservice(docs)["spec"]["serveConfigV2"])


# ---- lint ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_lint_strict(helm, case):
    files, sets, api_versions = CASES[case]
    args = ["lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION]
    for f in files:
        args += ["-f", str(CHART / f)]
    proc = helm(*args, *sets)
    assert "0 chart(s) failed" in proc.stdout
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


# ---- every object, strictly ------------------------------------------------------------------------------------------
DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
PODMONITOR_SCHEMA = {
    # The parts of monitoring.coreos.com/v1 PodMonitor the chart uses (prometheus-operator's CRD, structurally):
    # unknown fields anywhere are errors, as with the API server's strict field validation.
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PodMonitor"},
        "metadata": {"type": "object", "required": ["name", "namespace"], "additionalProperties": False,
                     "properties": {"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
                                             "maxLength": 63},
                                    "namespace": {"type": "string"},
                                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                                    "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}},
        "spec": {"type": "object", "additionalProperties": False, "required": ["selector", "podMetricsEndpoints"],
                 "properties": {
                     "jobLabel": {"type": "string"},
                     "namespaceSelector": {"type": "object", "additionalProperties": False,
                                           "properties": {"any": {"type": "boolean"},
                                                          "matchNames": {"type": "array",
                                                                         "items": {"type": "string"}}}},
                     "selector": {"type": "object", "additionalProperties": False, "minProperties": 1,
                                  "properties": {"matchLabels": {"type": "object",
                                                                 "additionalProperties": {"type": "string"}},
                                                 "matchExpressions": {"type": "array"}}},
                     "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {
                         "type": "object", "additionalProperties": False, "required": ["port"],
                         "properties": {
                             "port": {"type": "string", "minLength": 1},
                             "path": {"type": "string", "pattern": "^/"},
                             "interval": DURATION, "scrapeTimeout": DURATION,
                             "relabelings": {"type": "array", "items": {
                                 "type": "object", "additionalProperties": False,
                                 "properties": {
                                     "action": {"enum": ["replace", "keep", "drop", "hashmod", "labelmap",
                                                         "labeldrop", "labelkeep", "lowercase", "uppercase",
                                                         "keepequal", "dropequal"]},
                                     "sourceLabels": {"type": "array", "items": {
                                         "type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"}},
                                     "targetLabel": {"type": "string"}, "regex": {"type": "string"},
                                     "replacement": {"type": "string"}, "separator": {"type": "string"},
                                     "modulus": {"type": "integer"}}}}}}}}},
    },
}


def validate_core(doc: dict, what: str) -> None:
    try:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        raise AssertionError(f"{what}: kubernetes-validate {KUBE_VERSION} --strict: {e}") from None
    client_model(doc).model_validate(doc)  # the kubernetes client's pydantic model: extra fields forbidden


@pytest.mark.parametrize("case", list(CASES))
def test_every_object_validates_strictly(rendered, crd_validator, case):
    import jsonschema

    docs = rendered(case)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds.count("RayService") == 1, kinds
    for doc in docs:
        what = f"{case}: {doc['kind']}/{doc['metadata']['name']}"
        assert doc["metadata"].get("namespace", "llm") == "llm" or doc["kind"] == "PodMonitor", what
        if doc["kind"] == "RayService":
            errors = validation_errors(crd_validator, doc)
            assert not errors, f"{what} vs the KubeRay CRD:\n" + "\n".join(errors)
            # the embedded objects are core kinds too: each pod template as a Pod, serveService as a Service
            for name, g in ray_groups(doc).items():
                pod = {"apiVersion": "v1", "kind": "Pod",
                       "metadata": {**g["pod"]["metadata"], "name": f"{doc['metadata']['name']}-{name}"},
                       "spec": g["pod"]["spec"]}
                validate_core(pod, f"{what} {name} pod template")
            svc = copy.deepcopy(doc["spec"]["serveService"])
            svc.update(apiVersion="v1", kind="Service")
            validate_core(svc, f"{what} serveService")
        elif doc["kind"] == "PodMonitor":
            errors = validation_errors(jsonschema.Draft7Validator(PODMONITOR_SCHEMA), doc)
            assert not errors, f"{what}:\n" + "\n".join(errors)
        else:
            validate_core(doc, what)


def test_strict_validation_catches_mistakes(rendered, crd_validator):
    """The validators used above do reject what they should (so a pass means something)."""
    rs = copy.deepcopy(rayservice(rendered("default")))
    rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["bogusField"] = 1
    rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]["replicas"] = "2"
    errors = "\n".join(validation_errors(crd_validator, rs))
    assert "bogusField" in errors and "'2' is not of type 'integer'" in errors, errors
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
           "spec": {"containers": [{"name": "c", "image": "i", "resourcez": {}}]}}
    with pytest.raises(AssertionError, match="resourcez"):
        validate_core(pod, "pod")


# ---- what the pods look like -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_pods_requests_security_shm_gpus(rendered, case):
    docs, values = rendered(case), values_of(case)
    for what, spec in all_pod_specs(docs):
        assert spec.get("automountServiceAccountToken") is False, what
        psc = spec.get("securityContext") or {}
        assert psc.get("runAsNonRoot") is True and psc.get("runAsUser") == 1000, what
        for c in spec.get("initContainers", []) + spec["containers"]:
            req = (c.get("resources") or {}).get("requests") or {}
            assert "cpu" in req and "memory" in req, f"{what} container {c['name']} lacks cpu/memory requests"
            sc = c.get("securityContext") or {}
            assert sc.get("allowPrivilegeEscalation") is False and sc["capabilities"]["drop"] == ["ALL"], what
    groups = ray_groups(rayservice(docs))
    assert list(groups) == ["head", "router", "shards"]
    per_pod = values["shards"]["count"] // values["shards"]["pods"]
    want_gpus = {"head": 0, "router": values["router"]["gpus"],
                 "shards": round(per_pod * values["shards"]["gpusPerShard"])}
    for name, g in groups.items():
        spec = g["pod"]["spec"]
        (ray,) = [c for c in spec["containers"] if c["name"].startswith("ray-")]
        assert spec["containers"][0] is ray, "KubeRay expects the Ray container first"
        # /dev/shm: a memory-backed emptyDir of the group's size, mounted
        shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": values[name]["shmSize"]}
        assert {"name": "dshm", "mountPath": "/dev/shm"} in ray["volumeMounts"]
        # GPUs: requests == limits == what the group needs, tolerations only where there are GPUs
        gpus = want_gpus[name]
        res = ray["resources"]
        assert res["limits"].get(GPU) == (str(gpus) if gpus else None), (name, res)
        assert res["requests"].get(GPU) == res["limits"].get(GPU)
        has_gpu_toleration = any(t.get("key") == GPU for t in spec.get("tolerations", []))
        assert has_gpu_toleration == (gpus > 0 and bool(values["gpu"]["tolerations"])), name
        for k, v in (values[name].get("nodeSelector") or {}).items():
            assert spec["nodeSelector"][k] == v
        # metrics: the `metrics` port is Ray's export port
        ports = {p["name"]: p["containerPort"] for p in ray["ports"]}
        assert ports["metrics"] == 8080 == int(g["spec"]["rayStartParams"]["metrics-export-port"])
        assert ports["serve"] == 8000 and ports["grpc"] == 9000
        # the ingress on those ports: Ray Serve's HAProxy where every Ray process of the pod sees the flag
        haproxy = {"name": "RAY_SERVE_ENABLE_HA_PROXY", "value": "1"} in (ray.get("env") or [])
        assert haproxy == (values["service"]["ingress"] == "haproxy"), name
        # the weights
        source = values["weights"]["source"]
        weights = [v for v in spec["volumes"] if v["name"] == "weights"]
        if source == "image":
            assert not weights
        else:
            kind = {"pvc": "persistentVolumeClaim", "hostPath": "hostPath", "init": "emptyDir"}[source]
            assert kind in weights[0], weights
            mount = next(m for m in ray["volumeMounts"] if m["name"] == "weights")
            assert mount["readOnly"] is True and values["model"]["path"].startswith(mount["mountPath"] + "/")
            if source == "init":
                (init,) = spec["initContainers"]
                assert {"name": "M1SERVE_RAY_GROUP", "value": name} in init["env"]
    head_params = groups["head"]["spec"]["rayStartParams"]
    assert head_params["num-cpus"] == "0" and head_params["num-gpus"] == "0"
    assert int(groups["shards"]["spec"]["replicas"]) == values["shards"]["pods"]
    assert groups["router"]["spec"]["replicas"] == 1


def _ray_resources(param: str) -> dict:
    """KubeRay's rayStartParams `resources` format: a quoted JSON object with escaped quotes."""
    assert param.startswith('"') and param.endswith('"'), param
    return json.loads(json.loads(param))


@pytest.mark.parametrize("case", list(CASES))
def test_serve_config(rendered, case):
    from ray.serve.schema import ServeDeploySchema

    docs, values = rendered(case), values_of(case)
    cfg = serve_config(docs)
    ServeDeploySchema.model_validate(cfg)  # what Serve itself accepts
    assert cfg["http_options"]["port"] == 8000 and cfg["grpc_options"]["port"] == 9000
    assert cfg["grpc_options"]["grpc_servicer_functions"] == [SERVICER]
    (app,) = cfg["applications"]
    assert app["name"] == "m1serve" and app["import_path"] == "cluster.app:build_app"
    args = app["args"]
    assert args["expert_shards"] == values["shards"]["count"]
    assert args["gpus_per_shard"] == values["shards"]["gpusPerShard"]
    assert args["router_gpus"] == values["router"]["gpus"]
    assert args["model"] == values["model"]["path"]
    assert args["max_model_len"] == values["model"]["maxModelLen"]
    # placement: the shards need m1serve_shard, which only shard pods have (count per pod x pods == shards);
    # the Router needs m1serve_router, which only the router pod has
    groups = ray_groups(rayservice(docs))
    shard_res = _ray_resources(groups["shards"]["spec"]["rayStartParams"]["resources"])
    router_res = _ray_resources(groups["router"]["spec"]["rayStartParams"]["resources"])
    assert args["shard_resources"] == {"m1serve_shard": 1}
    assert shard_res["m1serve_shard"] * groups["shards"]["spec"]["replicas"] == args["expert_shards"]
    (router_override,) = app["deployments"]
    assert router_override["name"] == "Router"
    assert router_override["ray_actor_options"]["resources"] == router_res == {"m1serve_router": 1}
    assert "resources" not in groups["head"]["spec"]["rayStartParams"]
    # the serve Service: HTTP 8000 and gRPC 9000
    ports = {p["name"]: p for p in rayservice(docs)["spec"]["serveService"]["spec"]["ports"]}
    assert (ports["http"]["targetPort"], ports["grpc"]["targetPort"]) == (8000, 9000)


# ---- serveConfigV2 through the real app builder ----------------------------------------------------------------------
def minimax_m1_config() -> dict:
    """MiniMax-M1's published config.json (model.md section 1), through our ModelConfig."""
    from model_shards.config import FULL, LINEAR, ModelConfig

    alpha = 3.5565588200778455
    cfg = ModelConfig(vocab_size=200064, hidden_size=6144, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, head_dim=128, rotary_dim=64, rope_theta=10_000_000.0,
                      intermediate_size=9216, num_local_experts=32, num_experts_per_tok=2, rms_norm_eps=1e-5,
                      layer_types=tuple(FULL if i % 8 == 7 else LINEAR for i in range(80)),
                      linear_attn_alpha=alpha, linear_attn_beta=1.0, full_attn_alpha=alpha, full_attn_beta=1.0,
                      mlp_alpha=alpha, mlp_beta=1.0, max_position_embeddings=10_240_000)
    cfg.validate()
    return cfg.to_dict()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A tiny checkpoint (CPU demo) and a config.json-only MiniMax-M1 folder (full-model values: the builder
    validates the args and reads config.json but loads no weights)."""
    from model_shards.tiny import make_tiny

    root = tmp_path_factory.mktemp("models")
    tiny = make_tiny(root / "tiny")
    m1 = root / "MiniMax-M1-80k"
    m1.mkdir()
    (m1 / "config.json").write_text(json.dumps(minimax_m1_config()))
    return {"tiny": Path(tiny), "m1": m1}


def build_from_serve_config(app_cfg: dict, model_dir: Path):
    """What Serve does with serveConfigV2: import import_path and call it with args."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    try:
        from ray._common.utils import import_attr
    except ImportError:  # older Ray
        from ray._private.utils import import_attr
    args = dict(app_cfg["args"], model=str(model_dir))
    builder = import_attr(app_cfg["import_path"])
    return call_user_app_builder_with_args_if_necessary(builder, args)


@pytest.mark.parametrize("case", ["default", "h200-bf16", "h100-int8", "cpu-demo", "one-shard",
                                  "32-shards-half-gpu", "networkpolicy-apikey-hostpath", "image-weights-minimal",
                                  "router-experts-seven-shards"])
def test_app_builder_loads_serve_config(rendered, model_dirs, case):
    from ray.serve import Application

    from cluster.app import AppArgs

    values = values_of(case)
    (app_cfg,) = serve_config(rendered(case))["applications"]
    model_dir = model_dirs["tiny" if values["model"]["numExperts"] == 8 else "m1"]
    app_cfg = copy.deepcopy(app_cfg)
    missing = sorted(set(app_cfg["args"]) - set(AppArgs.model_fields))
    if missing:
        # The chart renders args the app builder does not know yet (int8 experts): the rest must still build.
        for k in missing:
            app_cfg["args"].pop(k)
    app = build_from_serve_config(app_cfg, model_dir)
    assert isinstance(app, Application)
    router = app._bound_deployment
    assert router.name == "Router"
    shards = router.init_args[1]
    assert [s._bound_deployment.name for s in shards] == [f"ExpertShard{i}" for i in range(values["shards"]["count"])]
    router_experts = bool(values["router"].get("experts"))
    assert router.init_args[2]["router_experts"] is router_experts  # the engine config
    for s in shards:
        opts = s._bound_deployment.ray_actor_options
        assert opts["num_gpus"] == values["shards"]["gpusPerShard"]
        assert opts["resources"] == {"m1serve_shard": 1}
        assert s._bound_deployment.init_args[5] is router_experts  # ExpertShard(..., router_experts)
    assert router.init_args[3] == (values["model"]["name"] or Path(values["model"]["path"]).name)  # served name
    # The serveConfigV2 override replaces the Router's ray_actor_options whole: it must equal the builder's own
    # options plus the pinning resource, or the override would silently change the Router.
    (override,) = app_cfg["deployments"]
    built = dict(router.ray_actor_options)
    over = dict(override["ray_actor_options"])
    assert over.pop("resources") == {"m1serve_router": 1}
    assert (over.pop("runtime_env", None) or {}) == (built.pop("runtime_env", None) or {})
    assert over == built, (over, built)
    assert not missing, f"serveConfigV2 args the app builder does not know: {missing}"


def test_app_builder_rejects_what_the_chart_rejects(model_dirs):
    """The chart's divisibility check mirrors AppArgs': 5 shards of 32 experts fail in the builder too."""
    from cluster.app import AppArgs

    with pytest.raises(ValueError, match="does not divide the 32 experts"):
        AppArgs(model=str(model_dirs["m1"]), expert_shards=5)
    # the router's own share counts as one more holder: router + 3 shards split 32 experts, router + 2 do not
    assert AppArgs(model=str(model_dirs["m1"]), expert_shards=3, router_experts=True).router_experts
    with pytest.raises(ValueError, match="2 shards \\+ the router does not divide the 32 experts"):
        AppArgs(model=str(model_dirs["m1"]), expert_shards=2, router_experts=True)
    with pytest.raises(ValueError, match="router_experts needs expert_shards"):
        AppArgs(model=str(model_dirs["m1"]), expert_shards=0, router_experts=True)


# ---- metrics, network policy, test hook, NOTES -----------------------------------------------------------------------
def test_podmonitors_only_with_the_crds(rendered):
    assert not by_kind(rendered("default"), "PodMonitor")
    assert not by_kind(rendered("cpu-demo-with-monitoring-crds"), "PodMonitor")  # disabled in the demo values
    docs = rendered("default-with-monitoring")
    monitors = {d["metadata"]["name"]: d for d in by_kind(docs, "PodMonitor")}
    assert set(monitors) == {"m1-m1serve-head", "m1-m1serve-worker"}
    groups = ray_groups(rayservice(docs))
    for name, pm in monitors.items():
        assert pm["metadata"]["labels"]["release"] == "prometheus"
        node_type = pm["spec"]["selector"]["matchLabels"].pop("ray.io/node-type")
        # the selector matches our pods (KubeRay adds ray.io/node-type) and each port name exists on them
        targets = [g for n, g in groups.items() if (n == "head") == (node_type == "head")]
        assert targets
        for g in targets:
            labels = g["pod"]["metadata"]["labels"]
            assert pm["spec"]["selector"]["matchLabels"].items() <= labels.items()
            names = {p["name"] for p in g["pod"]["spec"]["containers"][0]["ports"]}
            for ep in pm["spec"]["podMetricsEndpoints"]:
                assert ep["port"] in names, (name, ep["port"], names)
        assert any(r["targetLabel"] == "ray_io_cluster" for r in pm["spec"]["podMetricsEndpoints"][0]["relabelings"])


def test_network_policy(rendered):
    assert not by_kind(rendered("default"), "NetworkPolicy")
    docs = rendered("networkpolicy-apikey-hostpath")
    (np,) = by_kind(docs, "NetworkPolicy")
    selector = np["spec"]["podSelector"]
    for g in ray_groups(rayservice(docs)).values():
        labels = g["pod"]["metadata"]["labels"]
        assert selector["matchLabels"].items() <= labels.items()
        assert labels["app.kubernetes.io/component"] in selector["matchExpressions"][0]["values"]
    rules = np["spec"]["ingress"]
    by_port = {tuple(sorted(p["port"] for p in r.get("ports", []))): r for r in rules}
    assert "ports" not in rules[0] and rules[0]["from"][0]["podSelector"]["matchLabels"] == selector["matchLabels"]
    assert by_port[(8000, 9000)]["from"] == [{"namespaceSelector": {"matchLabels": {"team": "apps"}}}]
    assert by_port[(8080, 44227)]["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"}
    assert by_port[(8265, 52365)]["from"][0]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "kuberay-operator"}
    # the API key reaches every Ray container and the test pod
    for what, spec in all_pod_specs(docs):
        env = {e["name"]: e for e in spec["containers"][0].get("env", [])}
        key_ref = env["M1SERVE_API_KEY"]["valueFrom"]["secretKeyRef"]
        assert key_ref == {"name": "m1serve-api-key", "key": "api-key"}, what
        assert spec["imagePullSecrets"] == [{"name": "regcred"}], what


class _Models(BaseHTTPRequestHandler):
    ids: list[str] = []
    key: str | None = None

    def log_message(self, *a):
        pass

    def do_GET(self):
        if self.key and self.headers.get("Authorization") != f"Bearer {self.key}":
            self.send_response(401)
            self.end_headers()
            return
        body = json.dumps({"object": "list", "data": [{"id": i, "object": "model"} for i in self.ids]}).encode()
        self.send_response(200 if self.path == "/v1/models" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_helm_test_hook_calls_v1_models(rendered):
    """The hook pod's own command, run here against a stand-in /v1/models."""
    docs = rendered("networkpolicy-apikey-hostpath")
    (pod,) = [d for d in by_kind(docs, "Pod") if d["metadata"]["annotations"].get("helm.sh/hook") == "test"]
    assert pod["spec"]["restartPolicy"] == "Never"
    (c,) = pod["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["URL"] == "http://m1-serve.llm.svc:8000/v1/models" and env["MODEL"] == "MiniMax-M1-80k"
    assert c["command"][:2] == ["python", "-c"]
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Models)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1/models"

        def run(ids, key=None, sent_key=None):
            _Models.ids, _Models.key = ids, key
            test_env = {"URL": url, "MODEL": env["MODEL"], "RETRIES": "2", "RETRY_DELAY_S": "0",
                        "PATH": "/usr/bin:/bin"}
            if sent_key:
                test_env["M1SERVE_API_KEY"] = sent_key
            return subprocess.run([sys.executable, "-c", c["command"][2]], env=test_env, capture_output=True,
                                  text=True, timeout=30)

        ok = run(["MiniMax-M1-80k"], key="s3cret", sent_key="s3cret")
        assert ok.returncode == 0 and "ok: GET" in ok.stdout, ok.stdout + ok.stderr
        wrong = run(["other-model"])
        assert wrong.returncode == 1 and "not 'MiniMax-M1-80k'" in wrong.stdout
        unauthorized = run(["MiniMax-M1-80k"], key="s3cret", sent_key="nope")
        assert unauthorized.returncode == 1 and "401" in unauthorized.stdout
    finally:
        server.shutdown()
        server.server_close()


def test_notes_explain_the_endpoints(helm):
    proc = helm("install", "m1", str(CHART), "--dry-run=client", "--namespace", "llm",
                "-f", str(CHART / "values-cpu-demo.yaml"))
    notes = proc.stdout.split("NOTES:", 1)[1]
    for text in ("http://m1-m1serve-serve.llm.svc:8000/v1", "m1-m1serve-serve.llm.svc:9000",
                 "kubectl port-forward -n llm svc/m1-m1serve-serve 8000:8000 9000:9000",
                 "m1serve k8s status m1-m1serve -n llm", "helm test m1 -n llm", "2 x 4 experts"):
        assert text in notes, (text, notes)


# ---- bad values fail at helm template, readably ----------------------------------------------------------------------
BAD = {
    "shards-not-dividing-32": (["--set", "shards.count=5"],
                               r"shards\.count=5 does not divide model\.numExperts=32.*Valid shard counts: "
                               r"1, 2, 4, 8, 16, 32"),
    "shards-not-dividing-demo-experts": (["-f", str(CHART / "values-cpu-demo.yaml"), "--set", "shards.count=3"],
                                         r"shards\.count=3 does not divide model\.numExperts=8"),
    "negative-router-gpus": (["--set", "router.gpus=-1"], r"/router/gpus.*minimum"),
    "negative-shard-gpus": (["--set", "shards.gpusPerShard=-2"], r"/shards/gpusPerShard.*minimum"),
    "negative-gpus-without-schema": (["--set", "router.gpus=-1", "--skip-schema-validation"],
                                     r"router\.gpus=-1 is negative"),
    "fractional-router-gpus": (["--set", "router.gpus=0.5"], r"/router/gpus.*want integer"),
    "zero-shards": (["--set", "shards.count=0"], r"/shards/count.*minimum"),
    "pods-not-dividing-shards": (["--set", "shards.pods=3"], r"shards\.pods=3 does not divide shards\.count=8"),
    "router-experts-not-dividing": (["--set", "router.experts=true"],
                                    r"shards\.count=8 plus the router's share \(router\.experts=true\) make 9 equal "
                                    r"shares, which do not divide model\.numExperts=32.*Valid shard counts with "
                                    r"router\.experts: 1, 3, 7, 15, 31"),
    "fractional-gpus-per-pod": (["--set", "shards.gpusPerShard=0.5,shards.pods=8"],
                                r"each shard pod would need 0\.5 GPUs"),
    "missing-claim": (["--set", "weights.pvc.claimName="], r"/weights/pvc/claimName.*minLength"),
    "unknown-dtype": (["--set", "model.dtype=int4"], r"/model/dtype.*(value must be one of|enum)"),
    "typo-in-key": (["--set", "shards.gpuPerShard=1"], r"gpuPerShard"),
    "relative-model-path": (["--set", "model.path=models/m1"], r"/model/path"),
    "model-outside-mount": (["--set", "model.path=/data/m1"], r"model\.path=/data/m1 is not inside"),
    "no-requests": (["--set", "head.resources.requests=null"], r"/head/resources.*requests"),
    "env-not-string": (["--set", "model.env.OMP_NUM_THREADS=1"], r"/model/env/OMP_NUM_THREADS.*want string"),
    "init-without-command": (["--set", "weights.source=init"], r"/weights/init/command.*minItems"),
    "metrics-port-collision": (["--set", "metrics.port=8000"], r"collide"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_values_fail_readably(helm, case):
    args, pattern = BAD[case]
    proc = helm("template", "m1", str(CHART), "--kube-version", KUBE_VERSION, *args, check=False)
    assert proc.returncode != 0, f"{case}: rendered without error"
    message = re.sub(r"\s+", " ", proc.stderr)
    assert re.search(pattern, message), f"{case}: {proc.stderr}"
    assert "panic" not in proc.stderr and "goroutine" not in proc.stderr


# ---- the image -------------------------------------------------------------------------------------------------------
def test_dockerfile_matches_the_chart_and_ray():
    import ray

    text = (ROOT / "deploy" / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)", text, re.M).group(1)
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)", text, re.M).group(1)
    assert base.startswith(f"rayproject/ray:{ray_version}-py311"), base
    assert ray_version == ray.__version__, "the image's Ray must be the Ray the tests run"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert values["rayVersion"] == ray_version == chart["annotations"]["m1serve.io/ray-version"]
    for path in ("pyproject.toml", "README.md", "cluster", "model_shards", "kernels"):
        assert re.search(rf"^COPY .*\b{re.escape(path)}\b", text, re.M), path
        assert f"!{path}" in (ROOT / "deploy" / "Dockerfile.dockerignore").read_text(), path
    assert "cluster.api.m1serve_pb2_grpc" in text  # the servicer serveConfigV2 names is checked at build time
