"""`m1serve k8s preflight | status` (cluster/k8s.py) against a fake Kubernetes API on loopback (tests/k8s_tools.py)
holding realistic objects: nodes with and without GPUs, the KubeRay operator, claims and secrets, and RayServices
whose spec is the chart rendered by the real helm and whose status is what KubeRay writes (checked against the
CRD schema), ready and not ready. The fake objects themselves pass the kubernetes client's strict models."""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from k8s_tools import (CHART, KUBE_VERSION, RESOURCES, ROOT, FakeKube, client_model,  # noqa: E402
                       ensure_helm, helm_env, rayservice_validator, validation_errors)

from cluster import k8s  # noqa: E402

NS = "llm"
H100 = "NVIDIA-H100-80GB-HBM3"
T0 = "2026-11-27T08:00:00Z"
H100_VALUES = str(CHART / "values-minimax-m1-h100-int8.yaml")
H200_VALUES = str(CHART / "values-minimax-m1-h200-bf16.yaml")
DEMO_VALUES = str(CHART / "values-cpu-demo.yaml")


# ---- realistic objects -----------------------------------------------------------------------------------------------
def node(name: str, cpu: str, memory: str, gpus: int = 0, product: str = H100, ready: bool = True,
         cordoned: bool = False) -> dict:
    labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
              "node.kubernetes.io/instance-type": "p5.48xlarge" if gpus else "m6i.4xlarge",
              "topology.kubernetes.io/zone": "us-east-1a"}
    allocatable = {"cpu": cpu, "memory": memory, "pods": "110", "ephemeral-storage": "1844284696Ki",
                   "hugepages-1Gi": "0", "hugepages-2Mi": "0"}
    spec: dict = {"podCIDR": "10.244.1.0/24", "providerID": f"aws:///us-east-1a/i-{abs(hash(name)) % 10**12:012d}"}
    if gpus:
        labels.update({"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": product,
                       "nvidia.com/gpu.count": str(gpus), "nvidia.com/gpu.memory": "81559"})
        allocatable["nvidia.com/gpu"] = str(gpus)
        spec["taints"] = [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
    if cordoned:
        spec["unschedulable"] = True
        spec.setdefault("taints", []).append({"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule",
                                              "timeAdded": T0})
    cond = lambda t, s, r, m: {"type": t, "status": s, "reason": r, "message": m,  # noqa: E731
                               "lastHeartbeatTime": T0, "lastTransitionTime": T0}
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": labels,
                     "annotations": {"node.alpha.kubernetes.io/ttl": "0",
                                     "volumes.kubernetes.io/controller-managed-attach-detach": "true"}},
        "spec": spec,
        "status": {
            "capacity": dict(allocatable), "allocatable": allocatable,
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory",
                     "kubelet has sufficient memory available"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                cond("Ready", "True", "KubeletReady", "kubelet is posting ready status") if ready else
                cond("Ready", "Unknown", "NodeStatusUnknown", "Kubelet stopped posting node status.")],
            "addresses": [{"type": "InternalIP", "address": f"10.0.{len(name)}.{sum(map(ord, name)) % 250}"},
                          {"type": "Hostname", "address": name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {"machineID": "ec2" + "0" * 29, "systemUUID": "ec2" + "1" * 33, "bootID": "b" * 36,
                         "kernelVersion": "6.1.112-124.190.amzn2023.x86_64", "osImage": "Amazon Linux 2023",
                         "containerRuntimeVersion": "containerd://1.7.23", "kubeletVersion": "v1.32.3-eks",
                         "kubeProxyVersion": "v1.32.3-eks", "operatingSystem": "linux", "architecture": "amd64"},
        },
    }


def pod(name: str, namespace: str, node_name: str | None, requests: dict, labels: dict | None = None,
        ready: bool = True, phase: str = "Running", waiting: tuple[str, str] | None = None,
        unschedulable: str | None = None) -> dict:
    conditions = [{"type": "PodScheduled", "status": "True", "lastTransitionTime": T0}]
    if unschedulable:
        conditions = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                       "message": unschedulable, "lastTransitionTime": T0}]
    else:
        conditions += [{"type": "Initialized", "status": "True", "lastTransitionTime": T0},
                       {"type": "ContainersReady", "status": str(ready), "lastTransitionTime": T0},
                       {"type": "Ready", "status": str(ready), "lastTransitionTime": T0}]
    status = {"phase": phase, "conditions": conditions, "qosClass": "Guaranteed"}
    if node_name:
        state = ({"waiting": {"reason": waiting[0], "message": waiting[1]}} if waiting
                 else {"running": {"startedAt": T0}})
        status.update(hostIP="10.0.1.10", podIP="10.244.1.23", startTime=T0, containerStatuses=[{
            "name": "main", "ready": ready, "restartCount": 0, "image": "m1serve:0.1.0",
            "imageID": "", "started": waiting is None, "state": state}])
    spec = {"containers": [{"name": "main", "image": "m1serve:0.1.0",
                            "resources": {"requests": requests, "limits": requests}}],
            "restartPolicy": "Always", "schedulerName": "default-scheduler", "serviceAccountName": "default"}
    if node_name:
        spec["nodeName"] = node_name
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels or {"app": name}},
            "spec": spec, "status": status}


