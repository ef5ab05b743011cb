"""Kubernetes manifests and the Dockerfile, checked offline: render with kustomize, validate schemas, invariants."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from customcrafter.orchestration.kfp_client import DEFAULT_GPU_SCHEDULING, gpu_scheduling_from_configmap
from customcrafter.orchestration.settings import CLUSTER_TRACKING_URI, PIPELINE_POD_LABELS

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
K8S_VERSION = "1.32.0"  # the API version we target (kubectl on the CI image is 1.32)
OVERLAYS = ["base", "overlays/local", "overlays/production"]
DEPLOYABLE = OVERLAYS[1:]
SECRET_NAMES = {"mlflow-auth", "mlflow-client", "mlflow-s3", "mlflow-postgres", "customcrafter-hf", "git-credentials"}


@cache
def render(path: str) -> tuple[dict, ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is required to render the kustomizations (it ships kustomize)")
    out = subprocess.run([kubectl, "kustomize", str(K8S / path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {path}: {out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def by_kind(docs, kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def pod_specs(docs) -> list[dict]:
    return [d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job")]


def containers(docs) -> list[dict]:
    return [c for spec in pod_specs(docs) for c in spec.get("containers", []) + spec.get("initContainers", [])]


def mlflow_container(docs) -> dict:
    (deploy,) = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "mlflow"]
    return next(c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == "mlflow")


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize("path", [*OVERLAYS, "secrets"])
def test_renders_and_every_object_matches_the_kubernetes_schema(path):
    docs = render(path)
    assert docs
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path}: {doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


@pytest.mark.parametrize("path", OVERLAYS)
def test_everything_in_namespace_and_core_objects_present(path):
    docs = render(path)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("Namespace", "customcrafter"), ("Deployment", "mlflow"), ("Service", "mlflow"),
            ("ServiceAccount", "customcrafter-pipeline-runner"), ("Role", "customcrafter-pipeline-runner"),
            ("RoleBinding", "customcrafter-pipeline-runner"), ("PersistentVolumeClaim", "customcrafter-model-cache"),
            ("ConfigMap", "customcrafter-gpu-scheduling"), ("NetworkPolicy", "mlflow")} <= kinds
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "customcrafter", doc["metadata"]["name"]


@pytest.mark.parametrize("path", OVERLAYS)
def test_no_secrets_in_deployable_trees(path):
    """Secrets live only in k8s/secrets (templates), so applying an overlay never overwrites real ones."""
    assert by_kind(render(path), "Secret") == []
    text = "\n".join(p.read_text() for p in (K8S / path).rglob("*.yaml"))
    assert not re.search(r"(?i)(password|secret_access_key|token)\s*[:=]\s*['\"]?[A-Za-z0-9+/]{8,}", text)


def test_secret_templates_carry_no_values_and_cover_every_reference():
    secrets = by_kind(render("secrets"), "Secret")
    assert {s["metadata"]["name"] for s in secrets} == SECRET_NAMES
    keys = {}
    for secret in secrets:
        assert not secret.get("data"), secret["metadata"]["name"]
        assert all(v == "" for v in secret.get("stringData", {}).values()), secret["metadata"]["name"]
        keys[secret["metadata"]["name"]] = set(secret["stringData"])
    for path in DEPLOYABLE:
        for c in containers(render(path)):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in keys.get(ref["name"], set()), f"{path}: {ref} has no template"
            for source in c.get("envFrom", []):
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in keys


def test_secret_templates_cover_every_secret_the_pipelines_read():
    """Each Secret and key the pipeline tasks get as env (settings: required, optional, the data repository's git
    credentials) has its template, so `kubectl create -k k8s/secrets` and docs/OPERATIONS.md name them all."""
    from customcrafter.orchestration.settings import DATA_REPO_SECRETS, OPTIONAL_SECRETS, SECRETS

    templates = {s["metadata"]["name"]: set(s["stringData"]) for s in by_kind(render("secrets"), "Secret")}
    for name, keys in {**SECRETS, **OPTIONAL_SECRETS, **DATA_REPO_SECRETS}.items():
        assert set(keys) <= templates.get(name, set()), f"{name}: {sorted(keys)} have no template"
    assert set(DATA_REPO_SECRETS["git-credentials"]) == {"GIT_TOKEN", "GIT_USERNAME"}


@pytest.mark.parametrize("path", OVERLAYS)
def test_every_container_non_root_with_limits_and_pinned_image(path):
    docs = render(path)
    for spec in pod_specs(docs):
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"].get("runAsUser", 1000) != 0
    for c in containers(docs):
        assert c["securityContext"]["runAsNonRoot"] is True, c["name"]
        assert c["securityContext"]["allowPrivilegeEscalation"] is False, c["name"]
        assert {"cpu", "memory"} <= set(c["resources"]["limits"]), c["name"]
        assert {"cpu", "memory"} <= set(c["resources"]["requests"]), c["name"]
        name, _, tag = c["image"].rpartition(":")
        assert name and tag and tag != "latest" and "/" in name, f"{c['name']}: image {c['image']!r} not pinned"


def test_mlflow_server_settings_dev_vs_production():
    local, prod = mlflow_container(render("overlays/local")), mlflow_container(render("overlays/production"))
    for c in (local, prod):
        assert "--app-name=basic-auth" in c["args"]
        env = env_of(c)
        assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-auth"
        assert "value" not in env["MLFLOW_AUTH_ADMIN_PASSWORD"]
    # dev: sqlite on a PVC
    local_docs = render("overlays/local")
    (config,) = [d for d in by_kind(local_docs, "ConfigMap") if d["metadata"]["name"] == "mlflow-config"]
    assert config["data"]["backend-store-uri"].startswith("sqlite:////mlflow/store/")
    volumes = {v["name"]: v for v in pod_specs(local_docs)[0]["volumes"]}
    assert volumes["store"]["persistentVolumeClaim"]["claimName"] == "mlflow-store"
    assert ("PersistentVolumeClaim", "mlflow-store") in {(d["kind"], d["metadata"]["name"]) for d in local_docs}
    # production: Postgres URIs from a Secret, S3 artifacts with credentials from a Secret, no sqlite left
    prod_docs = render("overlays/production")
    env = env_of(prod)
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"] == {"secretKeyRef": {"name": "mlflow-postgres", "key": "uri"}}
    assert prod["envFrom"] == [{"secretRef": {"name": "mlflow-s3", "optional": False}}]
    (config,) = [d for d in by_kind(prod_docs, "ConfigMap") if d["metadata"]["name"] == "mlflow-config"]
    assert config["data"]["artifacts-destination"].startswith("s3://")
    assert "sqlite" not in yaml.safe_dump(list(prod_docs))
    init = pod_specs(prod_docs)[0]["initContainers"][0]
    assert env_of(init)["MLFLOW_AUTH_DATABASE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-postgres"
    (deploy,) = by_kind(prod_docs, "Deployment")
    assert deploy["spec"]["replicas"] >= 2


def _selects(selector: dict, labels: dict) -> bool:
    """A label selector (matchLabels only; the manifests use no matchExpressions) against a pod's labels."""
    assert set(selector) <= {"matchLabels"}, f"unexpected selector fields: {selector}"
    return bool(selector.get("matchLabels")) and selector["matchLabels"].items() <= labels.items()


