"""The deployment, checked without a cluster: every overlay renders with ``kubectl kustomize``;
core objects validate against the Kubernetes schemas (strict, 1.30 and the newest known);
custom resources against the schemas in ``deploy/schemas``; yamllint passes; the references
between objects hold after rendering, also under a name prefix and suffix; the worker runs the
documented CLI; the dashboards are the JSON files; the Dockerfile is multi-stage and non-root.

``kubectl`` comes from PATH (``AMQPSCHED_KUBECTL`` names another one; ``.ci/run`` installs
Debian's when none is there). The manifests render the same with kustomize v2.0.3 and v5.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from amqpsched.cli import build_parser
from amqpsched.settings import Settings
from amqpsched.topology import Topology
from amqpsched.worker.builtin import app as builtin_app

from .conftest import ROOT

DEPLOY = ROOT / "deploy"
OVERLAYS = sorted(p.parent.name for p in (DEPLOY / "overlays").glob("*/kustomization.yaml"))
SCHEMAS = DEPLOY / "schemas"
DEFINITIONS = DEPLOY / "rabbitmq" / "definitions.json"
GRAFANA = DEPLOY / "grafana"
PROMETHEUS_RULE = DEPLOY / "prometheus" / "amqpsched-prometheusrule.yaml"

#: Kubernetes versions the core objects must be valid in: the oldest supported, the newest known.
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())
CORE_API_VERSIONS = frozenset({"v1", "apps/v1", "policy/v1", "networking.k8s.io/v1"})
#: Secrets the manifests use but do not contain: created by the operator of the cluster before
#: the first apply (docs/deploy.md, "Secrets"), with these keys. No password is in the repo.
EXTERNAL_SECRETS: dict[str, frozenset[str]] = {
    "amqpsched-broker-client": frozenset({"password"}),
    "amqpsched-broker-worker": frozenset({"password"}),
    "amqpsched-broker-scheduler": frozenset({"password"}),
    "amqpsched-broker-keda": frozenset({"password", "host"}),
}
#: Volumes that the RabbitMQ Cluster Operator adds to its StatefulSet (override may mount them).
OPERATOR_VOLUMES = frozenset({"rabbitmq-confd", "persistence", "server-conf", "pod-info"})
#: Labels the RabbitMQ Cluster Operator puts on the pods and Service of cluster NAME.
OPERATOR_LABELS = {
    "app.kubernetes.io/component": "rabbitmq",
    "app.kubernetes.io/part-of": "rabbitmq",
}
#: Ports of the Service the operator makes for a RabbitmqCluster (without TLS).
OPERATOR_SERVICE_PORTS = {"amqp": 5672, "management": 15672, "prometheus": 15692}
WORKER_MODULE = ["python", "-m", "amqpsched.worker"]
SCHEDULER_MODULE = ["python", "-m", "amqpsched.scheduler"]
#: The command line docs/deploy.md gives for the resize workers.
RESIZE_CLI = "python -m amqpsched.worker --capability resize"
VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")

Obj = dict[str, Any]


def load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def project_version() -> str:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return str(data["project"]["version"])


# -- rendering -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kubectl() -> str:
    found = os.environ.get("AMQPSCHED_KUBECTL") or shutil.which("kubectl")
    if found is None:
        message = "kubectl is not installed (.ci/run installs Debian's kubernetes-client)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def kustomize(kubectl: str, path: Path) -> list[Obj]:
    done = subprocess.run(
        [kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"kubectl kustomize {path} failed:\n{done.stderr}"
    return [o for o in yaml.safe_load_all(done.stdout) if o]


@pytest.fixture(scope="module")
def rendered(kubectl: str) -> dict[str, list[Obj]]:
    return {name: kustomize(kubectl, DEPLOY / "overlays" / name) for name in OVERLAYS}


@pytest.fixture(scope="module")
def renamed(kubectl: str, tmp_path_factory: pytest.TempPathFactory) -> list[Obj]:
    """An overlay of a copy of deploy/ that adds a name prefix *and* suffix to everything (and,
    as docs/deploy.md says, sets BROKER_HOST to the renamed cluster)."""
    root = tmp_path_factory.mktemp("deploy") / "deploy"
    shutil.copytree(DEPLOY, root)
    overlay = root / "overlays" / "renamed"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "namespace: team-a\nnamePrefix: pre-\nnameSuffix: -suf\nbases:\n  - ../../base\n"
        "patchesStrategicMerge:\n  - patch.yaml\n"
    )
    (overlay / "patch.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: amqpsched-config\n"
        "data:\n  BROKER_HOST: pre-amqpsched-rabbitmq-suf\n"
    )
    return kustomize(kubectl, overlay)


def all_renders(
    rendered: dict[str, list[Obj]], renamed: list[Obj]
) -> Iterator[tuple[str, list[Obj]]]:
    yield from rendered.items()
    yield "renamed", renamed


def of_kind(objects: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind]


def named(objects: list[Obj], kind: str, name: str) -> Obj | None:
    return next((o for o in of_kind(objects, kind) if o["metadata"]["name"] == name), None)


def test_every_overlay_renders(rendered: dict[str, list[Obj]]) -> None:
    assert set(OVERLAYS) >= {"dev", "prod"}
    for name, objects in rendered.items():
        kinds = {o["kind"] for o in objects}
        assert {
            "ConfigMap",
            "Deployment",
            "PodDisruptionBudget",
            "NetworkPolicy",
            "RabbitmqCluster",
            "ScaledObject",
            "TriggerAuthentication",
            "PodMonitor",
            "ServiceMonitor",
            "PrometheusRule",
        } <= kinds, name
        namespaces = {o["metadata"].get("namespace") for o in objects}
        assert len(namespaces) == 1 and None not in namespaces, (name, namespaces)


# -- schemas -------------------------------------------------------------------------------------


def custom_schema(obj: Obj) -> dict[str, Any]:
    group, _, version = obj["apiVersion"].partition("/")
    path = SCHEMAS / f"{group}_{version}_{obj['kind'].lower()}.json"
    assert path.exists(), f"no schema in deploy/schemas for {obj['apiVersion']} {obj['kind']}"
    schema: dict[str, Any] = json.loads(path.read_text())
    return schema


def schema_errors(obj: Obj) -> list[str]:
    """Why ``obj`` is invalid: Kubernetes' own schemas (strict) for core objects, the pruned
    CRD schemas of deploy/schemas for custom resources."""
    if obj["apiVersion"] in CORE_API_VERSIONS:
        errors = []
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = "/".join(str(p) for p in exc.path)
                errors.append(f"k8s {version}: {path}: {exc.message}")
        return errors
    validator = jsonschema.Draft202012Validator(custom_schema(obj))
    return [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(obj)]


DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def test_objects_valid_against_schemas(rendered: dict[str, list[Obj]], renamed: list[Obj]) -> None:
    problems = []
    for overlay, objects in all_renders(rendered, renamed):
        for obj in objects:
            name = obj["metadata"]["name"]
            if not DNS_LABEL.match(name) or len(name) > 63:
                problems.append(f"{overlay} {obj['kind']}/{name}: not a DNS label")
            problems += [f"{overlay} {obj['kind']}/{name}: {e}" for e in schema_errors(obj)]
    assert not problems, "\n".join(problems)


def test_custom_resource_schemas_are_strict(rendered: dict[str, list[Obj]]) -> None:
    """A misspelt field fails, in a custom resource as in a core one."""
    objects = rendered["prod"]
    for kind in ("ScaledObject", "RabbitmqCluster", "PodMonitor", "Deployment"):
        obj = copy.deepcopy(of_kind(objects, kind)[0])
        obj["spec"]["replicaCount"] = 3
        assert schema_errors(obj), kind
    scaled = copy.deepcopy(of_kind(objects, "ScaledObject")[0])
    scaled["spec"]["minReplicaCount"] = "zero"
    assert schema_errors(scaled)
    for name in ("keda.sh_v1alpha1_scaledobject", "rabbitmq.com_v1beta1_rabbitmqcluster"):
        schema = json.loads((SCHEMAS / f"{name}.json").read_text())
        jsonschema.Draft202012Validator.check_schema(schema)


def test_yamllint() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "yamllint",
            "--strict",
            "-c",
            str(DEPLOY / ".yamllint"),
            str(DEPLOY),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# -- references ----------------------------------------------------------------------------------


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        present = expr["key"] in labels
        if expr["operator"] == "In" and labels.get(expr["key"]) not in expr["values"]:
            return False
        if expr["operator"] == "NotIn" and labels.get(expr["key"]) in expr["values"]:
            return False
        if expr["operator"] == "Exists" and not present:
            return False
        if expr["operator"] == "DoesNotExist" and present:
            return False
    return True


def pod_specs(objects: list[Obj]) -> Iterator[tuple[str, dict[str, str], dict[str, Any]]]:
    """(owner, pod labels, pod spec) of every Deployment and of each RabbitmqCluster's pods
    (the operator's labels; the override's part of the spec)."""
    for dep in of_kind(objects, "Deployment"):
        template = dep["spec"]["template"]
        yield (
            f"Deployment/{dep['metadata']['name']}",
            template["metadata"]["labels"],
            template["spec"],
        )
    for cluster in of_kind(objects, "RabbitmqCluster"):
        labels = {**OPERATOR_LABELS, "app.kubernetes.io/name": cluster["metadata"]["name"]}
        spec = cluster["spec"].get("override", {}).get("statefulSet", {}).get("spec", {})
        yield (
            f"RabbitmqCluster/{cluster['metadata']['name']}",
            labels,
            spec.get("template", {}).get("spec", {}),
        )


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def config_value(objects: list[Obj], container: dict[str, Any], key: str) -> str | None:
    """The value of env ``key`` in ``container``: its env list, else its ConfigMaps."""
    for env in container.get("env", []):
        if env["name"] == key and "value" in env:
            return str(env["value"])
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        config = named(objects, "ConfigMap", ref["name"]) if ref else None
        if config is not None and key in config.get("data", {}):
            return str(config["data"][key])
    return None


def reference_problems(objects: list[Obj]) -> list[str]:
    """Every broken reference among ``objects`` (one rendered overlay)."""
    problems: list[str] = []
    configmaps = {o["metadata"]["name"]: o for o in of_kind(objects, "ConfigMap")}
    secrets = {o["metadata"]["name"]: o for o in of_kind(objects, "Secret")}
    clusters = {o["metadata"]["name"] for o in of_kind(objects, "RabbitmqCluster")}

    def secret_key(where: str, name: str, key: str) -> None:
        if name in secrets:
            data = {**secrets[name].get("data", {}), **secrets[name].get("stringData", {})}
            if key not in data:
                problems.append(f"{where}: Secret {name} has no key {key}")
        elif key not in EXTERNAL_SECRETS.get(name, frozenset()):
            problems.append(f"{where}: Secret {name} (key {key}) is neither rendered nor external")

    def configmap_key(where: str, name: str, key: str | None) -> None:
        if name not in configmaps:
            problems.append(f"{where}: no ConfigMap {name}")
        elif key is not None and key not in configmaps[name].get("data", {}):
            problems.append(f"{where}: ConfigMap {name} has no key {key}")

    for owner, _labels, pod in pod_specs(objects):
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for volume in volumes.values():
            if "configMap" in volume:
                configmap_key(f"{owner} volume {volume['name']}", volume["configMap"]["name"], None)
            if "secret" in volume:
                name = volume["secret"]["secretName"]
                if name not in secrets and name not in EXTERNAL_SECRETS:
                    problems.append(f"{owner}: no Secret {name}")
        for container in containers(pod):
            where = f"{owner} container {container['name']}"
            defined: set[str] = set()
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    name = source["configMapRef"]["name"]
                    configmap_key(where, name, None)
                    defined |= set(configmaps.get(name, {}).get("data", {}))
            for env in container.get("env", []):
                ref = env.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    secret_key(where, ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"])
                if "configMapKeyRef" in ref:
                    key_ref = ref["configMapKeyRef"]
                    configmap_key(where, key_ref["name"], key_ref["key"])
                for var in VAR_REF.findall(env.get("value", "")):
                    if var not in defined:
                        problems.append(f"{where}: env {env['name']} uses undefined $({var})")
                defined.add(env["name"])
            known = set(volumes) | (OPERATOR_VOLUMES if owner.startswith("Rabbitmq") else set())
            for mount in container.get("volumeMounts", []):
                if mount["name"] not in known:
                    problems.append(f"{where}: no volume {mount['name']}")
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            for probe_name in ("livenessProbe", "readinessProbe", "startupProbe"):
                probe = container.get(probe_name, {}).get("httpGet")
                if (
                    probe is not None
                    and probe["port"] not in ports
                    and probe["port"] not in (ports.values())
                ):
                    problems.append(f"{where}: {probe_name} port {probe['port']} is not declared")
            host = config_value(objects, container, "BROKER_HOST")
            if host is not None and host.split(".")[0] not in clusters:
                problems.append(f"{where}: BROKER_HOST {host} is no RabbitmqCluster ({clusters})")

    deployments = {d["metadata"]["name"]: d for d in of_kind(objects, "Deployment")}
    for dep in deployments.values():
        labels = dep["spec"]["template"]["metadata"]["labels"]
        if not selects(dep["spec"]["selector"], labels):
            problems.append(f"Deployment/{dep['metadata']['name']}: selector misses its pods")
    auths = {o["metadata"]["name"] for o in of_kind(objects, "TriggerAuthentication")}
    for scaled in of_kind(objects, "ScaledObject"):
        where = f"ScaledObject/{scaled['metadata']['name']}"
        target = scaled["spec"]["scaleTargetRef"]
        if target.get("kind", "Deployment") != "Deployment" or target["name"] not in deployments:
            problems.append(f"{where}: targets no rendered Deployment ({target['name']})")
        for trigger in scaled["spec"]["triggers"]:
            auth = trigger.get("authenticationRef", {}).get("name")
            if auth is not None and auth not in auths:
                problems.append(f"{where}: no TriggerAuthentication {auth}")
    for auth in of_kind(objects, "TriggerAuthentication"):
        for ref in auth["spec"].get("secretTargetRef", []):
            secret_key(f"TriggerAuthentication/{auth['metadata']['name']}", ref["name"], ref["key"])

    pods = list(pod_specs(objects))
    for kind in ("PodDisruptionBudget", "PodMonitor", "NetworkPolicy"):
        for obj in of_kind(objects, kind):
            selector = obj["spec"]["podSelector" if kind == "NetworkPolicy" else "selector"]
            matched = [(o, pod) for o, labels, pod in pods if selects(selector, labels)]
            if not matched:
                problems.append(f"{kind}/{obj['metadata']['name']}: selects no pod")
            if kind == "PodMonitor":
                for endpoint in obj["spec"]["podMetricsEndpoints"]:
                    for owner, pod in matched:
                        names = {p.get("name") for c in containers(pod) for p in c.get("ports", [])}
                        if endpoint["port"] not in names:
                            problems.append(f"PodMonitor: {owner} has no port {endpoint['port']}")
            if kind == "NetworkPolicy":
                for rule in obj["spec"].get("ingress", []):
                    for port in rule.get("ports", []):
                        for owner, pod in matched:
                            declared = {
                                p.get(k) for c in containers(pod) for p in c.get("ports", [])
                                for k in ("name", "containerPort")
                            }  # fmt: skip
                            if port["port"] not in declared:
                                problems.append(f"NetworkPolicy: {owner} has no port {port}")
    for monitor in of_kind(objects, "ServiceMonitor"):
        labels = dict(OPERATOR_LABELS)
        if not clusters or not selects(monitor["spec"]["selector"], labels):
            problems.append(f"ServiceMonitor/{monitor['metadata']['name']}: selects no Service")
        for endpoint in monitor["spec"]["endpoints"]:
            if endpoint["port"] not in OPERATOR_SERVICE_PORTS:
                problems.append(f"ServiceMonitor: the RabbitMQ Service has no port {endpoint}")
    for cluster in of_kind(objects, "RabbitmqCluster"):
        affinity = cluster["spec"].get("affinity", {}).get("podAntiAffinity", {})
        for term in affinity.get("requiredDuringSchedulingIgnoredDuringExecution", []):
            labels = {**OPERATOR_LABELS, "app.kubernetes.io/name": cluster["metadata"]["name"]}
            if not selects(term["labelSelector"], labels):
                problems.append(f"RabbitmqCluster: anti-affinity misses its own pods ({term})")
    return problems


def test_references_hold(rendered: dict[str, list[Obj]], renamed: list[Obj]) -> None:
    problems = [f"{overlay}: {p}" for overlay, objs in all_renders(rendered, renamed)
                for p in reference_problems(objs)]  # fmt: skip
    assert not problems, "\n".join(problems)


def test_renaming_renames_the_references(renamed: list[Obj]) -> None:
    for obj in renamed:
        name = obj["metadata"]["name"]
        assert name.startswith("pre-") and re.search(r"-suf(-[a-z0-9]{10})?$", name), name
    scaled = of_kind(renamed, "ScaledObject")[0]
    assert scaled["spec"]["scaleTargetRef"]["name"] == "pre-amqpsched-worker-resize-suf"
    auth = scaled["spec"]["triggers"][0]["authenticationRef"]["name"]
    assert auth == "pre-amqpsched-worker-resize-suf"
    volumes = of_kind(renamed, "RabbitmqCluster")[0]["spec"]["override"]["statefulSet"]["spec"][
        "template"
    ]["spec"]["volumes"]
    definitions = next(v for v in volumes if "configMap" in v)["configMap"]["name"]
    assert definitions.startswith("pre-amqpsched-rabbitmq-definitions-suf")
    assert named(renamed, "ConfigMap", definitions) is not None


def test_reference_check_finds_breakage(rendered: dict[str, list[Obj]]) -> None:
    """The checks above are not vacuous: break references, get problems."""
    objects = copy.deepcopy(rendered["prod"])
    of_kind(objects, "ScaledObject")[0]["spec"]["scaleTargetRef"]["name"] = "nothing"
    config = of_kind(objects, "ConfigMap")[0]
    config["data"]["BROKER_HOST"] = "elsewhere"
    worker = of_kind(objects, "Deployment")[-1]["spec"]["template"]["spec"]["containers"][0]
    worker["env"][0]["valueFrom"]["secretKeyRef"]["name"] = "amqpsched-broker-admin"
    worker["livenessProbe"]["httpGet"]["port"] = "health"
    problems = "\n".join(reference_problems(objects))
    for expected in ("targets no rendered Deployment", "BROKER_HOST", "neither rendered nor",
                     "livenessProbe port health"):  # fmt: skip
        assert expected in problems, problems


# -- what the objects say ------------------------------------------------------------------------


def deployment_containers(objects: list[Obj]) -> Iterator[tuple[Obj, dict[str, Any]]]:
    for dep in of_kind(objects, "Deployment"):
        for container in dep["spec"]["template"]["spec"]["containers"]:
            yield dep, container


def capabilities_of(container: dict[str, Any]) -> list[str]:
    args = build_parser().parse_args(["worker", *container.get("args", [])])
    caps: list[str] = args.capability
    return caps


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_commands_are_the_documented_cli(rendered: dict[str, list[Obj]], overlay: str) -> None:
    objects = rendered[overlay]
    roles = set()
    for dep, container in deployment_containers(objects):
        component = dep["metadata"]["labels"]["app.kubernetes.io/component"]
        roles.add(component)
        argv = [*container["command"], *container.get("args", [])]
        if component == "worker":
            assert container["command"] == WORKER_MODULE, argv
            caps = capabilities_of(container)
            assert caps, f"{dep['metadata']['name']} serves no capability"
            assert set(caps) <= set(builtin_app.handlers), caps
            label = dep["spec"]["template"]["metadata"]["labels"]["amqpsched.io/capability"]
            assert caps == [label]
            if caps == ["resize"]:
                assert shlex.join(argv) == RESIZE_CLI
        else:
            assert component == "scheduler"
            assert container["command"] == SCHEDULER_MODULE, argv
            build_parser().parse_args(["scheduler", *container.get("args", [])])
    assert roles == {"scheduler", "worker"}
    assert RESIZE_CLI in (ROOT / "docs" / "deploy.md").read_text()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_health_and_settings(rendered: dict[str, list[Obj]], overlay: str) -> None:
    objects = rendered[overlay]
    config = of_kind(objects, "ConfigMap")
    settings_cm = next(c for c in config if "AMQPSCHED_METRICS_PORT" in c.get("data", {}))
    values = settings_cm["data"]
    fields = set(Settings.model_fields)
    for key in values:
        if key.startswith("AMQPSCHED_"):
            assert key[len("AMQPSCHED_") :].lower() in fields, f"{key} is no setting"
    settings = Settings(
        _env_file=None,
        **{
            k[len("AMQPSCHED_") :].lower(): v
            for k, v in values.items()
            if k.startswith("AMQPSCHED_")
        },
    )
    assert settings.metrics_port is not None
    definitions = json.loads(DEFINITIONS.read_text())
    users = {u["name"] for u in definitions["users"]}
    assert values["BROKER_VHOST"] in {v["name"] for v in definitions["vhosts"]}
    for dep, container in deployment_containers(objects):
        component = dep["metadata"]["labels"]["app.kubernetes.io/component"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == settings.metrics_port
        assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        url = config_value(objects, container, "AMQPSCHED_AMQP_URL")
        assert url is not None
        match = re.fullmatch(r"amqps?://([^:]+):\$\(BROKER_PASSWORD\)@.+", url)
        assert match, f"the broker URL must take its password from a Secret: {url}"
        assert match.group(1) == f"amqpsched-{component}" and match.group(1) in users
        password = next(e for e in container["env"] if e["name"] == "BROKER_PASSWORD")
        assert password["valueFrom"]["secretKeyRef"]["name"] == f"amqpsched-broker-{component}"
        shutdown = float(config_value(objects, container, "AMQPSCHED_SHUTDOWN_TIMEOUT") or 30)
        grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        if component == "worker":
            limits = [builtin_app.handlers[c].time_limit for c in capabilities_of(container)]
            longest = max([shutdown, *(t for t in limits if t is not None)])
            assert grace > longest + 10, (dep["metadata"]["name"], grace, longest)
    for cluster in of_kind(objects, "RabbitmqCluster"):
        conf = cluster["spec"]["rabbitmq"]["additionalConfig"]
        timeout_ms = int(re.search(r"^consumer_timeout\s*=\s*(\d+)", conf, re.M).group(1))  # type: ignore[union-attr]
        assert timeout_ms > settings.max_timeout * 1000
        assert "rabbitmq_prometheus" in cluster["spec"]["rabbitmq"]["additionalPlugins"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_locked_down(rendered: dict[str, list[Obj]], overlay: str) -> None:
    objects = rendered[overlay]
    deployments = of_kind(objects, "Deployment")
    budgets = of_kind(objects, "PodDisruptionBudget")
    for dep in deployments:
        name = dep["metadata"]["name"]
        pod = dep["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False, name
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        tmp = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        for container in pod["containers"]:
            ctx = container["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False, name
            assert ctx["readOnlyRootFilesystem"] is True, name
            assert ctx["capabilities"]["drop"] == ["ALL"], name
            assert any(
                m["mountPath"] == "/tmp" and m["name"] in tmp for m in container["volumeMounts"]
            )
            assert {"requests", "limits"} <= set(container["resources"]), name
            image = container["image"]
            assert image.rsplit(":", 1)[1] == project_version(), image
        labels = dep["spec"]["template"]["metadata"]["labels"]
        covering = [b for b in budgets if selects(b["spec"]["selector"], labels)]
        assert covering, f"no PodDisruptionBudget for {name}"
    for budget in budgets:
        # maxUnavailable never blocks a drain; minAvailable == replicas would.
        assert budget["spec"].get("maxUnavailable") == 1 and "minAvailable" not in budget["spec"]
    assert not of_kind(objects, "Secret"), "no Secret (and so no password) in the manifests"


def test_overlay_sizes(rendered: dict[str, list[Obj]]) -> None:
    def sizes(objects: list[Obj]) -> tuple[int, int, int, int]:
        cluster = of_kind(objects, "RabbitmqCluster")[0]
        scheduler = next(
            d for d in of_kind(objects, "Deployment")
            if d["metadata"]["labels"]["app.kubernetes.io/component"] == "scheduler"
        )  # fmt: skip
        scaled = of_kind(objects, "ScaledObject")[0]["spec"]
        return (
            cluster["spec"]["replicas"],
            scheduler["spec"]["replicas"],
            scaled["minReplicaCount"],
            scaled["maxReplicaCount"],
        )

    assert sizes(rendered["dev"]) == (1, 1, 0, 1)
    rabbit, schedulers, low, high = sizes(rendered["prod"])
    assert (rabbit, schedulers) == (3, 2) and 1 <= low < high


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaling_follows_the_capability_queues(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    objects = rendered[overlay]
    deployments = {d["metadata"]["name"]: d for d in of_kind(objects, "Deployment")}
    workers = [
        d for d in deployments.values() if "amqpsched.io/capability" in d["metadata"]["labels"]
    ]
    scaled = of_kind(objects, "ScaledObject")
    assert len(scaled) == len(workers), "one ScaledObject per worker Deployment"
    for obj in scaled:
        dep = deployments[obj["spec"]["scaleTargetRef"]["name"]]
        assert "replicas" not in dep["spec"], "KEDA owns the replica count"
        container = dep["spec"]["template"]["spec"]["containers"][0]
        namespace = config_value(objects, container, "AMQPSCHED_NAMESPACE") or ""
        (capability,) = capabilities_of(container)
        (trigger,) = obj["spec"]["triggers"]
        assert trigger["type"] == "rabbitmq"
        assert trigger["metadata"]["mode"] == "QueueLength"
        assert trigger["metadata"]["queueName"] == Topology(namespace).capability_queue(capability)


def test_definitions_cover_the_rabbitmq_init_container(rendered: dict[str, list[Obj]]) -> None:
    render_definitions = load_module(DEPLOY / "rabbitmq" / "render_definitions.py")
    definitions = json.loads(DEFINITIONS.read_text())
    for objects in rendered.values():
        cluster = of_kind(objects, "RabbitmqCluster")[0]
        pod = cluster["spec"]["override"]["statefulSet"]["spec"]["template"]["spec"]
        (init,) = pod["initContainers"]
        env = {e["name"] for e in init["env"]}
        assert env == {render_definitions.env_name(u["name"]) for u in definitions["users"]}
        out = init["command"][init["command"].index("--out") + 1]
        conf = cluster["spec"]["rabbitmq"]["additionalConfig"]
        assert f"load_definitions = {out}" in conf
        (rabbit,) = pod["containers"]
        assert any(out.startswith(m["mountPath"]) for m in rabbit["volumeMounts"])
    for user in definitions["users"]:
        assert "password" not in user and "password_hash" not in user, "no password in git"


# -- monitoring ----------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_dashboards_are_the_json_files(rendered: dict[str, list[Obj]], overlay: str) -> None:
    files = {p.name: p.read_text() for p in sorted(GRAFANA.glob("*.json"))}
    assert files, "no dashboard in deploy/grafana"
    found: dict[str, str] = {}
    for config in of_kind(rendered[overlay], "ConfigMap"):
        if config["metadata"].get("labels", {}).get("grafana_dashboard") == "1":
            found.update(config["data"])
    assert found == files


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_rule_is_the_file(rendered: dict[str, list[Obj]], overlay: str) -> None:
    source = yaml.safe_load(PROMETHEUS_RULE.read_text())
    (rule,) = of_kind(rendered[overlay], "PrometheusRule")
    assert rule["spec"] == source["spec"]
    monitors = of_kind(rendered[overlay], "PodMonitor")
    jobs = {
        r["replacement"] for m in monitors for e in m["spec"]["podMetricsEndpoints"]
        for r in e.get("relabelings", []) if r.get("targetLabel") == "job"
    }  # fmt: skip
    for job in re.findall(r'job="([^"]+)"', json.dumps(source["spec"])):
        assert job in jobs, f"the rules use job={job}, which no PodMonitor sets"


# -- image ---------------------------------------------------------------------------------------


def dockerfile_stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuations joined), split by FROM."""
    lines: list[str] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            lines.append(pending)
            pending = ""
    stages: list[list[str]] = []
    for line in lines:
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_dockerfile_is_multistage_and_unprivileged() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage"
    build, final = stages[0], stages[-1]
    build_name = build[0].split()[-1]
    assert " AS " in build[0].upper()
    assert any(f"from={build_name}" in line for line in final), (
        "the final stage takes what the build stage made"
    )
    assert any("pip wheel" in line for line in build)
    users = [line.split()[1] for line in final if line.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    (entrypoint,) = [line for line in final if line.upper().startswith("ENTRYPOINT ")]
    exec_form = json.loads(entrypoint.split(None, 1)[1])
    assert exec_form[:3] == ["python", "-m", "amqpsched"], "exec form: SIGTERM reaches Python"
    text = " ".join(final).lower()
    for tool in ("gcc", "build-essential", "apt-get install", "make "):
        assert tool not in text, f"no build tools in the final stage ({tool})"
    assert all("python:3.11-slim" in line or "${" in line for s in stages for line in s[:1])
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignored, ".dockerignore lets in only what it lists (no .env, .git, .venv)"
    for needed in ("pyproject.toml", "README.md", "amqpsched/"):
        assert f"!{needed}" in ignored


def test_render_definitions_needs_every_password(tmp_path: Path) -> None:
    """The init container fails (RabbitMQ does not start) rather than load a user without one."""
    script = DEPLOY / "rabbitmq" / "render_definitions.py"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_PASSWORD_")}
    env["RABBITMQ_PASSWORD_AMQPSCHED_CLIENT"] = "only-this-one"
    out = tmp_path / "rendered.json"
    done = subprocess.run(
        [sys.executable, str(script), "--in", str(DEFINITIONS), "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0 and not out.exists()
    assert "RABBITMQ_PASSWORD_AMQPSCHED_WORKER" in done.stderr
