"""The deployment artefacts, checked offline: the image, the Kubernetes overlays, the alert rules
and the Grafana dashboard.

The tools come from requirements-deploy.txt, installed into their own venv (.venv/deploy, or the
directory named by JOBSTREAM_DEPLOY_TOOLS): kubectl (for `kubectl kustomize`), kubernetes-validate,
checkov, and PyYAML through that venv's python. promtool comes from Debian's `prometheus` package.
A test whose tool is missing is skipped with the install command, never failed.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jobstream.config import Settings
from jobstream.topics import CHUNKS, SUBMITTED, topic_specs

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "jobstream.json"
OPERATIONS = ROOT / "docs" / "operations.md"
TOOLS = Path(os.environ.get("JOBSTREAM_DEPLOY_TOOLS", ROOT / ".venv" / "deploy" / "bin"))
INSTALL_TOOLS = (
    "python3 -m venv .venv/deploy && .venv/deploy/bin/pip install -r requirements-deploy.txt (make deploy-tools)"
)

OVERLAYS = ("dev", "prod")
SERVICES = ("gateway", "scheduler", "worker")
# The oldest Kubernetes the manifests support (native gRPC probes are GA from 1.27) and the newest
# the schemas know.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
# Custom resources have no schema in kubernetes-validate; they are checked field by field below.
CRD_GROUPS = {
    "kafka.strimzi.io",
    "postgresql.cnpg.io",
    "keda.sh",
    "monitoring.coreos.com",
    "external-secrets.io",
}
# checkov findings skipped on purpose; docs/operations.md ("Policy checks") explains each.
ALLOWED_CHECKOV_SKIPS = {"CKV_K8S_43", "CKV_K8S_35"}

# The metrics the services export (name -> type, labels): dashboards and alerts may use no other.
METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "jobstream_jobs_submitted_total": ("counter", frozenset({"kind"})),
    "jobstream_jobs_finished_total": ("counter", frozenset({"kind", "state"})),
    "jobstream_jobs_running": ("gauge", frozenset()),
    "jobstream_jobs_stalled": ("gauge", frozenset()),
    "jobstream_job_duration_seconds": ("histogram", frozenset({"kind"})),
    "jobstream_chunk_duration_seconds": ("histogram", frozenset({"kind", "outcome"})),
    "jobstream_worker_chunks_in_flight": ("gauge", frozenset()),
    "jobstream_worker_concurrency": ("gauge", frozenset()),
    "jobstream_worker_chunks_claimed_waiting": ("gauge", frozenset()),
    "jobstream_worker_cancel_feed_partitions_read": ("gauge", frozenset()),
    "jobstream_worker_reports_resent_total": ("counter", frozenset()),
    "jobstream_chunk_retries_total": ("counter", frozenset({"kind"})),
    "jobstream_chunk_dead_letters_total": ("counter", frozenset({"kind"})),
    "jobstream_event_latency_seconds": ("histogram", frozenset()),
    "jobstream_watch_streams_open": ("gauge", frozenset()),
    "jobstream_watch_partitions_read": ("gauge", frozenset()),
    "jobstream_grpc_requests_total": ("counter", frozenset({"method", "code"})),
    "jobstream_grpc_request_duration_seconds": ("histogram", frozenset({"method"})),
    "jobstream_kafka_consumer_lag": ("gauge", frozenset({"topic", "group"})),
    "jobstream_outbox_backlog": ("gauge", frozenset()),
    "jobstream_db_pool_connections": ("gauge", frozenset({"state"})),
    # prometheus-client's default collectors, and Prometheus's own per-target series.
    "process_cpu_seconds_total": ("counter", frozenset()),
    "process_resident_memory_bytes": ("gauge", frozenset()),
    "process_virtual_memory_bytes": ("gauge", frozenset()),
    "process_open_fds": ("gauge", frozenset()),
    "process_max_fds": ("gauge", frozenset()),
    "process_start_time_seconds": ("gauge", frozenset()),
    "up": ("gauge", frozenset()),
}
# Labels Prometheus (or the Prometheus Operator) attaches to every scraped series.
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "container", "service", "endpoint"})
PROMQL_KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
    | {"inf", "nan", "atan2"}
)

Doc = dict[str, Any]


# ---------------------------------------------------------------- tools


def _tool(name: str) -> str | None:
    candidate = TOOLS / name
    if candidate.exists():
        return str(candidate)
    return shutil.which(name)


def _require_tool(name: str) -> str:
    path = _tool(name)
    if path is None:
        pytest.skip(f"{name} is not installed; install the deploy tools: {INSTALL_TOOLS}")
    return path


def _run(args: list[str], *, stdin: str | None = None, cwd: Path | None = None, timeout: float = 60) -> str:
    result = subprocess.run(args, input=stdin, capture_output=True, text=True, cwd=cwd, timeout=timeout, check=False)
    assert result.returncode == 0, f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@functools.cache
def _python_with(module: str) -> str | None:
    """The deploy venv's python, or this one, whichever can import `module`."""
    for python in (str(TOOLS / "python"), sys.executable):
        if Path(python).exists():
            probe = subprocess.run([python, "-c", f"import {module}"], capture_output=True, check=False)
            if probe.returncode == 0:
                return python
    return None