def check_mlflow_network_policy(docs) -> None:
    """The NetworkPolicy in front of MLflow: selects the server's pods (and only pods labelled as the Service
    selects them), admits ingress only from the pipeline's pods (the labels KFP v2 puts on every pod of a run, in
    this namespace) and only on the port the server's container listens on and the Service targets."""
    (deploy,) = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "mlflow"]
    (service,) = [d for d in by_kind(docs, "Service") if d["metadata"]["name"] == "mlflow"]
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    policies = [p for p in by_kind(docs, "NetworkPolicy") if _selects(p["spec"]["podSelector"], pod_labels)]
    assert [p["metadata"]["name"] for p in policies] == ["mlflow"], "one NetworkPolicy selects the MLflow pods"
    (policy,) = policies
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= service["spec"]["selector"].items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]  # egress stays open: Postgres and S3 are outside
    container = mlflow_container(docs)
    (port,) = container["ports"]
    target = service["spec"]["ports"][0]["targetPort"]
    assert target in (port["name"], port["containerPort"]), f"the Service targets {target!r}, not the server's port"
    assert f"--port={port['containerPort']}" in container["args"]
    assert len(policy["spec"]["ingress"]) == 1, policy["spec"]["ingress"]
    rule = policy["spec"]["ingress"][0]
    assert rule.get("ports") == [{"protocol": "TCP", "port": port["containerPort"]}], rule.get("ports")
    # the pipeline's pods in this namespace only: no namespace or IP peer
    assert rule.get("from") == [{"podSelector": {"matchLabels": PIPELINE_POD_LABELS}}], rule.get("from")
    assert not _selects(rule["from"][0]["podSelector"], pod_labels), "the server is not its own client"


