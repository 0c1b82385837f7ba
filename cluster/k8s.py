"""`m1serve k8s preflight | status`: check a Kubernetes cluster before `helm install` of deploy/helm/m1serve, and
report on a deployed RayService, with the kubernetes Python client.

preflight  the KubeRay API (ray.io/v1 rayservices + rayclusters) and operator, the namespace, the weights claim and
           the secrets the pods use, and whether the head, router and shard pods fit the schedulable nodes: GPUs of
           the requested kind (nodeSelector, e.g. nvidia.com/gpu.product), CPU and memory, after what running pods
           already request. The pods come from the chart rendered with helm (-f/--set, as for `helm install`) or
           from a manifest rendered beforehand (--manifest FILE, `-` for stdin).
status     the RayService's conditions, the Serve application and deployment statuses, the RayCluster's pods
           (ready / not, and why), the serve endpoints and the Service with the URLs to call.

Exit codes: 0 ok, 1 problems found (preflight: something will not work; status: not ready), 2 usage or
connection errors (bad arguments or values, no cluster, no permission).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

EXIT_OK, EXIT_PROBLEMS, EXIT_ERROR = 0, 1, 2
CHART_DIR = Path(__file__).resolve().parents[1] / "deploy" / "helm" / "m1serve"
CHART_LABEL = "app.kubernetes.io/name=m1serve"
RAY_GROUP, RAY_VERSION, RAY_PLURALS = "ray.io", "v1", ("rayservices", "rayclusters")
MONITORING = "monitoring.coreos.com/v1"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
TIMEOUT_S = 10.0


class UsageError(Exception):
    """Bad arguments, values or manifests, or a cluster we cannot talk to: exit 2."""


# ---- output --------------------------------------------------------------------------------------------------------
@dataclass
class Report:
    out: object = None
    problems: int = 0
    warnings: int = 0

    def line(self, text: str = "") -> None:
        print(text, file=self.out or sys.stdout, flush=True)

    def ok(self, text: str) -> None:
        self.line(f"  ok    {text}")

    def warn(self, text: str) -> None:
        self.warnings += 1
        self.line(f"  WARN  {text}")

    def fail(self, text: str) -> None:
        self.problems += 1
        self.line(f"  FAIL  {text}")

    def info(self, text: str) -> None:
        self.line(f"        {text}")


def fmt_cpu(v: Decimal) -> str:
    return f"{float(v):g} CPU"


def fmt_mem(v: Decimal) -> str:
    v = float(v)
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if v >= size:
            return f"{v / size:.3g} {unit}"
    return f"{v:.0f} B"


def fmt_res(name: str, v: Decimal) -> str:
    if name == "cpu":
        return fmt_cpu(v)
    if name == "memory":
        return fmt_mem(v) + " memory"
    return f"{v.normalize():f} {name}"


# ---- the API -------------------------------------------------------------------------------------------------------
class Kube:
    """Thin wrapper over the kubernetes client: raw JSON dicts (no model conversion, so new or unknown fields of
    real servers never break us), one timeout, and errors turned into UsageError or `None` for 404."""

    def __init__(self, api_client, namespace: str):
        from kubernetes import client

        self.api_client = api_client
        self.namespace = namespace
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.discovery = client.DiscoveryV1Api(api_client)
        self.version_api = client.VersionApi(api_client)
        self.host = api_client.configuration.host

    def call(self, fn, *args, missing_ok: bool = False, forbidden_ok: bool = False, **kwargs):
        """fn(..., _preload_content=False) -> parsed JSON. 404 -> None when missing_ok; 403 -> "forbidden" when
        forbidden_ok; anything else -> UsageError (exit 2)."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            resp = fn(*args, _preload_content=False, _request_timeout=TIMEOUT_S, **kwargs)
            try:
                return json.loads(resp.data or b"null")
            except ValueError:
                raise UsageError(f"{self.host}: the answer is not JSON (is this a Kubernetes API server?): "
                                 f"{resp.data[:200]!r}") from None
        except ApiException as e:
            if e.status == 404 and missing_ok:
                return None
            if e.status == 403 and forbidden_ok:
                return "forbidden"
            raise UsageError(f"{self.host}: {e.status} {e.reason}: {_status_message(e.body)}") from None
        except (HTTPError, OSError) as e:
            raise UsageError(f"cannot reach the Kubernetes API at {self.host}: {_short(e)}") from None

    def server_version(self) -> str:
        return self.call(self.version_api.get_code).get("gitVersion", "?")

    def api_resources(self, group_version: str) -> set[str] | None:
        """Resource names the server serves in group/version (discovery, allowed to every user); None if none."""
        group, _, version = group_version.rpartition("/")
        doc = self.call(self.custom.get_api_resources, group, version, missing_ok=True)
        if not doc:
            return None
        return {r["name"] for r in doc.get("resources", []) if "/" not in r["name"]}


def _status_message(body) -> str:
    try:
        return json.loads(body).get("message", "") or str(body)[:200]
    except (TypeError, ValueError, AttributeError):
        return str(body)[:200]