def kuberay_operator(ready: int = 1) -> dict:
    labels = {"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/instance": "kuberay-operator"}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "kuberay-operator", "namespace": "kuberay-system", "generation": 1,
                     "labels": {**labels, "helm.sh/chart": "kuberay-operator-1.7.0"}},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels}, "spec": {
                     "serviceAccountName": "kuberay-operator",
                     "containers": [{"name": "kuberay-operator", "image": "quay.io/kuberay/operator:v1.7.0",
                                     "command": ["/manager"],
                                     "args": ["--feature-gates=RayServiceIncrementalUpgrade=true"],
                                     "resources": {"requests": {"cpu": "100m", "memory": "512Mi"},
                                                   "limits": {"cpu": "100m", "memory": "512Mi"}}}]}}},
        "status": {"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "readyReplicas": ready,
                   "availableReplicas": ready,
                   "conditions": [{"type": "Available", "status": "True" if ready else "False",
                                   "reason": "MinimumReplicasAvailable" if ready else "MinimumReplicasUnavailable",
                                   "message": "Deployment has minimum availability.", "lastUpdateTime": T0,
                                   "lastTransitionTime": T0}]},
    }


def pvc(name: str, modes=("ReadOnlyMany",), phase: str = "Bound") -> dict:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"accessModes": list(modes), "resources": {"requests": {"storage": "1Ti"}},
                     "storageClassName": "fsx-lustre", "volumeMode": "Filesystem",
                     **({"volumeName": "pvc-5d1c"} if phase == "Bound" else {})},
            "status": {"phase": phase, **({"accessModes": list(modes), "capacity": {"storage": "1200Gi"}}
                                          if phase == "Bound" else {})}}


def secret(name: str, keys=("api-key",)) -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NS}, "type": "Opaque",
            "data": {k: "czNjcmV0" for k in keys}}


def namespace(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}},
            "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}


def gpu_cluster(gpu_nodes: int = 2, used_gpus: tuple[int, ...] = (), served=None, operator=True) -> FakeKube:
    fake = FakeKube(served=served)
    fake.add(namespace(NS), namespace("kuberay-system"), node("cpu-1", "15890m", "63518332Ki"),
             pvc("minimax-m1-80k"))
    for i in range(gpu_nodes):
        fake.add(node(f"gpu-{'ab'[i]}", "191450m", "2013478236Ki", gpus=8))
    for i, used in enumerate(used_gpus):
        if used:
            fake.add(pod(f"trainer-{i}", "research", f"gpu-{'ab'[i]}",
                         {"cpu": "16", "memory": "128Gi", "nvidia.com/gpu": str(used)}))
    fake.add(pod("coredns-6d4b", "kube-system", "cpu-1", {"cpu": "100m", "memory": "70Mi"}),
             pod("finished-job", "research", "gpu-a", {"cpu": "1", "memory": "1Gi", "nvidia.com/gpu": "8"},
                 phase="Succeeded", ready=False))
    if operator:
        fake.add(kuberay_operator())
    return fake


def cpu_cluster() -> FakeKube:
    fake = FakeKube(served=tuple({gv for gv, _ in RESOURCES} - {"monitoring.coreos.com/v1"}))
    return fake.add(namespace(NS), node("cpu-1", "15890m", "63518332Ki"), node("cpu-2", "15890m", "63518332Ki"),
                    kuberay_operator(), pvc("m1serve-weights"))


# ---- the RayService: the chart's spec + a KubeRay status ------------------------------------------------------------
@pytest.fixture(scope="session")
def helm_bin():
    try:
        return ensure_helm()
    except RuntimeError as e:
        pytest.fail(f"could not obtain helm: {e}")