@pytest.mark.parametrize("path", OVERLAYS)
def test_mlflow_accepts_connections_only_from_the_pipeline_pods_on_its_port(path):
    check_mlflow_network_policy(render(path))
    # the pipeline pods reach the server through the Service on that port (settings.CLUSTER_TRACKING_URI)
    assert CLUSTER_TRACKING_URI.endswith(f":{mlflow_container(render(path))['ports'][0]['containerPort']}")


def _drift(docs, kind: str, edit) -> list[dict]:
    docs = copy.deepcopy(list(docs))
    edit(next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == "mlflow"))
    return docs


@pytest.mark.parametrize("drift", [
    pytest.param(("Deployment", lambda d: d["spec"]["template"]["metadata"]["labels"].update(
        {"app.kubernetes.io/name": "mlflow-server"})), id="server-pod-label"),
    pytest.param(("Deployment", lambda d: d["spec"]["template"]["spec"]["containers"][0]["ports"][0].update(
        containerPort=5001)), id="container-port"),
    pytest.param(("Service", lambda d: d["spec"]["ports"][0].update(targetPort=8080)), id="service-target-port"),
    pytest.param(("NetworkPolicy", lambda d: d["spec"]["ingress"][0]["ports"][0].update(port=8080)),
                 id="policy-port"),
    pytest.param(("NetworkPolicy", lambda d: d["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
                  .update({"pipelines.kubeflow.org/v2_component": "yes"})), id="peer-label"),
    pytest.param(("NetworkPolicy", lambda d: d["spec"]["ingress"][0]["from"].append({"namespaceSelector": {}})),
                 id="any-namespace"),
    pytest.param(("NetworkPolicy", lambda d: d["spec"]["ingress"][0].pop("ports")), id="every-port"),
    pytest.param(("NetworkPolicy", lambda d: d["spec"].update(podSelector={})), id="every-pod"),
])
def test_the_network_policy_check_fails_when_a_label_or_port_drifts(drift):
    kind, edit = drift
    with pytest.raises(AssertionError):
        check_mlflow_network_policy(_drift(render("base"), kind, edit))


def test_pipeline_runner_rbac_is_least_privilege():
    docs = render("overlays/production")
    (role,) = by_kind(docs, "Role")
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        assert not {"delete", "deletecollection", "escalate", "bind", "impersonate"} & set(rule["verbs"])
        if "secrets" in rule["resources"]:
            assert rule["verbs"] == ["get"] and rule.get("resourceNames"), "secrets only by name, read-only"
            assert not set(rule["resourceNames"]) & SECRET_NAMES, "our secrets reach pods via the kubelet"
    (binding,) = by_kind(docs, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "customcrafter-pipeline-runner",
                                    "namespace": "customcrafter"}]


def test_model_cache_and_gpu_scheduling():
    prod = render("overlays/production")
    (cache_pvc,) = [d for d in by_kind(prod, "PersistentVolumeClaim") if d["metadata"]["name"] == "customcrafter-model-cache"]
    assert cache_pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for path in OVERLAYS:
        (cm,) = [d for d in by_kind(render(path), "ConfigMap") if d["metadata"]["name"] == "customcrafter-gpu-scheduling"]
        assert cm["data"]["toleration-key"] == "nvidia.com/gpu" and cm["data"]["gpu-resource"] == "nvidia.com/gpu"
    assert gpu_scheduling_from_configmap(K8S / "base/gpu-scheduling-configmap.yaml") == DEFAULT_GPU_SCHEDULING