def _short(e: Exception) -> str:
    reason = getattr(e, "reason", None)
    return str(reason or e).splitlines()[0][:300]


def connect(args) -> Kube:
    """A Kube for --kubeconfig/--context (else $KUBECONFIG / ~/.kube/config, else the in-cluster service account)."""
    try:
        from kubernetes import client, config
    except ImportError:
        raise UsageError("m1serve k8s needs the kubernetes Python client: pip install kubernetes") from None

    kubeconfig = args.kubeconfig or os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or None
    default_file = Path(kubeconfig or Path.home() / ".kube" / "config")
    namespace = args.namespace
    try:
        cfg = client.Configuration()
        if default_file.exists() or args.context:
            config.load_kube_config(config_file=str(default_file), context=args.context, client_configuration=cfg)
            if not namespace:
                _, active = config.list_kube_config_contexts(config_file=str(default_file))
                if args.context:
                    contexts, _ = config.list_kube_config_contexts(config_file=str(default_file))
                    active = next((c for c in contexts if c["name"] == args.context), active)
                namespace = (active or {}).get("context", {}).get("namespace")
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=cfg)
            if not namespace:
                ns_file = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
                namespace = ns_file.read_text().strip() if ns_file.exists() else None
        else:
            raise UsageError(f"no kubeconfig ({default_file} does not exist) and not inside a cluster: "
                             f"pass --kubeconfig or set KUBECONFIG")
    except (config.ConfigException, OSError, ValueError) as e:
        raise UsageError(f"kubeconfig {default_file}: {e}") from None
    cfg.retries = 1  # fail fast: one retry, then exit 2
    return Kube(client.ApiClient(cfg), namespace or "default")


# ---- quantities, pods, nodes ----------------------------------------------------------------------------------------
def quantity(v) -> Decimal:
    from kubernetes.utils import parse_quantity

    try:
        return Decimal(parse_quantity(v))
    except (ValueError, TypeError):
        raise UsageError(f"not a Kubernetes quantity: {v!r}") from None


def pod_requests(spec: dict) -> dict[str, Decimal]:
    """A pod's effective requests (Kubernetes' rule): per resource, the larger of the containers' sum and the largest
    init container. A container's request defaults to its limit."""
    def container(c: dict) -> dict[str, Decimal]:
        res = c.get("resources") or {}
        merged = {**(res.get("limits") or {}), **(res.get("requests") or {})}
        return {k: quantity(v) for k, v in merged.items()}

    total: dict[str, Decimal] = {}
    for c in spec.get("containers") or []:
        for k, v in container(c).items():
            total[k] = total.get(k, Decimal(0)) + v
    for c in spec.get("initContainers") or []:
        for k, v in container(c).items():
            total[k] = max(total.get(k, Decimal(0)), v)
    return total


@dataclass
class PodNeed:
    group: str
    index: int
    count: int
    requests: dict[str, Decimal]
    node_selector: dict[str, str]
    tolerations: list[dict]
    has_affinity: bool

    @property
    def label(self) -> str:
        return f"{self.group} pod" + (f" {self.index + 1}/{self.count}" if self.count > 1 else "")

    def describe(self, gpu_names: set[str]) -> str:
        order = sorted(self.requests, key=lambda k: (k not in gpu_names, k not in ("cpu", "memory"), k))
        return ", ".join(fmt_res(k, self.requests[k]) for k in order if self.requests[k] > 0)


def pod_needs(rayservice: dict, gpu_product: str | None = None) -> list[PodNeed]:
    """The pods a RayService asks for: the head and every worker group's replicas x numOfHosts."""
    cluster = (rayservice.get("spec") or {}).get("rayClusterConfig") or {}
    groups = [("head", 1, (cluster.get("headGroupSpec") or {}).get("template"))]
    for g in cluster.get("workerGroupSpecs") or []:
        groups.append((g.get("groupName", "worker"), int(g.get("replicas", g.get("minReplicas", 0)) or 0)
                       * int(g.get("numOfHosts", 1) or 1), g.get("template")))
    needs = []
    for name, count, template in groups:
        if not template:
            raise UsageError(f"RayService {name} group has no pod template")
        spec = template.get("spec") or {}
        requests = pod_requests(spec)
        selector = dict(spec.get("nodeSelector") or {})
        if gpu_product and any(is_gpu(k) and v > 0 for k, v in requests.items()):
            selector[GPU_PRODUCT_LABEL] = gpu_product
        for i in range(count):
            needs.append(PodNeed(name, i, count, requests, selector, list(spec.get("tolerations") or []),
                                 bool(spec.get("affinity"))))
    return needs


def is_gpu(resource: str) -> bool:
    return resource.endswith("/gpu") or resource.endswith(".com/gpu")