def _require_python_with(module: str, package: str) -> str:
    python = _python_with(module)
    if python is None:
        pytest.skip(f"no python with {package}; install the deploy tools: {INSTALL_TOOLS}")
    return python


_YAML_TO_JSON = "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)"


def _load_yaml(text: str) -> list[Doc]:
    python = _require_python_with("yaml", "PyYAML (to read the manifests)")
    docs: list[Doc] = json.loads(_run([python, "-c", _YAML_TO_JSON], stdin=text))
    return docs


def _load_yaml_file(path: Path) -> Doc:
    (doc,) = _load_yaml(path.read_text(encoding="utf-8"))
    return doc


# ---------------------------------------------------------------- rendered overlays


class Rendered:
    """One overlay rendered by `kubectl kustomize`, as text and as documents."""

    def __init__(self, name: str, text: str, docs: list[Doc]) -> None:
        self.name = name
        self.text = text
        self.docs = docs

    def of_kind(self, kind: str) -> list[Doc]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name: str) -> Doc:
        found = [d for d in self.of_kind(kind) if d["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.name}: expected one {kind} {name}, found {len(found)}"
        return found[0]

    @property
    def namespace(self) -> str:
        (namespace,) = self.of_kind("Namespace")
        name: str = namespace["metadata"]["name"]
        return name

    def deployment(self, service: str) -> Doc:
        return self.one("Deployment", f"jobstream-{service}")

    def config(self) -> dict[str, str]:
        (config,) = [c for c in self.of_kind("ConfigMap") if c["metadata"]["name"].startswith("jobstream-config")]
        data: dict[str, str] = config["data"]
        return data


@pytest.fixture(scope="module")
def rendered() -> dict[str, Rendered]:
    kubectl = _require_tool("kubectl")
    out: dict[str, Rendered] = {}
    for overlay in OVERLAYS:
        text = _run([kubectl, "kustomize", str(K8S / "overlays" / overlay)])
        out[overlay] = Rendered(overlay, text, _load_yaml(text))
    return out


@pytest.fixture(scope="module")
def rendered_files(rendered: dict[str, Rendered], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The rendered overlays and the Dockerfile in one directory, for checkov."""
    directory = tmp_path_factory.mktemp("rendered")
    for overlay, r in rendered.items():
        (directory / f"{overlay}.yaml").write_text(r.text, encoding="utf-8")
    shutil.copy(ROOT / "Dockerfile", directory / "Dockerfile")
    return directory


def _pod_spec(deployment: Doc) -> Doc:
    spec: Doc = deployment["spec"]["template"]["spec"]
    return spec


def _containers(deployment: Doc) -> Iterator[tuple[str, Doc]]:
    spec = _pod_spec(deployment)
    for container in spec.get("initContainers", []):
        yield "init", container
    for container in spec["containers"]:
        yield "main", container


# ---------------------------------------------------------------- image


def _dockerfile_stages() -> list[list[str]]:
    """Instructions per stage, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    stages: list[list[str]] = []
    for line in joined.splitlines():
        if not line.strip():
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line.strip())
    return stages


def test_dockerfile_builds_a_small_non_root_image_with_the_three_services() -> None:
    stages = _dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: build tools stay out of the runtime image"
    for stage in stages:
        assert re.match(r"FROM python:3\.11-slim\S* AS \w+", stage[0]), stage[0]
    runtime = stages[-1]
    users = [i.split()[1] for i in runtime if i.upper().startswith("USER ")]
    assert users, "the runtime stage sets a USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) >= 10000, "a numeric non-root UID, so runAsNonRoot can be verified"
    assert not [i for i in runtime if i.upper().startswith("RUN ") and "pip install" in i], (
        "the runtime stage copies the built virtualenv; it installs nothing"
    )
    assert any(i.startswith("COPY --from=") for i in runtime)
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    for service in SERVICES:
        assert f"python -m services.{service}" in text, f"the Dockerfile documents services.{service}"
    assert any(i.upper().startswith("CMD ") for i in runtime)


def _requirement_name(spec: str) -> str:
    return re.split(r"[\[<>=!~; ]", spec, maxsplit=1)[0].lower().replace("_", "-")


def test_dockerfile_installs_every_runtime_dependency_pinned_by_the_lock() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    needed = {_requirement_name(d) for d in project["dependencies"]}
    if any(d.replace(" ", "").startswith("psycopg[binary]") for d in project["dependencies"]):
        needed.add("psycopg-binary")
    prefix = "RUN pip install --constraint requirements.lock "
    install = [i for i in _dockerfile_stages()[0] if i.startswith(prefix)]
    assert install, "the build stage installs the dependencies constrained by requirements.lock"
    installed = {_requirement_name(word) for word in install[0].removeprefix(prefix).split()}
    assert needed <= installed, f"pyproject dependencies missing from the Dockerfile: {sorted(needed - installed)}"
    locked = {
        _requirement_name(line)
        for line in (ROOT / "requirements.lock").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert installed <= locked, f"not pinned in requirements.lock: {sorted(installed - locked)}"


def test_dockerignore_lets_in_only_what_the_image_needs() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "an allow-list: nothing enters the build context unless named"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = {i.split()[1] for i in _dockerfile_stages()[0] if i.startswith("COPY ") and "--from" not in i}
    assert copied <= allowed, f"COPY needs these let in: {sorted(copied - allowed)}"
    assert not allowed & {".venv", ".git", "tests", "deploy", ".jobstream"}


# ---------------------------------------------------------------- Kubernetes


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_whole_stack(rendered: dict[str, Rendered], overlay: str) -> None:
    r = rendered[overlay]
    for service in SERVICES:
        r.deployment(service)
        r.one("PodDisruptionBudget", f"jobstream-{service}")
    r.one("Service", "jobstream-gateway")
    r.one("ServiceAccount", "jobstream")
    r.one("Kafka", "jobstream")
    r.one("Cluster", "jobstream-db")
    r.one("PrometheusRule", "jobstream")
    r.one("NetworkPolicy", "default-deny-all")
    assert r.of_kind("KafkaNodePool")
    assert all(d["metadata"].get("namespace") == r.namespace for d in r.docs if d["kind"] != "Namespace"), (
        "every object lands in the overlay's namespace"
    )
    autoscalers = [
        d for d in r.of_kind("ScaledObject") + r.of_kind("HorizontalPodAutoscaler") if "jobstream-worker" in str(d)
    ]
    assert len(autoscalers) == 1, "exactly one autoscaler (KEDA or HPA) owns the workers"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_objects_match_the_kubernetes_schemas(rendered: dict[str, Rendered], overlay: str) -> None:
    """Strict validation (unknown fields are errors) of every built-in object. Custom resources
    (Strimzi, CloudNativePG, KEDA, Prometheus Operator, External Secrets) have no schema offline:
    they are skipped here, and their key fields are asserted by the tests below."""
    python = _require_python_with("kubernetes_validate", "kubernetes-validate")
    # One interpreter for every document and version: loading the schemas is the slow part.
    script = (
        "import json, sys\n"
        "import kubernetes_validate as kv\n"
        "docs = json.load(sys.stdin)\n"
        "out = []\n"
        "for version in sys.argv[1:]:\n"
        "    for d in docs:\n"
        "        entry = {'version': version, 'apiVersion': d['apiVersion'], 'kind': d['kind'],\n"
        "                 'name': d['metadata']['name'], 'result': 'valid'}\n"
        "        try:\n"
        "            kv.validate(d, version, strict=True)\n"
        "        except kv.SchemaNotFoundError:\n"
        "            entry['result'] = 'no schema'\n"
        "        except kv.ValidationError as err:\n"
        "            entry['result'] = f'invalid at {list(err.path)}: {err.message}'\n"
        "        out.append(entry)\n"
        "json.dump(out, sys.stdout)\n"
    )
    results = json.loads(_run([python, "-c", script, *KUBERNETES_VERSIONS], stdin=json.dumps(rendered[overlay].docs)))
    invalid = [r for r in results if r["result"] not in ("valid", "no schema")]
    assert not invalid, json.dumps(invalid, indent=1)
    unknown = [r for r in results if r["result"] == "no schema" and r["apiVersion"].split("/")[0] not in CRD_GROUPS]
    assert not unknown, f"objects with no schema that are not known custom resources: {unknown}"
    validated = {r["kind"] for r in results if r["result"] == "valid"}
    assert validated >= {"Namespace", "Deployment", "Service", "ConfigMap", "NetworkPolicy", "PodDisruptionBudget"}


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("service", SERVICES)
def test_pods_meet_the_restricted_security_profile(rendered: dict[str, Rendered], overlay: str, service: str) -> None:
    deployment = rendered[overlay].deployment(service)
    pod = _pod_spec(deployment)
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == "jobstream"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] >= 10000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    for _, container in _containers(deployment):
        sc = container["securityContext"]
        where = f"{overlay}/{service}/{container['name']}"
        assert sc["allowPrivilegeEscalation"] is False, where
        assert sc["readOnlyRootFilesystem"] is True, where
        assert sc["runAsNonRoot"] is True, where
        assert sc["capabilities"] == {"drop": ["ALL"]}, where
        assert not sc.get("privileged"), where
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{where} sets {kind}"


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("service", SERVICES)
def test_each_service_runs_its_entrypoint_with_probes(
    rendered: dict[str, Rendered], overlay: str, service: str
) -> None:
    deployment = rendered[overlay].deployment(service)
    (container,) = _pod_spec(deployment)["containers"]
    assert container["command"] == ["python", "-m", f"services.{service}"]
    assert container["image"].startswith(("registry.example.com/jobstream", "jobstream")), container["image"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == 9100
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert probe in container, f"{service} has a {probe}"
    if service == "gateway":
        assert ports["grpc"] == 50051
        tls = any(e["name"] == "JOBSTREAM_GATEWAY_TLS_CERT" for e in container["env"])
        for probe in ("startupProbe", "livenessProbe"):
            if tls:
                # Native gRPC probes speak plaintext only: with TLS on the gRPC port they use /livez.
                assert "grpc" not in container[probe], f"{overlay}: a plaintext gRPC {probe} on a TLS port"
                assert container[probe]["httpGet"] == {"path": "/livez", "port": "metrics"}
            else:
                assert container[probe]["grpc"]["port"] == 50051
    else:
        assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    env = {e["name"]: e for e in container["env"]}
    assert env["JOBSTREAM_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "jobstream-db-app", "key": "uri"}
    assert [s["configMapRef"]["name"] for s in container["envFrom"]] == [
        c["metadata"]["name"]
        for c in rendered[overlay].of_kind("ConfigMap")
        if "jobstream-config" in c["metadata"]["name"]
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_match_the_topics_and_the_service_contract(rendered: dict[str, Rendered], overlay: str) -> None:
    r = rendered[overlay]
    config = r.config()
    assert config["JOBSTREAM_GATEWAY_LISTEN"] == "0.0.0.0:50051"
    assert config["JOBSTREAM_METRICS_PORT"] == "9100"
    assert config["JOBSTREAM_LOG_JSON"] == "true"
    assert config["JOBSTREAM_JOB_PARTITIONS"] == "12"
    assert config["JOBSTREAM_CHUNK_PARTITIONS"] == "24"
    assert config["JOBSTREAM_KAFKA_BOOTSTRAP"] == "jobstream-kafka-bootstrap:9092"
    # The topics the code expects, with the counts these settings give: the scheduler re-creates a
    # topic whose partition count differs, so the manifests must agree with it exactly.
    settings = Settings.from_env({k: v for k, v in config.items() if k.startswith("JOBSTREAM_")})
    expected = {spec.name: spec.partitions for spec in topic_specs(settings)}
    topics = r.of_kind("KafkaTopic")
    assert {t["spec"]["topicName"]: t["spec"]["partitions"] for t in topics} == expected
    assert expected[CHUNKS] == 24 and expected[SUBMITTED] == 12
    for topic in topics:
        assert topic["spec"]["replicas"] == settings.replication_factor, topic["spec"]["topicName"]
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == "jobstream"
    assert r.one("Kafka", "jobstream")["spec"]["kafka"]["config"]["auto.create.topics.enable"] is False
    assert "topicOperator" in r.one("Kafka", "jobstream")["spec"]["entityOperator"]
    brokers = sum(p["spec"]["replicas"] for p in r.of_kind("KafkaNodePool") if "broker" in p["spec"]["roles"])
    assert brokers >= int(config["JOBSTREAM_REPLICATION_FACTOR"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_drain_within_their_grace_period(rendered: dict[str, Rendered], overlay: str) -> None:
    worker = rendered[overlay].deployment("worker")
    assert "replicas" not in worker["spec"], "the autoscaler owns the worker count"
    drain = float(rendered[overlay].config()["JOBSTREAM_DRAIN_SECONDS"])
    assert _pod_spec(worker)["terminationGracePeriodSeconds"] > drain
    (container,) = _pod_spec(worker)["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["JOBSTREAM_WORKER_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_keda_scales_workers_on_the_chunk_topic_lag(rendered: dict[str, Rendered]) -> None:
    r = rendered["prod"]
    scaled = r.one("ScaledObject", "jobstream-worker")["spec"]
    assert scaled["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "jobstream-worker"}
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert meta["topic"] == "jobs.chunks"
    assert meta["consumerGroup"] == "jobstream-workers"
    # KEDA's operator connects from its own namespace: the address names this one.
    assert meta["bootstrapServers"] == f"jobstream-kafka-bootstrap.{r.namespace}.svc:9092"
    assert 1 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"]
    assert scaled["maxReplicaCount"] <= int(r.config()["JOBSTREAM_CHUNK_PARTITIONS"]) == 24


def test_the_hpa_alternative_scales_workers_within_the_partition_count(rendered: dict[str, Rendered]) -> None:
    r = rendered["dev"]
    hpa = r.one("HorizontalPodAutoscaler", "jobstream-worker")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "jobstream-worker"}
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"] <= int(r.config()["JOBSTREAM_CHUNK_PARTITIONS"])


def test_dev_is_small_and_prod_is_replicated(rendered: dict[str, Rendered]) -> None:
    dev, prod = rendered["dev"], rendered["prod"]
    for service in ("gateway", "scheduler"):
        assert dev.deployment(service)["spec"]["replicas"] == 1
        assert prod.deployment(service)["spec"]["replicas"] >= 2
        # Every PDB leaves room for a drain, and in prod keeps at least one replica serving.
        pdb = prod.one("PodDisruptionBudget", f"jobstream-{service}")["spec"]
        assert pdb["maxUnavailable"] < prod.deployment(service)["spec"]["replicas"]
    assert dev.one("Cluster", "jobstream-db")["spec"]["instances"] == 1
    assert prod.one("Cluster", "jobstream-db")["spec"]["instances"] >= 3
    assert sum(p["spec"]["replicas"] for p in dev.of_kind("KafkaNodePool")) == 1
    assert sum(p["spec"]["replicas"] for p in prod.of_kind("KafkaNodePool")) >= 3


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budgets_select_their_service(rendered: dict[str, Rendered], overlay: str) -> None:
    r = rendered[overlay]
    for service in SERVICES:
        pdb = r.one("PodDisruptionBudget", f"jobstream-{service}")["spec"]
        labels = r.deployment(service)["spec"]["template"]["metadata"]["labels"]
        assert pdb["selector"]["matchLabels"].items() <= labels.items()
        assert "maxUnavailable" in pdb, "maxUnavailable, so a single replica can still be drained"


def test_secrets_come_from_outside_the_repository(rendered: dict[str, Rendered]) -> None:
    dev, prod = rendered["dev"], rendered["prod"]
    for r in (dev, prod):
        assert not r.of_kind("Secret"), f"{r.name} commits no Secret"
        # API keys live hashed in Postgres (managed with `jobstream keys`), never in the manifests.
        assert "JOBSTREAM_API_KEYS" not in r.text and "jobstream-api-keys" not in r.text, r.name
    assert not dev.of_kind("ExternalSecret"), "dev serves plaintext and needs no Secret of its own"
    (external,) = prod.of_kind("ExternalSecret")
    target = external["spec"]["target"]
    assert target["name"] == "jobstream-gateway-tls"
    assert target["template"]["type"] == "kubernetes.io/tls"
    assert set(target["template"]["data"]) == {"tls.crt", "tls.key"}
    fetched = {d["secretKey"] for d in external["spec"]["data"]}
    for key, template in target["template"]["data"].items():
        used = set(re.findall(r"\{\{\s*\.(\w+)\s*\}\}", template))
        assert used and used <= fetched, f"{key} is built from keys the ExternalSecret fetches"
    for r in (dev, prod):
        provided = {s["metadata"]["name"] for s in r.of_kind("Secret")}
        provided |= {e["spec"]["target"]["name"] for e in r.of_kind("ExternalSecret")}
        provided |= {f"{c['metadata']['name']}-app" for c in r.of_kind("Cluster")}  # made by CloudNativePG
        for service in SERVICES:
            deployment = r.deployment(service)
            for volume in _pod_spec(deployment).get("volumes", []):
                if "secret" in volume:
                    name = volume["secret"]["secretName"]
                    assert name in provided, f"{r.name}/{service}: Secret {name} comes from nowhere"
            for _, container in _containers(deployment):
                for env in container.get("env", []):
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["name"] in provided, f"{r.name}/{service}: Secret {ref['name']} comes from nowhere"


def test_prod_gateway_serves_tls_from_its_secret_and_dev_plaintext(rendered: dict[str, Rendered]) -> None:
    for r in rendered.values():
        pod = _pod_spec(r.deployment("gateway"))
        (container,) = pod["containers"]
        env = {e["name"]: e.get("value", "") for e in container["env"]}
        grpc_port = {p["name"]: p for p in r.one("Service", "jobstream-gateway")["spec"]["ports"]}["grpc"]
        tls_settings = {k: v for k, v in {**r.config(), **env}.items() if k.startswith("JOBSTREAM_GATEWAY_TLS")}
        if r.name == "dev":
            assert not tls_settings, "dev serves plaintext gRPC"
            assert grpc_port["appProtocol"] == "kubernetes.io/h2c"
            continue
        (volume,) = [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == "jobstream-gateway-tls"]
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
        assert mount["readOnly"] is True
        assert volume["secret"]["defaultMode"] & 0o007 == 0, "the private key is not world-readable"
        assert tls_settings == {
            "JOBSTREAM_GATEWAY_TLS_CERT": f"{mount['mountPath']}/tls.crt",
            "JOBSTREAM_GATEWAY_TLS_KEY": f"{mount['mountPath']}/tls.key",
        }
        Settings.from_env({**r.config(), **env})  # the gateway accepts these settings
        assert "appProtocol" not in grpc_port, "the gRPC port is no longer cleartext h2c"
        # The scheduler and workers serve no TLS and do not see the gateway's key.
        for service in ("scheduler", "worker"):
            assert "jobstream-gateway-tls" not in json.dumps(r.deployment(service)), service


def _selects(selector: Doc, labels: dict[str, str]) -> bool:
    if not selector:
        return True
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        value = labels.get(expression["key"])
        if expression["operator"] == "In" and value not in expression["values"]:
            return False
        if expression["operator"] == "NotIn" and value in expression["values"]:
            return False
        if expression["operator"] == "Exists" and value is None:
            return False
        if expression["operator"] == "DoesNotExist" and value is not None:
            return False
    return True


def _egress_ports(policies: list[Doc], pod: dict[str, str], peer: dict[str, str]) -> set[int]:
    ports: set[int] = set()
    for policy in policies:
        spec = policy["spec"]
        if "Egress" not in spec["policyTypes"] or not _selects(spec["podSelector"], pod):
            continue
        for rule in spec.get("egress", []):
            peers = rule.get("to", [])
            same_namespace = [p for p in peers if "podSelector" in p and "namespaceSelector" not in p]
            if any(_selects(p["podSelector"], peer) for p in same_namespace):
                ports |= {p["port"] for p in rule.get("ports", [])}
    return ports


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_deny_by_default_and_open_the_needed_flows(
    rendered: dict[str, Rendered], overlay: str
) -> None:
    r = rendered[overlay]
    policies = r.of_kind("NetworkPolicy")
    deny = r.one("NetworkPolicy", "default-deny-all")["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny
    kafka_pod = {"strimzi.io/cluster": "jobstream", "strimzi.io/kind": "Kafka", "strimzi.io/broker-role": "true"}
    postgres_pod = {"cnpg.io/cluster": "jobstream-db", "cnpg.io/podRole": "instance"}
    for service in SERVICES:
        labels = r.deployment(service)["spec"]["template"]["metadata"]["labels"]
        assert 9092 in _egress_ports(policies, labels, kafka_pod), f"{service} reaches Kafka"
        assert 5432 in _egress_ports(policies, labels, postgres_pod), f"{service} reaches Postgres"
        assert not _egress_ports(policies, labels, {"app.kubernetes.io/name": "something-else"}), (
            f"{service} reaches nothing else in the namespace"
        )
    dns = r.one("NetworkPolicy", "allow-dns")["spec"]
    assert dns["podSelector"] == {} and {p["port"] for p in dns["egress"][0]["ports"]} == {53}
    gateway = r.one("NetworkPolicy", "jobstream-gateway-ingress")["spec"]
    assert [p["port"] for p in gateway["ingress"][0]["ports"]] == [50051]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_scrapes_each_service_under_its_job_name(rendered: dict[str, Rendered], overlay: str) -> None:
    r = rendered[overlay]
    monitors = r.of_kind("ServiceMonitor") + r.of_kind("PodMonitor")
    for service in SERVICES:
        job = f"jobstream-{service}"
        matching = [m for m in monitors if m["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": job}]
        assert len(matching) == 1, f"one monitor for {job}"
        (monitor,) = matching
        # The Prometheus job label is read from app.kubernetes.io/name, whose value is the job name.
        assert monitor["spec"]["jobLabel"] == "app.kubernetes.io/name"
        if monitor["kind"] == "ServiceMonitor":
            assert r.one("Service", job)["metadata"]["labels"]["app.kubernetes.io/name"] == job
            endpoints = monitor["spec"]["endpoints"]
        else:
            assert r.deployment(service)["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == job
            endpoints = monitor["spec"]["podMetricsEndpoints"]
        assert [(e["port"], e["path"]) for e in endpoints] == [("metrics", "/metrics")]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_dashboard_and_rules_are_deployed_from_their_one_source(rendered: dict[str, Rendered], overlay: str) -> None:
    r = rendered[overlay]
    dashboard = r.one("ConfigMap", "jobstream-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["data"]["jobstream.json"] == DASHBOARD.read_text(encoding="utf-8")
    rule = r.one("PrometheusRule", "jobstream")
    assert rule["spec"] == _load_yaml_file(PROMETHEUS / "alerts.yml")


def test_prometheusrule_manifest_is_fresh() -> None:
    result = subprocess.run(
        [sys.executable, str(PROMETHEUS / "make_rule.py"), "--check"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_checkov_finds_nothing_unexplained(rendered_files: Path) -> None:
    checkov = _require_tool("checkov")
    args = [checkov, "--directory", str(rendered_files), "--framework", "kubernetes", "dockerfile"]
    args += ["--output", "json", "--compact", "--skip-download"]  # offline: no policy metadata download
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert {r["check_type"] for r in reports} == {"kubernetes", "dockerfile"}
    documented = OPERATIONS.read_text(encoding="utf-8")
    for report in reports:
        summary = report["summary"]
        failed = [(c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]]
        assert not failed, f"checkov {report['check_type']} failed: {failed}"
        assert summary["parsing_errors"] == 0 and summary["passed"] > 0
        for check in report["results"]["skipped_checks"]:
            assert check["check_result"].get("suppress_comment", "").strip(), f"{check['check_id']} skipped unexplained"
            assert check["check_id"] in ALLOWED_CHECKOV_SKIPS, f"unexpected skip {check['check_id']}"
    assert result.returncode == 0, result.stderr
    for check_id in ALLOWED_CHECKOV_SKIPS:
        assert check_id in documented, f"docs/operations.md explains why {check_id} is skipped"


# ---------------------------------------------------------------- alerts


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return path


def test_alert_rules_pass_promtool_check() -> None:
    _run([_promtool(), "check", "rules", str(PROMETHEUS / "alerts.yml")])


def test_alert_rules_pass_their_unit_tests() -> None:
    _run([_promtool(), "test", "rules", str(PROMETHEUS / "alerts_test.yml")], cwd=PROMETHEUS)


def test_example_prometheus_config_is_valid() -> None:
    _run([_promtool(), "check", "config", str(PROMETHEUS / "prometheus.yml")], cwd=PROMETHEUS)


def _alerts() -> list[Doc]:
    groups = _load_yaml_file(PROMETHEUS / "alerts.yml")["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def _github_anchors(markdown: str) -> set[str]:
    anchors = set()
    for line in markdown.splitlines():
        heading = re.match(r"#{1,6} (.+)", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            anchors.add(slug)
    return anchors


def test_every_alert_is_labelled_annotated_and_documented() -> None:
    anchors = _github_anchors(OPERATIONS.read_text(encoding="utf-8"))
    alerts = _alerts()
    assert {a["alert"] for a in alerts} >= {
        "JobstreamChunkLagGrowing",
        "JobstreamJobsStalled",
        "JobstreamGrpcErrorRateHigh",
        "JobstreamChunkFailureRateHigh",
        "JobstreamDeadLetters",
        "JobstreamNoWorkers",
    }
    for alert in alerts:
        name = alert["alert"]
        assert alert["labels"]["severity"] in {"warning", "critical"}, name
        assert alert["annotations"]["summary"] and alert["annotations"]["description"], name
        url = alert["annotations"]["runbook_url"]
        assert url == f"docs/operations.md#{name.lower()}", name
        assert name.lower() in anchors, f"docs/operations.md has a section {name}"


def test_every_alert_is_unit_tested_firing_and_quiet() -> None:
    tests = _load_yaml_file(PROMETHEUS / "alerts_test.yml")
    assert tests["rule_files"] == ["alerts.yml"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {a["alert"] for a in _alerts()}
    assert names <= firing, f"never shown firing: {sorted(names - firing)}"
    assert names <= quiet, f"never shown quiet: {sorted(names - quiet)}"


# ---------------------------------------------------------------- PromQL, statically


def _promql_names(expr: str) -> tuple[list[tuple[str, set[str]]], set[str], set[str]]:
    """(selectors with their matcher labels, bare metric names, grouping labels) of one expression."""
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    selectors: list[tuple[str, set[str]]] = []
    for name, matchers in re.findall(r"([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}", text):
        selectors.append((name, set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))))
    grouping: set[str] = set()
    for _, labels in re.findall(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", text):
        grouping |= {label.strip() for label in labels.split(",") if label.strip()}
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    bare = {
        name for name in re.findall(r"(?<![\w.$])([a-zA-Z_:][\w:]*)\b(?!\s*\()", text) if name not in PROMQL_KEYWORDS
    }
    return selectors, bare | {name for name, _ in selectors}, grouping


def _metric_labels(name: str) -> frozenset[str] | None:
    """The labels a series name may carry, or None when no exported metric has that name."""
    if name in METRICS:
        return METRICS[name][1]
    for suffix, extra in (("_bucket", {"le"}), ("_count", set()), ("_sum", set())):
        base = name.removesuffix(suffix)
        if name.endswith(suffix) and METRICS.get(base, ("", frozenset()))[0] == "histogram":
            return METRICS[base][1] | extra
    return None


def _check_expr(where: str, expr: str) -> set[str]:
    selectors, names, grouping = _promql_names(expr)
    assert names, f"{where}: no metric in {expr!r}"
    known: set[str] = set(TARGET_LABELS)
    for name in names:
        labels = _metric_labels(name)
        assert labels is not None, f"{where}: {name} is not a metric jobstream exports"
        known |= labels
    for name, matchers in selectors:
        allowed = (_metric_labels(name) or frozenset()) | TARGET_LABELS
        assert matchers <= allowed, f"{where}: {name} has no label {sorted(matchers - allowed)}"
    assert grouping <= known, f"{where}: grouping by unknown labels {sorted(grouping - known)}"
    for inner in re.findall(r"histogram_quantile\(\s*[\d.]+\s*,(.*)", expr):
        assert "_bucket" in inner and re.search(r"\bby\s*\([^)]*\ble\b", inner), f"{where}: quantile needs le"
    return names


def _dashboard() -> Doc:
    dashboard: Doc = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return dashboard


def _panels(dashboard: Doc) -> list[Doc]:
    panels: list[Doc] = []
    for panel in dashboard["panels"]:
        panels.extend(panel.get("panels", []) if panel["type"] == "row" else [panel])
    return panels


def test_dashboard_uses_a_datasource_variable_and_every_panel_queries_it() -> None:
    dashboard = _dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = _panels(dashboard)
    assert len({p["id"] for p in panels}) == len(panels), "panel ids are unique"
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_queries_only_exported_metrics_and_shows_them_all() -> None:
    used: set[str] = set()
    for panel in _panels(_dashboard()):
        for target in panel["targets"]:
            used |= _check_expr(f"panel {panel['title']!r}", target["expr"])
    bases = {re.sub(r"_(bucket|count|sum)$", "", name) for name in used}
    jobstream_metrics = {name for name in METRICS if name.startswith("jobstream_")}
    assert jobstream_metrics <= bases, f"no panel shows {sorted(jobstream_metrics - bases)}"
    titles = " ".join(p["title"].lower() for p in _panels(_dashboard()))
    for topic in ("submitted", "finished", "chunks", "running", "duration", "latency", "lag", "workers"):
        assert topic in titles, f"a panel about {topic}"
    for topic in ("utilisation", "watch streams", "grpc errors", "dead letters", "retries", "outbox", "db pool"):
        assert topic in titles, f"a panel about {topic}"


def test_alert_rules_query_only_exported_metrics() -> None:
    for alert in _alerts():
        _check_expr(f"alert {alert['alert']}", alert["expr"])


def test_exported_metrics_exist_in_the_code() -> None:
    sources = " ".join(
        path.read_text(encoding="utf-8")
        for package in ("jobstream", "services")
        for path in (ROOT / package).rglob("*.py")
        if "/v1/" not in path.as_posix()
    )
    missing = [name for name in METRICS if name.startswith("jobstream_") and f'"{name}"' not in sources]
    assert not missing, f"the dashboard and alerts rely on metrics the services do not define: {missing}"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    promtool = _promtool()
    rules = []
    for panel in _panels(_dashboard()):
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", "5m")
            rules.append({"record": f"dashboard:panel{panel['id']}:{target['refId']}", "expr": expr})
    # JSON is YAML: promtool reads the rule file without a YAML writer here.
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    _run([promtool, "check", "rules", str(path)])