# ------------------------------------------------------------------------------------------ Dockerfile
def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """Instructions per build stage, as (INSTRUCTION, arguments) with line continuations joined."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), args.strip()))
    return stages


def test_dockerfile_stages_are_pinned_non_root_and_secret_free():
    stages = dockerfile_stages()
    assert len(stages) >= 1
    secretish = re.compile(r"(?i)(password|passwd|secret|token|api_?key|access_key|credential)")
    for stage in stages:
        base = stage[0][1].split()[0]
        assert ":" in base and not base.endswith(":latest"), f"FROM {base} not pinned"
        users = [i for i, (ins, _) in enumerate(stage) if ins == "USER"]
        starts = [i for i, (ins, _) in enumerate(stage) if ins in ("CMD", "ENTRYPOINT")]
        assert users and starts and users[-1] < starts[0], f"{base}: USER must come before CMD/ENTRYPOINT"
        user = stage[users[-1]][1].split(":")[0]
        assert user not in ("root", "0"), f"{base}: runs as root"
        for ins, args in stage:
            if ins in ("ENV", "ARG"):
                for name, value in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\S*)", args):
                    assert not (secretish.search(name) and value), f"{ins} {name} carries a value"
            assert not (ins in ("COPY", "ADD") and re.search(r"\.env\b|secrets?/", args)), f"{ins} {args}"


def test_dockerfile_project_image_keeps_base_torch_and_installs_package():
    stages = dockerfile_stages()
    final = stages[-1]
    assert final[0][1].split()[0].startswith("pytorch/pytorch:") and "cuda" in final[0][1]
    runs = " ".join(args for ins, args in final if ins == "RUN")
    assert re.search(r"pip install --constraint \S+ \.", runs), "package must be installed under the torch pin"
    copies = " ".join(args for ins, args in final if ins == "COPY")
    assert "constraints.txt" in copies and "grep -v '^torch==' constraints.txt" in runs, \
        "the model libraries must be installed at the pinned versions (constraints.txt, less its CPU torch)"
    assert "torch.__version__" in runs
    env = " ".join(args for ins, args in final if ins == "ENV")
    assert "HF_HOME=/cache/huggingface" in env
    assert "TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor" in env, "compiled kernels must outlive the pod (model cache)"
    assert "CUSTOMCRAFTER_CACHE=/cache/customcrafter" in env, "converted checkpoints must outlive the pod (model cache)"
    # registered models carry the code's commit: the image has no .git, so the build passes it in
    assert ("ARG", 'GIT_COMMIT=""') in final and "CUSTOMCRAFTER_GIT_COMMIT=${GIT_COMMIT}" in env
    guard = next(args for ins, args in final if ins == "RUN" and "GIT_COMMIT" in args)  # an empty one stops the build
    assert subprocess.run(["sh", "-c", guard], env={"GIT_COMMIT": ""}, capture_output=True).returncode != 0
    assert subprocess.run(["sh", "-c", guard], env={"GIT_COMMIT": "1f33fc4"}, capture_output=True).returncode == 0
    assert DEFAULT_GPU_SCHEDULING.model_cache_mount_path == "/cache"
    assert "MLFLOW_DISABLE_TELEMETRY=true" in env and "DO_NOT_TRACK=true" in env


def test_dockerignore_keeps_caches_and_secrets_out():
    entries = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", "data/", "outputs/", "mlruns/", ".env", "*.env"} <= entries


def test_auth_config_keeps_a_percent_encoded_database_password(tmp_path):
    """The init container writes basic_auth.ini, which MLflow reads with configparser's interpolation: a password
    percent-encoded in the URI ("/" -> %2F, "+" -> %2B) must reach the server unchanged, not crash it."""
    import configparser
    import os

    (init,) = pod_specs(render("overlays/production"))[0]["initContainers"]
    script = init["args"][0].replace("/etc/mlflow-auth/basic_auth.ini", str(tmp_path / "basic_auth.ini"))
    uri = "postgresql://mlflow:ab%2Fcd%2Bef%25@db.internal:5432/mlflow_auth"
    subprocess.run(["/bin/sh", "-c", script], env={**os.environ, "MLFLOW_AUTH_DATABASE_URI": uri}, check=True,
                   timeout=30)
    config = configparser.ConfigParser()  # as mlflow.server.auth.config.read_auth_config reads it
    config.read(tmp_path / "basic_auth.ini")
    assert config["mlflow"]["database_uri"] == uri
    assert config["mlflow"]["authorization_function"] == "mlflow.server.auth:authenticate_request_basic_auth"