@dataclass
class Node:
    name: str
    labels: dict[str, str]
    taints: list[dict]
    allocatable: dict[str, Decimal]
    used: dict[str, Decimal] = field(default_factory=dict)
    ready: bool = True
    unschedulable: bool = False
    placed: list[str] = field(default_factory=list)

    def free(self, resource: str) -> Decimal:
        return self.allocatable.get(resource, Decimal(0)) - self.used.get(resource, Decimal(0))

    @property
    def schedulable(self) -> bool:
        return self.ready and not self.unschedulable


def read_nodes(kube: Kube) -> list[Node]:
    nodes = []
    for n in kube.call(kube.core.list_node).get("items", []):
        meta, spec, status = n.get("metadata", {}), n.get("spec", {}), n.get("status", {})
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
        nodes.append(Node(meta.get("name", "?"), meta.get("labels") or {}, spec.get("taints") or [],
                          {k: quantity(v) for k, v in (status.get("allocatable") or {}).items()},
                          ready=ready, unschedulable=bool(spec.get("unschedulable"))))
    return nodes


def add_running_pods(kube: Kube, nodes: list[Node]) -> bool:
    """Subtracts what the scheduled, unfinished pods request. False if we may not list pods (then allocatable only)."""
    doc = kube.call(kube.core.list_pod_for_all_namespaces, forbidden_ok=True,
                    field_selector="status.phase!=Succeeded,status.phase!=Failed")
    if doc == "forbidden":
        return False
    by_name = {n.name: n for n in nodes}
    for p in doc.get("items", []):
        node = by_name.get((p.get("spec") or {}).get("nodeName"))
        if node is None:
            continue
        for k, v in pod_requests(p.get("spec") or {}).items():
            node.used[k] = node.used.get(k, Decimal(0)) + v
    return True


def tolerates(tolerations: list[dict], taint: dict) -> bool:
    if taint.get("effect") not in ("NoSchedule", "NoExecute"):
        return True
    for t in tolerations:
        if t.get("effect") and t["effect"] != taint.get("effect"):
            continue
        if t.get("operator") == "Exists":
            if not t.get("key") or t["key"] == taint.get("key"):
                return True
        elif t.get("key") == taint.get("key") and (t.get("value") or "") == (taint.get("value") or ""):
            return True
    return False


def eligible(need: PodNeed, node: Node) -> str | None:
    """Why the pod cannot go to this node regardless of free capacity, or None."""
    if not node.ready:
        return "not Ready"
    if node.unschedulable:
        return "cordoned"
    for k, v in need.node_selector.items():
        if node.labels.get(k) != v:
            return f"label {k}={node.labels.get(k, '<none>')}, not {v}"
    for taint in node.taints:
        if not tolerates(need.tolerations, taint):
            return f"taint {taint.get('key')}={taint.get('value', '')}:{taint.get('effect')} not tolerated"
    return None


def place(needs: list[PodNeed], nodes: list[Node]) -> dict[int, Node | None]:
    """First-fit-decreasing with best fit (the node left with the fewest free GPUs, then CPUs)."""
    gpu_names = {k for n in needs for k in n.requests if is_gpu(k)}
    order = sorted(range(len(needs)), key=lambda i: (-sum(needs[i].requests.get(g, 0) for g in gpu_names),
                                                     -needs[i].requests.get("memory", 0)))
    result: dict[int, Node | None] = {}
    for i in order:
        need = needs[i]
        fits = [n for n in nodes if eligible(need, n) is None
                and all(n.free(k) >= v for k, v in need.requests.items() if v > 0)]
        best = min(fits, key=lambda n: (sum(n.free(g) for g in gpu_names), n.free("cpu"), n.name), default=None)
        if best is not None:
            for k, v in need.requests.items():
                best.used[k] = best.used.get(k, Decimal(0)) + v
            best.placed.append(need.label)
        result[i] = best
    return result


def why_not(need: PodNeed, nodes: list[Node]) -> str:
    candidates = [n for n in nodes if eligible(need, n) is None]
    if not candidates:
        if need.node_selector:
            sel = ",".join(f"{k}={v}" for k, v in need.node_selector.items())
            matching = [n for n in nodes if all(n.labels.get(k) == v for k, v in need.node_selector.items())]
            if not matching:
                return f"no node has the labels {sel}"
            reasons = sorted({eligible(need, n) for n in matching})
            return f"the {len(matching)} node(s) labelled {sel} are not usable: {'; '.join(reasons)}"
        reasons = sorted({eligible(need, n) for n in nodes})
        return f"no usable node ({'; '.join(reasons) or 'the cluster has no nodes'})"
    short = []
    for k, v in sorted(need.requests.items(), key=lambda kv: (not is_gpu(kv[0]), kv[0])):
        if v > 0 and not any(n.free(k) >= v for n in candidates):
            most = max(candidates, key=lambda n: n.free(k))
            have = max(most.free(k), Decimal(0))
            if have > 0:
                short.append(f"{fmt_res(k, v)} needed, at most {fmt_res(k, have)} free (node {most.name})")
            else:
                short.append(f"{fmt_res(k, v)} needed, none free on the {len(candidates)} node(s) it may use")
    if short:
        return "; ".join(short)
    return "no single node has all of it free at once"