@pytest.fixture(scope="session")
def helm_run(helm_bin, tmp_path_factory):
    env = helm_env(tmp_path_factory.mktemp("helm-home"))

    def run(*args):
        proc = subprocess.run([str(helm_bin), *args], capture_output=True, text=True, env=env, timeout=120,
                              check=True)
        return proc.stdout

    return run


@pytest.fixture(scope="session")
def chart_rayservice(helm_run):
    out = helm_run("template", "m1", str(CHART), "-n", NS, "--kube-version", KUBE_VERSION, "-f", H100_VALUES)
    (rs,) = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "RayService"]
    return rs


@pytest.fixture(scope="session")
def crd_validator():
    return rayservice_validator()


CLUSTER = "m1-m1serve-x7k2p"
PENDING = "m1-m1serve-b9q4t"


def _cond(type_, status, reason, message):
    return {"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": T0,
            "observedGeneration": 1}


def _cluster_status(state: str | None, ready_workers: int, desired: int = 2) -> dict:
    out = {"desiredWorkerReplicas": desired, "availableWorkerReplicas": ready_workers,
           "readyWorkerReplicas": ready_workers, "minWorkerReplicas": desired, "maxWorkerReplicas": desired,
           "desiredCPU": "84", "desiredMemory": "1232Gi", "desiredGPU": "9", "desiredTPU": "0",
           "observedGeneration": 1, "lastUpdateTime": T0,
           "head": {"podName": f"{CLUSTER}-head-7xq2d", "podIP": "10.244.2.11",
                    "serviceName": f"{CLUSTER}-head-svc", "serviceIP": "10.96.12.7"},
           "endpoints": {"client": "10001", "dashboard": "8265", "gcs-server": "6379", "metrics": "8080",
                         "serve": "8000"}}
    if state:
        out["state"] = state
    out["conditions"] = [_cond("HeadPodReady", "True", "HeadPodRunningAndReady", ""),
                         _cond("RayClusterProvisioned", "True" if ready_workers == desired else "False",
                               "AllPodRunningAndReadyFirstTime" if ready_workers == desired
                               else "RayClusterPodsProvisioning", "")]
    return out


def ready_status(shards: int = 8) -> dict:
    deployments = {"Router": {"status": "HEALTHY"}}
    deployments.update({f"ExpertShard{i}": {"status": "HEALTHY"} for i in range(shards)})
    return {
        "conditions": [_cond("Ready", "True", "NonZeroServeEndpoints", "Number of serve endpoints is greater than 0"),
                       _cond("UpgradeInProgress", "False", "NoPendingCluster",
                             "Active Ray cluster exists and no pending Ray cluster")],
        "activeServiceStatus": {"rayClusterName": CLUSTER, "rayClusterStatus": _cluster_status("ready", 2),
                                "applicationStatuses": {"m1serve": {"status": "RUNNING",
                                                                    "serveDeploymentStatuses": deployments}}},
        "pendingServiceStatus": {},
        "numServeEndpoints": 2, "observedGeneration": 1, "serviceStatus": "Running", "lastUpdateTime": T0,
    }


def initializing_status() -> dict:
    unscheduled = ("Deployment 'ExpertShard3' in application 'm1serve' has 1 replicas that have taken more than 30s "
                   "to be scheduled. Resources required for each replica: {\"CPU\": 4.0, \"GPU\": 1.0, "
                   "\"m1serve_shard\": 1.0}, total resources available: {}. Use `ray status` for more details.")
    deployments = {"Router": {"status": "UPDATING", "message": "Deploying new version."}}
    deployments.update({f"ExpertShard{i}": {"status": "UPDATING", "message": unscheduled if i == 3 else ""}
                        for i in range(8)})
    return {
        "conditions": [_cond("Ready", "False", "Initializing", "RayService is initializing"),
                       _cond("UpgradeInProgress", "False", "NoActiveCluster",
                             "The RayService has no active Ray cluster")],
        "activeServiceStatus": {},
        "pendingServiceStatus": {"rayClusterName": CLUSTER, "rayClusterStatus": _cluster_status(None, 1),
                                 "applicationStatuses": {"m1serve": {"status": "DEPLOYING",
                                                                     "serveDeploymentStatuses": deployments}}},
        "numServeEndpoints": 0, "observedGeneration": 1, "lastUpdateTime": T0,
    }


def rayservice(spec_from: dict, status: dict, name: str = "m1-m1serve") -> dict:
    rs = copy.deepcopy(spec_from)
    rs["metadata"].update(name=name, namespace=NS, generation=1)
    rs["status"] = status
    return rs