# ---- manifests -------------------------------------------------------------------------------------------------------
def render_chart(args, kube_version: str | None, api_versions: list[str]) -> tuple[str, str]:
    helm = args.helm or os.environ.get("M1SERVE_HELM") or shutil.which("helm")
    chart = Path(args.chart) if args.chart else CHART_DIR
    if not helm:
        raise UsageError("helm not found: install helm, pass --helm PATH, or render the chart yourself:\n"
                         "  helm template NAME deploy/helm/m1serve -f VALUES | m1serve k8s preflight --manifest -")
    if not (chart / "Chart.yaml").exists():
        raise UsageError(f"chart not found at {chart}: pass --chart DIR (deploy/helm/m1serve of the repository)")
    cmd = [helm, "template", args.release, str(chart), "--namespace", args.namespace_resolved]
    for f in args.values:
        cmd += ["-f", f]
    for s in args.set:
        cmd += ["--set", s]
    if kube_version:
        cmd += ["--kube-version", kube_version]
    for v in api_versions:
        cmd += ["--api-versions", v]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UsageError(f"running {helm}: {e}") from None
    if proc.returncode:
        raise UsageError(f"helm template failed:\n{proc.stderr.strip()}")
    shown = " ".join(["helm template", args.release, str(chart)] + [f"-f {f}" for f in args.values]
                     + [f"--set {s}" for s in args.set])
    return proc.stdout, shown


def load_manifest(text: str, source: str) -> list[dict]:
    import yaml

    try:
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when there: rendered charts are long
        docs = [d for d in yaml.load_all(text, Loader=loader) if isinstance(d, dict)]
    except yaml.YAMLError as e:
        raise UsageError(f"{source}: not valid YAML: {e}") from None
    return docs


def find_rayservice(docs: list[dict], source: str) -> dict:
    found = [d for d in docs if d.get("kind") == "RayService"]
    if len(found) != 1:
        raise UsageError(f"{source}: expected one RayService, found {len(found)}")
    return found[0]


def referenced(docs: list[dict], rayservice: dict) -> tuple[set[str], set[tuple[str, str | None]]]:
    """(PVC claim names, (secret, key)) used by the RayService's pods and the chart's other pods."""
    claims, secrets = set(), set()
    cluster = (rayservice.get("spec") or {}).get("rayClusterConfig") or {}
    specs = [(cluster.get("headGroupSpec") or {}).get("template", {}).get("spec", {})]
    specs += [g.get("template", {}).get("spec", {}) for g in cluster.get("workerGroupSpecs") or []]
    specs += [d.get("spec", {}) for d in docs if d.get("kind") == "Pod"]
    for spec in specs:
        for vol in spec.get("volumes") or []:
            if "persistentVolumeClaim" in vol:
                claims.add(vol["persistentVolumeClaim"]["claimName"])
        for ref in spec.get("imagePullSecrets") or []:
            secrets.add((ref["name"], None))
        for c in (spec.get("containers") or []) + (spec.get("initContainers") or []):
            for env in c.get("env") or []:
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if ref and not ref.get("optional"):
                    secrets.add((ref["name"], ref.get("key")))
    return claims, secrets


# ---- preflight -------------------------------------------------------------------------------------------------------
def cmd_preflight(args) -> int:
    rep = Report()
    try:
        if args.manifest and (args.values or args.set):
            raise UsageError("--manifest and -f/--set exclude each other (the manifest is already rendered)")
        manifest_text = None
        if args.manifest:
            try:
                manifest_text = sys.stdin.read() if args.manifest == "-" else Path(args.manifest).read_text()
            except OSError as e:
                raise UsageError(f"--manifest: {e}") from None
        for f in args.values:
            if not Path(f).is_file():
                raise UsageError(f"values file not found: {f}")
        kube = connect(args)
        args.namespace_resolved = kube.namespace
        version = kube.server_version()
        rep.line(f"m1serve k8s preflight: {kube.host} (Kubernetes {version}), namespace {kube.namespace}")

        ray_resources = kube.api_resources(f"{RAY_GROUP}/{RAY_VERSION}") or set()
        monitoring = kube.api_resources(MONITORING)
        if manifest_text is None:
            m = re.match(r"v?(\d+\.\d+\.\d+)", version)
            kube_version = m.group(1) if m else None
            api_versions = [MONITORING] if monitoring and "podmonitors" in monitoring else []
            manifest_text, source = render_chart(args, kube_version, api_versions)
        else:
            source = "stdin" if args.manifest == "-" else args.manifest
        docs = load_manifest(manifest_text, source)
        rayservice = find_rayservice(docs, source)
        needs = pod_needs(rayservice, args.gpu_product)
        rep.line(f"manifest: {source} -> RayService {rayservice['metadata'].get('name', '?')}")

        # KubeRay
        missing = [p for p in RAY_PLURALS if p not in ray_resources]
        if missing:
            rep.fail(f"KubeRay API {RAY_GROUP}/{RAY_VERSION} lacks {', '.join(missing)}: install the KubeRay operator "
                     f"and its CRDs (helm install kuberay-operator kuberay/kuberay-operator)")
        else:
            rep.ok(f"KubeRay API {RAY_GROUP}/{RAY_VERSION}: {', '.join(RAY_PLURALS)}")
        check_operator(kube, rep)
        wants_monitors = any(d.get("kind") == "PodMonitor" for d in docs)
        if monitoring and "podmonitors" in monitoring:
            rep.ok(f"{MONITORING} PodMonitor served" + ("" if wants_monitors else " (the manifest has no PodMonitor)"))
        elif wants_monitors:
            rep.fail(f"the manifest has PodMonitors but {MONITORING} is not served: render without them")
        else:
            rep.info(f"{MONITORING} not served: no PodMonitors (Ray metrics are still on the `metrics` port)")

        # namespace, claims, secrets
        ns = kube.call(kube.core.read_namespace, kube.namespace, missing_ok=True, forbidden_ok=True)
        if ns is None:
            rep.warn(f"namespace {kube.namespace} does not exist yet (helm install --create-namespace)")
        elif ns != "forbidden":
            rep.ok(f"namespace {kube.namespace}")
        claims, secrets = referenced(docs, rayservice)
        created = {d["metadata"]["name"] for d in docs if d.get("kind") == "PersistentVolumeClaim"}
        for claim in sorted(claims):
            check_claim(kube, rep, claim, claim in created, len(needs))
        for name, key in sorted(secrets, key=lambda s: (s[0], s[1] or "")):
            check_secret(kube, rep, name, key)

        # capacity
        nodes = read_nodes(kube)
        counted = add_running_pods(kube, nodes)
        if not counted:
            rep.warn("may not list pods: free capacity assumes nothing else runs (allocatable only)")
        check_capacity(rep, needs, nodes)
    except UsageError as e:
        rep.line(f"error: {e}")
        return EXIT_ERROR
    return summary(rep)


def check_operator(kube: Kube, rep: Report) -> None:
    doc = kube.call(kube.apps.list_deployment_for_all_namespaces, forbidden_ok=True,
                    label_selector="app.kubernetes.io/name=kuberay-operator")
    if doc == "forbidden":
        rep.info("KubeRay operator: may not list deployments, not checked")
        return
    items = doc.get("items", [])
    if not items:
        rep.warn("no KubeRay operator Deployment (label app.kubernetes.io/name=kuberay-operator) found")
        return
    for d in items:
        meta, status = d["metadata"], d.get("status") or {}
        want, ready = (d.get("spec") or {}).get("replicas", 1), status.get("readyReplicas", 0) or 0
        containers = (d.get("spec") or {}).get("template", {}).get("spec", {}).get("containers") or [{}]
        image = containers[0].get("image", "?")
        text = f"KubeRay operator {meta.get('namespace')}/{meta.get('name')} ({image}): {ready}/{want} ready"
        (rep.ok if ready >= 1 else rep.fail)(text)


def check_claim(kube: Kube, rep: Report, claim: str, created: bool, pods: int) -> None:
    if created:
        rep.ok(f"PersistentVolumeClaim {claim}: created by the chart (fill it with the checkpoint)")
        return
    pvc = kube.call(kube.core.read_namespaced_persistent_volume_claim, claim, kube.namespace,
                    missing_ok=True, forbidden_ok=True)
    if pvc is None:
        rep.fail(f"PersistentVolumeClaim {kube.namespace}/{claim} (the weights) does not exist")
    elif pvc == "forbidden":
        rep.info(f"PersistentVolumeClaim {claim}: may not read it, not checked")
    else:
        phase = (pvc.get("status") or {}).get("phase", "?")
        modes = (pvc.get("spec") or {}).get("accessModes") or []
        text = f"PersistentVolumeClaim {kube.namespace}/{claim}: {phase}, {', '.join(modes) or 'no access modes'}"
        if phase == "Lost":
            rep.fail(text)
        elif set(modes) <= {"ReadWriteOnce", "ReadWriteOncePod"} and pods > 1:
            rep.warn(text + f": {pods} pods mount it, so they all must run on one node (use ReadOnlyMany)")
        elif phase != "Bound":
            rep.warn(text + " (binds when the first pod is scheduled, if the storage class waits for a consumer)")
        else:
            rep.ok(text)


def check_secret(kube: Kube, rep: Report, name: str, key: str | None) -> None:
    secret = kube.call(kube.core.read_namespaced_secret, name, kube.namespace, missing_ok=True, forbidden_ok=True)
    what = f"Secret {kube.namespace}/{name}" + (f" key {key}" if key else "")
    if secret is None:
        rep.fail(f"{what}: the Secret does not exist")
    elif secret == "forbidden":
        rep.info(f"{what}: may not read Secrets, not checked")
    elif key and key not in (secret.get("data") or {}) and key not in (secret.get("stringData") or {}):
        rep.fail(f"{what}: the Secret has no such key (has: {', '.join(sorted(secret.get('data') or {})) or 'none'})")
    else:
        rep.ok(what)