def ray_pods(cluster: str, ready: bool = True, shards_unschedulable: bool = False) -> list[dict]:
    def labels(group, node_type):
        return {"ray.io/cluster": cluster, "ray.io/group": group, "ray.io/node-type": node_type,
                "ray.io/is-ray-node": "yes", "ray.io/serve": "true" if ready else "false",
                "app.kubernetes.io/name": "m1serve", "app.kubernetes.io/instance": "m1",
                "app.kubernetes.io/component": "head" if group == "headgroup" else group,
                "app.kubernetes.io/created-by": "kuberay-operator"}

    head = pod(f"{cluster}-head-7xq2d", NS, "cpu-1", {"cpu": "4", "memory": "16Gi"}, labels("headgroup", "head"))
    router = pod(f"{cluster}-router-worker-hq8zt", NS, "gpu-b",
                 {"cpu": "16", "memory": "192Gi", "nvidia.com/gpu": "1"}, labels("router", "worker"), ready=ready,
                 waiting=None if ready else ("ContainerCreating", ""))
    if shards_unschedulable:
        shards = pod(f"{cluster}-shards-worker-p4mcd", NS, None, {"cpu": "64", "memory": "1Ti", "nvidia.com/gpu": "8"},
                     labels("shards", "worker"), ready=False, phase="Pending",
                     unschedulable="0/3 nodes are available: 1 Insufficient nvidia.com/gpu, 2 node(s) didn't match "
                                   "Pod's node affinity/selector. preemption: 0/3 nodes are available.")
    else:
        shards = pod(f"{cluster}-shards-worker-p4mcd", NS, "gpu-a",
                     {"cpu": "64", "memory": "1Ti", "nvidia.com/gpu": "8"}, labels("shards", "worker"), ready=ready)
    return [head, router, shards]