def check_capacity(rep: Report, needs: list[PodNeed], nodes: list[Node]) -> None:
    gpu_names = {k for n in needs for k, v in n.requests.items() if is_gpu(k) and v > 0}
    for g in sorted(gpu_names):
        total = sum((n.requests.get(g, Decimal(0)) for n in needs), Decimal(0))
        parts = []
        for group in dict.fromkeys(n.group for n in needs):
            members = [n for n in needs if n.group == group and n.requests.get(g, 0) > 0]
            if members:
                parts.append(f"{group} {len(members)} x {members[0].requests[g].normalize():f}")
        usable = [n for n in nodes if n.schedulable]
        rep.line(f"{g}: the manifest needs {total.normalize():f} ({', '.join(parts)}); schedulable nodes have "
                 f"{sum((n.allocatable.get(g, Decimal(0)) for n in usable), Decimal(0)).normalize():f} allocatable, "
                 f"{sum((max(n.free(g), Decimal(0)) for n in usable), Decimal(0)).normalize():f} free")
    placement = place(needs, nodes)
    for i, need in enumerate(needs):
        node = placement[i]
        what = f"{need.label} ({need.describe(gpu_names)})"
        if node is not None:
            rep.ok(f"{what}: fits on {node.name}" + ("" if not need.has_affinity else " (affinity not evaluated)"))
        else:
            rep.fail(f"{what}: does not fit: {why_not(need, nodes)}")
    gpu_nodes = [n for n in nodes if any(is_gpu(k) and v > 0 for k, v in n.allocatable.items())]
    if gpu_nodes:
        rep.line("GPU nodes (free = after the running pods" + (" and the placement above):" if needs else "):"))
        for n in sorted(gpu_nodes, key=lambda n: n.name):
            gpus = ", ".join(f"{n.allocatable[k].normalize():f} {k} ({max(n.free(k), Decimal(0)).normalize():f} free)"
                             for k in sorted(n.allocatable) if is_gpu(k) and n.allocatable[k] > 0)
            state = "" if n.schedulable else (" [not Ready]" if not n.ready else " [cordoned]")
            rep.info(f"{n.name:<24} {n.labels.get(GPU_PRODUCT_LABEL, '(no ' + GPU_PRODUCT_LABEL + ' label)'):<28} "
                     f"{gpus}{state}" + (f"  <- {', '.join(n.placed)}" if n.placed else ""))
    elif gpu_names:
        rep.line("GPU nodes: none (no node has allocatable " + ", ".join(sorted(gpu_names))
                 + "; is the NVIDIA device plugin / GPU operator installed?)")


def summary(rep: Report, good: str = "ready to install", bad: str = "problem") -> int:
    if rep.problems:
        rep.line(f"result: {rep.problems} {bad}{'s' if rep.problems > 1 else ''} (exit {EXIT_PROBLEMS})")
        return EXIT_PROBLEMS
    rep.line(f"result: {good}" + (f", {rep.warnings} warning(s)" if rep.warnings else "") + f" (exit {EXIT_OK})")
    return EXIT_OK


# ---- status ----------------------------------------------------------------------------------------------------------
def find_rayservice_in_cluster(kube: Kube, name: str | None) -> dict | None:
    get = kube.custom.get_namespaced_custom_object
    if name:
        return kube.call(get, RAY_GROUP, RAY_VERSION, kube.namespace, "rayservices", name, missing_ok=True)
    doc = kube.call(kube.custom.list_namespaced_custom_object, RAY_GROUP, RAY_VERSION, kube.namespace, "rayservices",
                    label_selector=CHART_LABEL, missing_ok=True)
    items = (doc or {}).get("items", [])
    if len(items) > 1:
        names = ", ".join(i["metadata"]["name"] for i in items)
        raise UsageError(f"several m1serve RayServices in namespace {kube.namespace} ({names}): name one")
    return items[0] if items else None


def status_report(kube: Kube, rs: dict, rep: Report) -> None:
    meta, spec, st = rs.get("metadata", {}), rs.get("spec", {}), rs.get("status") or {}
    name = meta.get("name", "?")
    rep.line(f"RayService {kube.namespace}/{name}: generation {meta.get('generation', '?')}, "
             f"observed {st.get('observedGeneration', '?')}")
    conditions = {c.get("type"): c for c in st.get("conditions") or []}
    ready_cond = conditions.get("Ready")
    if ready_cond is not None:
        for c in st.get("conditions") or []:
            text = f"condition {c.get('type')}={c.get('status')} ({c.get('reason', '')}): {c.get('message', '')}"
            if c.get("type") == "Ready" and c.get("status") != "True":
                rep.fail(text)
            else:
                rep.info(text)
        if ready_cond.get("status") == "True":
            rep.ok("Ready")
    elif st.get("serviceStatus") == "Running":
        rep.ok("serviceStatus Running")
    else:
        rep.fail(f"not ready: serviceStatus {st.get('serviceStatus') or '(none yet)'}")

    app_names = [a.get("name") for a in _serve_apps(spec)]
    for which in ("activeServiceStatus", "pendingServiceStatus"):
        svc = st.get(which) or {}
        cluster = svc.get("rayClusterName")
        if not cluster:
            if which == "activeServiceStatus":
                rep.fail("no active RayCluster serving yet")
            continue
        label = "active" if which == "activeServiceStatus" else \
            ("pending (upgrade)" if (st.get("activeServiceStatus") or {}).get("rayClusterName") else "pending")
        cst = svc.get("rayClusterStatus") or {}
        rep.line(f"{label} RayCluster {cluster}: state {cst.get('state', '?')}, worker pods ready "
                 f"{cst.get('readyWorkerReplicas', '?')}/{cst.get('desiredWorkerReplicas', '?')}"
                 + (f", desired GPUs {cst['desiredGPU']}" if cst.get("desiredGPU") not in (None, "0", 0) else ""))
        apps = svc.get("applicationStatuses") or {}
        for app in app_names or sorted(apps):
            a = apps.get(app)
            if a is None:
                (rep.fail if which == "activeServiceStatus" else rep.info)(f"application {app}: no status yet")
                continue
            text = f"application {app}: {a.get('status', '?')}" + (f": {a['message']}" if a.get("message") else "")
            if a.get("status") == "RUNNING":
                rep.ok(text)
            elif which == "activeServiceStatus":
                rep.fail(text)
            else:
                rep.info(text)
            deployments = (a.get("serveDeploymentStatuses") or {}).items()
            for dep, d in sorted(deployments, key=lambda kv: (kv[0] != "Router", _natural(kv[0]))):
                text = f"  {dep}: {d.get('status', '?')}" + (f": {d['message']}" if d.get("message") else "")
                if d.get("status") == "HEALTHY":
                    rep.info(text)
                elif which == "activeServiceStatus":
                    rep.fail(text)
                else:
                    rep.info(text)
        pods_report(kube, rep, cluster)

    n = st.get("numServeEndpoints") or 0
    (rep.ok if n > 0 else rep.fail)(f"serve endpoints: {n}")
    service_report(kube, rep, spec, name)


def _serve_apps(spec: dict) -> list[dict]:
    import yaml

    try:
        cfg = yaml.safe_load(spec.get("serveConfigV2") or "") or {}
        return [a for a in cfg.get("applications") or [] if isinstance(a, dict)]
    except yaml.YAMLError:
        return []


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def pods_report(kube: Kube, rep: Report, cluster: str) -> None:
    doc = kube.call(kube.core.list_namespaced_pod, kube.namespace, label_selector=f"ray.io/cluster={cluster}",
                    forbidden_ok=True)
    if doc == "forbidden":
        rep.info("pods: may not list pods, not shown")
        return
    groups: dict[str, list[dict]] = {}
    for p in doc.get("items", []):
        labels = p.get("metadata", {}).get("labels") or {}
        group = "head" if labels.get("ray.io/node-type") == "head" else labels.get("ray.io/group", "?")
        groups.setdefault(group, []).append(p)
    if not groups:
        rep.info(f"pods of {cluster}: none yet")
        return
    parts = []
    for group in sorted(groups, key=lambda g: (g != "head", g)):
        pods = groups[group]
        ready = [p for p in pods if _pod_ready(p)]
        parts.append(f"{group} {len(ready)}/{len(pods)}")
    rep.info(f"pods ready: {', '.join(parts)}")
    for group in sorted(groups):
        for p in groups[group]:
            if not _pod_ready(p):
                rep.info(f"  pod {p['metadata']['name']} not ready: {_pod_reason(p)}")


def _pod_ready(p: dict) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (p.get("status") or {}).get("conditions") or [])


def _pod_reason(p: dict) -> str:
    st = p.get("status") or {}
    for c in st.get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False":
            return f"{c.get('reason', 'unscheduled')}: {c.get('message', '')}".strip()
    for cs in (st.get("initContainerStatuses") or []) + (st.get("containerStatuses") or []):
        state = cs.get("state") or {}
        for kind in ("waiting", "terminated"):
            if kind in state and state[kind].get("reason") not in (None, "Completed"):
                msg = state[kind].get("message", "")
                return f"{cs.get('name')} {kind}: {state[kind].get('reason')}" + (f" ({msg[:200]})" if msg else "")
    return st.get("phase", "unknown")