def serve_service(name: str = "m1-m1serve-serve", endpoints: int = 2) -> list[dict]:
    svc = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": NS,
                        "labels": {"ray.io/serve": "m1-m1serve-serve", "app.kubernetes.io/name": "m1serve"}},
           "spec": {"type": "ClusterIP", "clusterIP": "10.96.44.10", "clusterIPs": ["10.96.44.10"],
                    "selector": {"ray.io/cluster": CLUSTER, "ray.io/serve": "true"},
                    "ports": [{"name": "http", "port": 8000, "targetPort": 8000, "protocol": "TCP",
                               "appProtocol": "http"},
                              {"name": "grpc", "port": 9000, "targetPort": 9000, "protocol": "TCP",
                               "appProtocol": "kubernetes.io/h2c"}],
                    "sessionAffinity": "None", "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                    "internalTrafficPolicy": "Cluster"},
           "status": {"loadBalancer": {}}}
    es = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
          "metadata": {"name": f"{name}-8kx2w", "namespace": NS,
                       "labels": {"kubernetes.io/service-name": name,
                                  "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
          "addressType": "IPv4",
          "endpoints": [{"addresses": [f"10.244.{i}.23"], "conditions": {"ready": True, "serving": True,
                                                                         "terminating": False},
                         "nodeName": ["cpu-1", "gpu-b"][i % 2]} for i in range(endpoints)],
          "ports": [{"name": "http", "port": 8000, "protocol": "TCP", "appProtocol": "http"},
                    {"name": "grpc", "port": 9000, "protocol": "TCP", "appProtocol": "kubernetes.io/h2c"}]}
    return [svc, es]


# ---- running the command -------------------------------------------------------------------------------------------
def run_cli(fake: FakeKube, tmp_path: Path, *argv: str, stdin: str | None = None,
            namespace: str | None = NS, **kubeconfig_args) -> tuple[int, str]:
    kubeconfig = fake.kubeconfig(tmp_path / "kubeconfig", namespace=namespace, **kubeconfig_args)
    out = io.StringIO()
    old_stdin = sys.stdin
    try:
        if stdin is not None:
            sys.stdin = io.StringIO(stdin)
        with contextlib.redirect_stdout(out):
            code = k8s.main([argv[0], "--kubeconfig", str(kubeconfig), *argv[1:]])
    finally:
        sys.stdin = old_stdin
    return code, out.getvalue()


@pytest.fixture
def helm_path(helm_bin, monkeypatch, tmp_path):
    monkeypatch.setenv("M1SERVE_HELM", str(helm_bin))
    for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    return helm_bin


# ---- the fake objects are realistic ----------------------------------------------------------------------------------
def test_fake_objects_pass_the_client_models_and_the_crd(chart_rayservice, crd_validator):
    fake = gpu_cluster(used_gpus=(2, 0))
    fake.add(*ray_pods(CLUSTER), *serve_service(), secret("m1serve-api-key"))
    core = [o for store in fake.objects.values() for o in store.values()]
    assert len(core) > 10
    for obj in core:
        client_model(obj).model_validate(obj)
    for status in (ready_status(), initializing_status()):
        errors = validation_errors(crd_validator, rayservice(chart_rayservice, status))
        assert not errors, "\n".join(errors)


# ---- preflight -------------------------------------------------------------------------------------------------------
def test_preflight_gpu_cluster_fits_the_full_model(helm_path, tmp_path):
    with gpu_cluster() as fake:
        code, out = run_cli(fake, tmp_path, "preflight", "-f", H100_VALUES, "--release", "m1")
    assert code == 0, out
    assert f"(Kubernetes v1.32.3), namespace {NS}" in out
    assert "ok    KubeRay API ray.io/v1: rayservices, rayclusters" in out
    assert "KubeRay operator kuberay-system/kuberay-operator (quay.io/kuberay/operator:v1.7.0): 1/1 ready" in out
    assert f"ok    PersistentVolumeClaim {NS}/minimax-m1-80k: Bound, ReadOnlyMany" in out
    assert "nvidia.com/gpu: the manifest needs 9 (router 1 x 1, shards 1 x 8); schedulable nodes have 16 " \
           "allocatable, 16 free" in out
    # 9 GPUs over two nodes: the 8 shards fill one H100 node, the router takes a GPU of the other
    assert "ok    shards pod (8 nvidia.com/gpu, 64 CPU, 1 TiB memory): fits on gpu-a" in out
    assert "ok    router pod (1 nvidia.com/gpu, 16 CPU, 192 GiB memory): fits on gpu-b" in out
    assert "ok    head pod (4 CPU, 16 GiB memory): fits on cpu-1" in out
    assert "monitoring.coreos.com/v1 PodMonitor served" in out  # rendered with the cluster's API versions
    assert "result: ready to install (exit 0)" in out
    assert any("/apis/ray.io/v1" in r for r in fake.requests)


def test_preflight_cluster_without_gpus(helm_path, tmp_path):
    with cpu_cluster() as fake:
        code, out = run_cli(fake, tmp_path, "preflight")
    assert code == 1, out
    assert "nvidia.com/gpu: the manifest needs 9 (router 1 x 1, shards 1 x 8); schedulable nodes have 0 " \
           "allocatable, 0 free" in out
    assert "FAIL  router pod (1 nvidia.com/gpu, 16 CPU, 128 GiB memory): does not fit: 1 nvidia.com/gpu needed, " \
           "none free on the 2 node(s) it may use; 16 CPU needed, at most 15.89 CPU free (node cpu-" in out
    assert "FAIL  shards pod (8 nvidia.com/gpu" in out
    assert "GPU nodes: none (no node has allocatable nvidia.com/gpu; is the NVIDIA device plugin" in out
    assert "result: 2 problems (exit 1)" in out


def test_preflight_cpu_demo_fits_a_cpu_cluster(helm_path, tmp_path):
    with cpu_cluster() as fake:
        code, out = run_cli(fake, tmp_path, "preflight", "-f", DEMO_VALUES)
    assert code == 0, out
    assert "ok    router pod (1 CPU, 3 GiB memory): fits on" in out
    assert "monitoring.coreos.com/v1 not served" in out


def test_preflight_wrong_gpu_kind(helm_path, tmp_path):
    with gpu_cluster() as fake:
        code, out = run_cli(fake, tmp_path, "preflight", "-f", H200_VALUES)
        assert code == 1, out
        assert "does not fit: no node has the labels nvidia.com/gpu.product=NVIDIA-H200" in out
        assert f"gpu-a                    {H100}" in out
        # --gpu-product overrides the kind: the H200 values' pods on H100 nodes would fit
        code, out = run_cli(fake, tmp_path, "preflight", "-f", H200_VALUES, "--gpu-product", H100)
    assert code == 0, out


def test_preflight_gpus_taken_by_other_pods(helm_path, tmp_path):
    with gpu_cluster(used_gpus=(6, 6)) as fake:
        code, out = run_cli(fake, tmp_path, "preflight", "-f", H100_VALUES)
    assert code == 1, out
    assert "schedulable nodes have 16 allocatable, 4 free" in out
    assert "FAIL  shards pod (8 nvidia.com/gpu, 64 CPU, 1 TiB memory): does not fit: 8 nvidia.com/gpu needed, " \
           "at most 2 nvidia.com/gpu free (node gpu-" in out
    assert "ok    router pod" in out
    with gpu_cluster(used_gpus=(1, 0)) as fake:  # 7 + 8 free: shards on gpu-b, router next to the trainer
        code, out = run_cli(fake, tmp_path, "preflight", "-f", H100_VALUES)
    assert code == 0, out
    assert "fits on gpu-b" in out and "router pod (1 nvidia.com/gpu, 16 CPU, 192 GiB memory): fits on gpu-a" in out


def test_preflight_unready_and_cordoned_nodes(helm_path, tmp_path):
    fake = gpu_cluster(gpu_nodes=0)
    fake.add(node("gpu-a", "191450m", "2013478236Ki", gpus=8, ready=False),
             node("gpu-b", "191450m", "2013478236Ki", gpus=8, cordoned=True))
    with fake:
        code, out = run_cli(fake, tmp_path, "preflight", "-f", H100_VALUES)
    assert code == 1, out
    assert "schedulable nodes have 0 allocatable" in out
    assert "are not usable: cordoned; not Ready" in out
    assert "[not Ready]" in out and "[cordoned]" in out


def test_preflight_without_kuberay(helm_path, tmp_path):
    served = tuple({gv for gv, _ in RESOURCES} - {"ray.io/v1"})
    with gpu_cluster(served=served, operator=False) as fake:
        code, out = run_cli(fake, tmp_path, "preflight", "-f", H100_VALUES)
    assert code == 1, out
    assert "FAIL  KubeRay API ray.io/v1 lacks rayservices, rayclusters: install the KubeRay operator" in out
    assert "WARN  no KubeRay operator Deployment" in out


def test_preflight_missing_claim_and_secret(helm_path, tmp_path):
    fake = gpu_cluster()
    fake.objects[("v1", "persistentvolumeclaims")].clear()
    fake.add(secret("m1serve-api-key", keys=("token",)))
    with fake:
        code, out = run_cli(fake, tmp_path, "preflight", "-f", H100_VALUES,
                            "--set", "apiKey.existingSecret=m1serve-api-key",
                            "--set", "imagePullSecrets[0].name=regcred")
    assert code == 1, out
    assert f"FAIL  PersistentVolumeClaim {NS}/minimax-m1-80k (the weights) does not exist" in out
    assert f"FAIL  Secret {NS}/m1serve-api-key key api-key: the Secret has no such key (has: token)" in out
    assert f"FAIL  Secret {NS}/regcred: the Secret does not exist" in out
    assert "result: 3 problems (exit 1)" in out


def test_preflight_rwo_claim_and_forbidden_pods(helm_path, tmp_path):
    fake = gpu_cluster()
    fake.add(pvc("minimax-m1-80k", modes=("ReadWriteOnce",)))
    fake.forbidden.add("pods")
    with fake:
        code, out = run_cli(fake, tmp_path, "preflight", "-f", H100_VALUES)
    assert code == 0, out
    assert "WARN  PersistentVolumeClaim llm/minimax-m1-80k: Bound, ReadWriteOnce: 3 pods mount it" in out
    assert "WARN  may not list pods: free capacity assumes nothing else runs" in out
    assert "result: ready to install, 2 warning(s) (exit 0)" in out


def test_preflight_from_a_rendered_manifest_on_stdin(helm_run, tmp_path, monkeypatch):
    monkeypatch.setenv("M1SERVE_HELM", "/nonexistent/helm")  # the manifest path needs no helm
    manifest = helm_run("template", "m1", str(CHART), "-n", NS, "-f", H100_VALUES)
    with gpu_cluster(used_gpus=(8, 8)) as fake:
        code, out = run_cli(fake, tmp_path, "preflight", "--manifest", "-", stdin=manifest)
    assert code == 1, out
    assert "manifest: stdin -> RayService m1-m1serve" in out
    assert "schedulable nodes have 16 allocatable, 0 free" in out


def test_preflight_usage_and_connection_errors(helm_path, tmp_path):
    with gpu_cluster() as fake:
        code, out = run_cli(fake, tmp_path, "preflight", "-f", str(tmp_path / "nope.yaml"))
        assert (code, out.strip()) == (2, f"error: values file not found: {tmp_path / 'nope.yaml'}")
        code, out = run_cli(fake, tmp_path, "preflight", "--set", "shards.count=5")
        assert code == 2 and "shards.count=5 does not divide model.numExperts=32" in out, out
        code, out = run_cli(fake, tmp_path, "preflight", "--manifest", "-", "-f", H100_VALUES, stdin="")
        assert code == 2 and "exclude each other" in out
        code, out = run_cli(fake, tmp_path, "preflight", "--manifest", "-", stdin="kind: ConfigMap\n")
        assert code == 2 and "expected one RayService, found 0" in out
        code, out = run_cli(fake, tmp_path, "preflight", token="a-wrong-token")
        assert code == 2 and "401 Unauthorized" in out, out
        closed_url = fake.url
    # the server is gone: connection refused
    code, out = run_cli(fake, tmp_path, "preflight", server=closed_url)
    assert code == 2 and out.startswith(f"error: cannot reach the Kubernetes API at {closed_url}"), out
    with pytest.raises(SystemExit) as e, contextlib.redirect_stderr(io.StringIO()):
        k8s.main(["preflight", "--bogus"])
    assert e.value.code == 2


# ---- status ----------------------------------------------------------------------------------------------------------
def test_status_ready(chart_rayservice, tmp_path):
    fake = gpu_cluster()
    fake.add(rayservice(chart_rayservice, ready_status()), *ray_pods(CLUSTER), *serve_service())
    with fake:
        code, out = run_cli(fake, tmp_path, "status", "m1-m1serve")
    assert code == 0, out
    assert f"RayService {NS}/m1-m1serve: generation 1, observed 1" in out
    assert "condition Ready=True (NonZeroServeEndpoints): Number of serve endpoints is greater than 0" in out
    assert "ok    Ready" in out
    assert f"active RayCluster {CLUSTER}: state ready, worker pods ready 2/2, desired GPUs 9" in out
    assert "ok    application m1serve: RUNNING" in out
    lines = out.splitlines()
    deployment_lines = [line.split()[0] for line in lines if "ExpertShard" in line or "Router:" in line]
    assert deployment_lines == ["Router:"] + [f"ExpertShard{i}:" for i in range(8)]  # Router, then natural order
    assert "pods ready: head 1/1, router 1/1, shards 1/1" in out
    assert "ok    serve endpoints: 2" in out
    assert "ok    Service m1-m1serve-serve (ClusterIP 10.96.44.10): http 8000, grpc 9000; 2 ready endpoint(s)" in out
    assert f"OpenAI HTTP  http://m1-m1serve-serve.{NS}.svc:8000/v1" in out
    assert f"gRPC         m1-m1serve-serve.{NS}.svc:9000" in out
    assert out.rstrip().endswith("result: ready (exit 0)")


def test_status_not_ready(chart_rayservice, tmp_path):
    fake = gpu_cluster()
    fake.add(rayservice(chart_rayservice, initializing_status()),
             *ray_pods(CLUSTER, ready=False, shards_unschedulable=True))
    with fake:
        code, out = run_cli(fake, tmp_path, "status")  # found by the chart's label
    assert code == 1, out
    assert "FAIL  condition Ready=False (Initializing): RayService is initializing" in out
    assert "FAIL  no active RayCluster serving yet" in out
    assert f"pending RayCluster {CLUSTER}: state ?, worker pods ready 1/2" in out
    assert "application m1serve: DEPLOYING" in out
    assert "ExpertShard3: UPDATING: Deployment 'ExpertShard3' in application 'm1serve' has 1 replicas" in out
    assert "pods ready: head 1/1, router 0/1, shards 0/1" in out
    assert f"pod {CLUSTER}-shards-worker-p4mcd not ready: Unschedulable: 0/3 nodes are available: " \
           "1 Insufficient nvidia.com/gpu" in out
    assert f"pod {CLUSTER}-router-worker-hq8zt not ready: main waiting: ContainerCreating" in out
    assert "FAIL  serve endpoints: 0" in out
    assert "FAIL  Service m1-m1serve-serve: not created yet" in out
    assert "result: 4 problems (exit 1)" in out


def test_status_running_but_unhealthy(chart_rayservice, tmp_path):
    status = ready_status()
    app = status["activeServiceStatus"]["applicationStatuses"]["m1serve"]
    app.update(status="UNHEALTHY", message="The deployment ExpertShard5 is UNHEALTHY.")
    app["serveDeploymentStatuses"]["ExpertShard5"] = {
        "status": "UNHEALTHY", "message": "The deployment failed to start 3 times in a row: RuntimeError: CUDA out "
                                          "of memory"}
    fake = gpu_cluster()
    fake.add(rayservice(chart_rayservice, status), *ray_pods(CLUSTER), *serve_service())
    with fake:
        code, out = run_cli(fake, tmp_path, "status", "m1-m1serve")
    assert code == 1, out
    assert "FAIL  application m1serve: UNHEALTHY: The deployment ExpertShard5 is UNHEALTHY." in out
    assert "FAIL    ExpertShard5: UNHEALTHY: The deployment failed to start 3 times in a row" in out


def test_status_missing_ambiguous_and_old_kuberay(chart_rayservice, tmp_path):
    with gpu_cluster() as fake:
        code, out = run_cli(fake, tmp_path, "status", "m1-m1serve")
        assert code == 1 and f"FAIL  no RayService m1-m1serve in namespace {NS}" in out, out
        fake.add(rayservice(chart_rayservice, ready_status(), name="a"),
                 rayservice(chart_rayservice, ready_status(), name="b"))
        code, out = run_cli(fake, tmp_path, "status")
        assert code == 2 and "several m1serve RayServices in namespace llm (a, b): name one" in out, out
    # KubeRay before conditions: serviceStatus only
    status = ready_status()
    del status["conditions"]
    with gpu_cluster().add(rayservice(chart_rayservice, status), *ray_pods(CLUSTER), *serve_service()) as fake:
        code, out = run_cli(fake, tmp_path, "status", "m1-m1serve", namespace=None, )
        assert code == 1 and "namespace default" in out  # the kubeconfig context has no namespace
        code, out = run_cli(fake, tmp_path, "status", "m1-m1serve", "-n", NS)
    assert code == 0 and "ok    serviceStatus Running" in out, out


def test_status_wait_until_ready(chart_rayservice, tmp_path):
    fake = gpu_cluster()
    fake.add(rayservice(chart_rayservice, initializing_status()), *ray_pods(CLUSTER, ready=False))
    with fake:
        def become_ready():
            time.sleep(0.6)
            fake.add(rayservice(chart_rayservice, ready_status()), *ray_pods(CLUSTER), *serve_service())

        threading.Thread(target=become_ready, daemon=True).start()
        t0 = time.monotonic()
        code, out = run_cli(fake, tmp_path, "status", "m1-m1serve", "--wait", "20", "--interval", "0.2")
    assert code == 0, out
    assert time.monotonic() - t0 < 10
    assert out.count("RayService llm/m1-m1serve") == 1  # only the last pass is printed
    with gpu_cluster().add(rayservice(chart_rayservice, initializing_status())) as fake:
        t0 = time.monotonic()
        code, out = run_cli(fake, tmp_path, "status", "m1-m1serve", "--wait", "0.5", "--interval", "0.1")
    assert code == 1 and 0.4 < time.monotonic() - t0 < 5


# ---- wiring ----------------------------------------------------------------------------------------------------------
def test_add_k8s_parser_wires_into_a_cli():
    """As cluster/cli.py will use it: add_k8s_parser(subparsers) registers `k8s preflight|status` with func."""
    parser = argparse.ArgumentParser(prog="m1serve")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("generate")
    k8s.add_k8s_parser(sub)
    args = parser.parse_args(["k8s", "preflight", "-f", "a.yaml", "-f", "b.yaml", "--set", "x=1", "-n", "llm"])
    assert args.func is k8s.cmd_preflight and args.values == ["a.yaml", "b.yaml"] and args.namespace == "llm"
    args = parser.parse_args(["k8s", "status", "m1", "--wait", "30"])
    assert args.func is k8s.cmd_status and args.name == "m1" and args.wait == 30
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        parser.parse_args(["k8s"])


def test_module_entry_point_exit_codes(chart_rayservice, tmp_path):
    """`python -m cluster.k8s` in a fresh process: exit 0 for a ready RayService."""
    fake = gpu_cluster()
    fake.add(rayservice(chart_rayservice, ready_status()), *ray_pods(CLUSTER), *serve_service())
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with fake:
        kubeconfig = fake.kubeconfig(tmp_path / "kc", namespace=NS)
        proc = subprocess.run([sys.executable, "-m", "cluster.k8s", "status", "--kubeconfig", str(kubeconfig)],
                              capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "result: ready (exit 0)" in proc.stdout


def test_no_cluster_configured(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = k8s.main(["status"])
    assert code == 2 and out.getvalue().startswith("error: no kubeconfig"), out.getvalue()
    (tmp_path / "bad-kubeconfig").write_text("apiVersion: v1\nkind: Config\nclusters: []\n")
    with contextlib.redirect_stdout(out):
        code = k8s.main(["preflight", "--kubeconfig", str(tmp_path / "bad-kubeconfig")])
    assert code == 2 and "error: kubeconfig" in out.getvalue(), out.getvalue()