def service_report(kube: Kube, rep: Report, spec: dict, name: str) -> None:
    svc_name = ((spec.get("serveService") or {}).get("metadata") or {}).get("name") or f"{name}-serve-svc"
    svc = kube.call(kube.core.read_namespaced_service, svc_name, kube.namespace, missing_ok=True, forbidden_ok=True)
    if svc is None:
        rep.fail(f"Service {svc_name}: not created yet (KubeRay creates it once the app runs)")
        return
    if svc == "forbidden":
        rep.info(f"Service {svc_name}: may not read it")
        return
    sspec = svc.get("spec") or {}
    ports = {p.get("name"): p for p in sspec.get("ports") or []}
    slices = kube.call(kube.discovery.list_namespaced_endpoint_slice, kube.namespace, forbidden_ok=True,
                       label_selector=f"kubernetes.io/service-name={svc_name}")
    ready = None
    if slices != "forbidden":
        ready = sum(1 for s in slices.get("items", []) for e in s.get("endpoints") or []
                    if (e.get("conditions") or {}).get("ready", True))
    port_text = ", ".join(f"{n} {p.get('port')}" for n, p in ports.items())
    text = f"Service {svc_name} ({sspec.get('type', 'ClusterIP')} {sspec.get('clusterIP', '')}): {port_text}" \
        + ("" if ready is None else f"; {ready} ready endpoint(s)")
    (rep.ok if ready != 0 else rep.fail)(text)
    host = f"{svc_name}.{kube.namespace}.svc"
    ingress = ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    lb = [i.get("ip") or i.get("hostname") for i in ingress]
    http, grpc = ports.get("http", {}).get("port", 8000), ports.get("grpc", {}).get("port", 9000)
    rep.info(f"OpenAI HTTP  http://{host}:{http}/v1" + (f"  (external: http://{lb[0]}:{http}/v1)" if lb else ""))
    if "grpc" in ports:
        rep.info(f"gRPC         {host}:{grpc}" + (f"  (external: {lb[0]}:{grpc})" if lb else ""))
    rep.info(f"from here    kubectl port-forward -n {kube.namespace} svc/{svc_name} 8000:{http} 9000:{grpc}")


def cmd_status(args) -> int:
    try:
        kube = connect(args)
        deadline = time.monotonic() + max(args.wait, 0)
        while True:
            rs = find_rayservice_in_cluster(kube, args.name)
            rep = Report(out=_Buffer())
            if rs is None:
                what = f"RayService {args.name}" if args.name else f"RayService labelled {CHART_LABEL}"
                rep.fail(f"no {what} in namespace {kube.namespace}")
            else:
                status_report(kube, rs, rep)
            if rep.problems == 0 or time.monotonic() >= deadline:
                break
            time.sleep(min(args.interval, max(deadline - time.monotonic(), 0.1)))
        print(f"m1serve k8s status: {kube.host}, namespace {kube.namespace}")
        sys.stdout.write(rep.out.text())
        rep.out = None
        return summary(rep, good="ready", bad="problem")
    except UsageError as e:
        print(f"error: {e}")
        return EXIT_ERROR


class _Buffer:
    """Holds one status pass so that --wait prints only the last one."""

    def __init__(self):
        self.parts: list[str] = []

    def write(self, s: str) -> None:
        self.parts.append(s)

    def flush(self) -> None:
        pass

    def text(self) -> str:
        return "".join(self.parts)


# ---- the command line ------------------------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--namespace", help="namespace (default: the kubeconfig context's, else default)")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster)")
    p.add_argument("--context", help="kubeconfig context (default: the current one)")


def add_k8s_parser(subparsers) -> None:
    """Registers `k8s preflight` and `k8s status` on an argparse subparsers object (cluster/cli.py)."""
    k8s = subparsers.add_parser("k8s", help="check a Kubernetes cluster for the chart; show a RayService's status",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = k8s.add_subparsers(dest="k8s_command", required=True)

    p = sub.add_parser("preflight", help="KubeRay, GPUs of the requested kind, claims and secrets, before helm install")
    _common(p)
    p.add_argument("-f", "--values", action="append", default=[], metavar="FILE",
                   help="chart values file, as for helm install (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="chart value, as for helm install")
    p.add_argument("--release", default="m1serve", help="release name to render with (default: m1serve)")
    p.add_argument("--chart", help=f"chart directory (default: {CHART_DIR})")
    p.add_argument("--helm", help="helm binary (default: $M1SERVE_HELM, else helm on PATH)")
    p.add_argument("--manifest", metavar="FILE",
                   help="an already rendered manifest (helm template ... > FILE; - for stdin) instead of -f/--set")
    p.add_argument("--gpu-product", metavar="PRODUCT",
                   help=f"require this {GPU_PRODUCT_LABEL} node label for the GPU pods, e.g. NVIDIA-H100-80GB-HBM3")
    p.set_defaults(func=cmd_preflight)

    p = sub.add_parser("status", help="RayService conditions, Serve app and deployments, pods, endpoints")
    _common(p)
    p.add_argument("name", nargs="?", help=f"RayService name (default: the one labelled {CHART_LABEL})")
    p.add_argument("--wait", type=float, default=0, metavar="SECONDS", help="poll until ready or this much time passed")
    p.add_argument("--interval", type=float, default=5, metavar="SECONDS", help="poll interval with --wait")
    p.set_defaults(func=cmd_status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="m1serve")
    add_k8s_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["k8s", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
