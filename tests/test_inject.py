"""Tests for ``proxy.inject``: where the sidecar goes, what it holds, and idempotency."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from support.kube import KUBE_VERSIONS, kube_errors
from support.manifests import DEPLOYMENT
from support.procs import free_port, sidelink

from proxy import __version__
from proxy.config import ConfigError, parse
from proxy.inject import (
    DEFAULT_IMAGE,
    InjectError,
    NoRoutesError,
    Outcome,
    SidecarOptions,
    inject_objects,
    inject_pod,
    wait_ready_script,
)
from proxy.inject import inject as inject_into

ROUTE = "8081=app1-service.namespace-a:80/http"


def inject(text: str, **options: Any) -> str:
    """proxy.inject.inject, with a route unless the test gives routes or a ConfigMap.

    A sidecar needs routes from one or the other to start, and inject refuses one without.
    """
    if not options.get("routes") and options.get("config_map") is None:
        options["routes"] = [ROUTE]
    return inject_into(text, **options)


SERVICE = textwrap.dedent(
    """\
    apiVersion: v1
    kind: Service
    metadata:
      name: web
    spec:
      selector: {app: web}
      ports:
      - port: 80
        targetPort: 8080
    """
)


CRONJOB = textwrap.dedent(
    """\
    apiVersion: batch/v1
    kind: CronJob
    metadata: {name: nightly}
    spec:
      schedule: "0 3 * * *"
      jobTemplate:
        spec:
          template:
            spec:
              restartPolicy: OnFailure
              containers: [{name: task, image: t}]
    """
)


def load(text: str) -> list[Any]:
    return list(yaml.safe_load_all(text))


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = doc["spec"]["template"]["spec"]
    return spec


def sidelinks(spec: dict[str, Any]) -> list[dict[str, Any]]:
    both = spec.get("containers", []) + spec.get("initContainers", [])
    return [c for c in both if c["name"] == "sidelink"]


def names(containers: list[dict[str, Any]]) -> list[str]:
    return [c["name"] for c in containers]


def test_default_image_follows_the_package_version() -> None:
    expected = f"ghcr.io/sidelink/sidelink:{__version__}"
    assert expected == DEFAULT_IMAGE


def test_deployment_gets_a_native_sidecar_first_in_init_containers() -> None:
    [doc] = load(inject(DEPLOYMENT))
    spec = pod_spec(doc)
    assert names(spec["containers"]) == ["app"]
    assert names(spec["initContainers"]) == ["sidelink"]
    sidecar = spec["initContainers"][0]
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["image"] == DEFAULT_IMAGE
    assert sidecar["args"] == ["run"]
    assert sidecar["env"] == [{"name": "SIDELINK_ROUTES", "value": ROUTE}]
    assert "volumeMounts" not in sidecar
    assert "volumes" not in spec


def test_sidecar_has_admin_port_probes_resources_and_security_context() -> None:
    [doc] = load(inject(DEPLOYMENT))
    sidecar = pod_spec(doc)["initContainers"][0]
    assert sidecar["ports"] == [{"name": "sidelink-admin", "containerPort": 9901}]
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 9901}
    assert sidecar["readinessProbe"]["periodSeconds"] == 2
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 9901}
    # The app starts only once every route has resolved: /readyz, and generously.
    assert sidecar["startupProbe"] == {
        "httpGet": {"path": "/readyz", "port": 9901},
        "periodSeconds": 1,
        "failureThreshold": 120,
    }
    assert sidecar["resources"] == {
        "requests": {"cpu": "50m", "memory": "64Mi"},
        "limits": {"memory": "128Mi"},
    }
    assert sidecar["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert "lifecycle" not in sidecar


def test_classic_goes_first_in_containers_with_a_post_start_hook() -> None:
    [doc] = load(inject(DEPLOYMENT, classic=True))
    spec = pod_spec(doc)
    assert names(spec["containers"]) == ["sidelink", "app"]
    sidecar = spec["containers"][0]
    assert "restartPolicy" not in sidecar
    assert "initContainers" not in spec
    # The kubelet starts the app only once this hook has returned: it waits for /readyz.
    assert sidecar["lifecycle"] == {
        "postStart": {"exec": {"command": ["python", "-c", wait_ready_script()]}}
    }
    assert "startupProbe" not in sidecar
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 9901}
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 9901}
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_post_start_hook_waits_for_readyz_and_gives_up_in_time() -> None:
    # The hook's script run for real, against a sidelink process and against nothing.
    with sidelink(["run", "--route", f"{free_port()}=localhost:{free_port()}/http"]) as proc:
        proc.wait_admin()
        script = wait_ready_script(proc.admin_port, timeout=20)
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, timeout=30, check=False
        )
        assert (done.returncode, done.stderr) == (0, b"")
        assert proc.get("/readyz")[0] == 200
    script = wait_ready_script(free_port(), timeout=1)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, timeout=30, check=False
    )
    assert done.returncode == 1
    assert done.stderr == b"sidelink: /readyz not ready after 1s\n"


def test_multi_line_strings_are_written_as_blocks() -> None:
    out = inject(DEPLOYMENT, classic=True)
    assert re.search(r"\n +- \|\n +import time, urllib.request as r\n", out)
    assert load(out) == load(inject(out, classic=True))


def test_the_rest_of_the_object_is_untouched_and_keeps_its_key_order() -> None:
    original = load(DEPLOYMENT)[0]
    out = inject(DEPLOYMENT)
    [doc] = load(out)
    del pod_spec(doc)["initContainers"]
    assert doc == original
    assert list(doc) == ["apiVersion", "kind", "metadata", "spec"]
    assert list(doc["spec"]) == ["replicas", "selector", "template"]
    assert out.startswith("apiVersion: apps/v1\nkind: Deployment\n")


def test_pod_spec_is_the_pod_itself() -> None:
    pod = "kind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: app, image: a}]\n"
    [doc] = load(inject(pod))
    assert names(doc["spec"]["initContainers"]) == ["sidelink"]
    assert names(doc["spec"]["containers"]) == ["app"]


def test_cronjob_template_is_under_job_template() -> None:
    [doc] = load(inject(CRONJOB))
    spec = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert names(spec["initContainers"]) == ["sidelink"]
    assert spec["restartPolicy"] == "OnFailure"
    assert doc["spec"]["schedule"] == "0 3 * * *"


@pytest.mark.parametrize(
    "kind", ["Job", "StatefulSet", "DaemonSet", "ReplicaSet", "ReplicationController"]
)
def test_workloads_with_a_pod_template(kind: str) -> None:
    text = DEPLOYMENT.replace("kind: Deployment", f"kind: {kind}")
    [doc] = load(inject(text))
    assert names(pod_spec(doc)["initContainers"]) == ["sidelink"]


def test_list_items_are_injected_recursively_and_others_pass_through() -> None:
    deployment, service = load(DEPLOYMENT)[0], load(SERVICE)[0]
    inner_list = {"apiVersion": "v1", "kind": "List", "items": [dict(deployment)]}
    listing = yaml.safe_dump(
        {"apiVersion": "v1", "kind": "List", "items": [service, deployment, inner_list]},
        sort_keys=False,
    )
    [doc] = load(inject(listing))
    assert doc["items"][0] == service
    assert names(pod_spec(doc["items"][1])["initContainers"]) == ["sidelink"]
    assert names(pod_spec(doc["items"][2]["items"][0])["initContainers"]) == ["sidelink"]


def test_a_service_passes_through_untouched() -> None:
    assert load(inject(SERVICE)) == load(SERVICE)


def test_documents_keep_their_order_and_null_documents_are_dropped() -> None:
    config_map = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {k: v}\n"
    text = f"---\n{SERVICE}---\n{DEPLOYMENT}---\n---\n{config_map}---\n"
    out = inject(text)
    docs = load(out)
    assert [d["kind"] for d in docs] == ["Service", "Deployment", "ConfigMap"]
    assert out.count("\n---\n") == 2
    assert inject("") == ""
    assert inject("---\n---\n") == ""


@pytest.mark.parametrize("classic", [False, True])
def test_injecting_twice_changes_nothing(classic: bool) -> None:
    text = f"{SERVICE}---\n{DEPLOYMENT}"
    options: dict[str, Any] = {"routes": ["8082=api:80"], "config_map": "web-sidelink"}
    once = inject(text, classic=classic, **options)
    assert inject(once, classic=classic, **options) == once
    assert len(sidelinks(pod_spec(load(once)[1]))) == 1


@pytest.mark.parametrize("classic", [False, True])
def test_other_options_or_the_other_mode_leave_an_injected_pod_as_it_is(classic: bool) -> None:
    first = inject(DEPLOYMENT, classic=not classic)
    assert inject(first, classic=classic) == first
    assert inject(first, classic=classic, routes=["8082=other"], config_map="cm") == first
    assert inject(first, image="new") == first


@pytest.mark.parametrize("where", ["initContainers", "containers"])
def test_an_existing_sidelink_container_is_left_as_it_is(where: str) -> None:
    own = "      - {name: sidelink, image: old, env: [{name: X, value: y}]}\n"
    text = DEPLOYMENT.replace(
        "      containers:\n",
        "      initContainers:\n      - {name: migrate, image: m}\n"
        + (own if where == "initContainers" else "")
        + "      containers:\n"
        + (own if where == "containers" else ""),
    )
    done = inject_objects(text, routes=[ROUTE], image="new", config_map="cm")
    assert done.report == ("deployment/web: unchanged",)
    assert load(done.text) == load(text)


def test_routes_go_into_sidelink_routes() -> None:
    routes = ["8082=api:80", "127.0.0.1:5432=db:5432/tcp"]
    sidecar = pod_spec(load(inject(DEPLOYMENT, routes=routes))[0])["initContainers"][0]
    assert sidecar["env"] == [
        {"name": "SIDELINK_ROUTES", "value": "8082=api:80,127.0.0.1:5432=db:5432/tcp"}
    ]


def test_a_single_route_string_is_refused() -> None:
    with pytest.raises(TypeError):
        inject(DEPLOYMENT, routes="8080=api:80")


def test_config_map_adds_a_volume_and_a_read_only_mount() -> None:
    text = DEPLOYMENT + "      volumes:\n      - {name: data, emptyDir: {}}\n"
    spec = pod_spec(load(inject(text, config_map="web-sidelink"))[0])
    assert spec["volumes"] == [
        {"name": "data", "emptyDir": {}},
        {"name": "sidelink-config", "configMap": {"name": "web-sidelink"}},
    ]
    assert spec["initContainers"][0]["volumeMounts"] == [
        {"name": "sidelink-config", "mountPath": "/etc/sidelink", "readOnly": True}
    ]
    assert "volumeMounts" not in spec["containers"][0]


def test_a_volume_named_sidelink_config_is_made_to_hold_the_config_map() -> None:
    text = DEPLOYMENT + (
        "      volumes:\n      - {name: sidelink-config, emptyDir: {}}\n"
        "      - {name: data, emptyDir: {}}\n      - {name: sidelink-config, emptyDir: {}}\n"
    )
    spec = pod_spec(load(inject(text, config_map="new"))[0])
    assert spec["volumes"] == [
        {"name": "sidelink-config", "configMap": {"name": "new"}},
        {"name": "data", "emptyDir": {}},
    ]
    # Without a ConfigMap the sidecar mounts nothing, and the pod's volumes stay as they are.
    assert pod_spec(load(inject(text))[0])["volumes"] == pod_spec(load(text)[0])["volumes"]


def test_existing_init_containers_are_kept_after_ours() -> None:
    text = DEPLOYMENT.replace(
        "      containers:\n",
        "      initContainers:\n"
        "      - {name: migrate, image: m}\n"
        "      - {name: seed, image: s}\n"
        "      containers:\n",
    )
    spec = pod_spec(load(inject(text))[0])
    assert names(spec["initContainers"]) == ["sidelink", "migrate", "seed"]
    spec = pod_spec(load(inject(text, classic=True))[0])
    assert names(spec["initContainers"]) == ["migrate", "seed"]
    assert names(spec["containers"]) == ["sidelink", "app"]


def test_yaml_1_1_only_scalars_keep_their_text() -> None:
    # Kubernetes reads these as strings; they must not come back as 630 or a reformatted date.
    text = "kind: ConfigMap\ndata:\n  at: 10:30\n  when: 2024-01-01T10:00:00Z\n"
    assert load(inject(text))[0]["data"] == {"at": "10:30", "when": "2024-01-01T10:00:00Z"}


def test_bad_yaml_names_source_line_and_document() -> None:
    text = f"{SERVICE}---\nkind: Pod\nspec:\n  containers: [a, b\n  other: 1\n"
    with pytest.raises(InjectError) as caught:
        inject(text, source="app.yaml")
    message = str(caught.value)
    # Line 14 is "other: 1", where the unclosed flow sequence is found to be broken.
    assert message.startswith("app.yaml:14: document 2: ")


def test_containers_not_a_list_names_document_kind_and_line() -> None:
    text = DEPLOYMENT.replace(
        "      containers:\n      - name: app\n        image: example/web:1\n"
        "        ports:\n        - containerPort: 8080\n",
        "      containers: app\n",
    )
    stream = f"{SERVICE}---\n{text}"
    line = stream.splitlines().index("      containers: app") + 1
    with pytest.raises(InjectError) as caught:
        inject(stream, source="app.yaml")
    assert str(caught.value) == (
        f"app.yaml:{line}: document 2 (Deployment web): "
        "spec.template.spec.containers must be a list, got a string"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- just\n- a list\n", "document 1: expected a mapping"),
        ("kind: Deployment\nmetadata: {name: d}\nspec: {}\n", "spec.template is missing"),
        ("kind: Pod\nspec: {}\n", "(Pod): spec.containers is missing"),
        ("kind: Pod\nspec: {containers: [3]}\n", "spec.containers[0] must be a mapping"),
        (
            "kind: Pod\nspec: {containers: [], initContainers: {a: 1}}\n",
            "spec.initContainers must be a list",
        ),
        ("kind: List\nitems: [{kind: Pod, spec: []}]\n", "document 1, items[0] (Pod): spec"),
    ],
)
def test_malformed_objects_are_rejected(text: str, expected: str) -> None:
    with pytest.raises(InjectError) as caught:
        inject(text)
    assert expected in str(caught.value)
    assert str(caught.value).startswith("<stdin>:")


def test_inject_error_is_a_value_error() -> None:
    assert issubclass(InjectError, ValueError)


_NAMES = st.from_regex(r"\A[a-z][a-z0-9-]{0,10}[a-z0-9]\Z", fullmatch=True) | st.just("sidelink")


@st.composite
def deployments(draw: st.DrawFn) -> str:
    containers = draw(st.lists(_NAMES, min_size=1, max_size=5))
    init_containers = draw(st.lists(_NAMES, max_size=4))
    empty_init_key = draw(st.booleans())
    spec: dict[str, Any] = {}
    if init_containers or empty_init_key:
        spec["initContainers"] = [{"name": n, "image": f"img/{n}"} for n in init_containers]
    spec["containers"] = [{"name": n, "image": f"img/{n}"} for n in containers]
    doc = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "d"},
        "spec": {"template": {"spec": spec}},
    }
    return yaml.safe_dump(doc, sort_keys=False)


@settings(max_examples=200, deadline=None)
@given(
    text=deployments(),
    classic=st.booleans(),
    routes=st.lists(st.integers(1024, 9000), unique=True, max_size=3).map(
        lambda ports: [f"{p}=svc{p}:{p % 1000 + 1}" for p in ports]
    ),
    config_map=st.none() | st.just("cm"),
)
def test_injecting_is_idempotent_and_leaves_one_sidelink(
    text: str, classic: bool, routes: list[str], config_map: str | None
) -> None:
    once = inject(text, classic=classic, routes=routes, config_map=config_map)
    assert inject(once, classic=classic, routes=routes, config_map=config_map) == once
    spec = pod_spec(load(once)[0])
    original = pod_spec(load(text)[0])
    if sidelinks(original):
        # A pod that has a sidelink container already is left as it is.
        assert spec == original
        return
    # Otherwise it goes first: in containers (classic) or in initContainers (native).
    [sidecar] = sidelinks(spec)
    if classic:
        assert spec["containers"][0] == sidecar
        assert names(spec.get("initContainers", [])) == names(original.get("initContainers", []))
        assert spec["containers"][1:] == original["containers"]
    else:
        assert spec["initContainers"][0] == sidecar
        assert spec["initContainers"][1:] == original.get("initContainers", [])
        assert spec["containers"] == original["containers"]


# --- a sidecar that could not start is refused (issue 12 defect 1) ------------------------


def test_no_routes_and_no_config_map_is_refused() -> None:
    with pytest.raises(InjectError) as info:
        inject_into(DEPLOYMENT)
    assert str(info.value) == (
        "no routes: give --route SPEC (repeatable) or --config-map NAME; "
        "a sidecar without routes cannot start"
    )


@pytest.mark.parametrize(
    ("routes", "expected"),
    [
        (
            ["8081"],
            "--route[0]: expected [HOST:]LISTEN_PORT=SERVICE[:PORT][/tcp|/http], got '8081'",
        ),
        (["8081=bad_name!"], "--route[0]: service: not a DNS name or IP address: 'bad_name!'"),
        (["8081=a", "8081=b"], "--route[1].listen: 127.0.0.1:8081 is already used by --route[0]"),
        (["9901=a"], "--route[0].listen: 127.0.0.1:9901 is already used by admin.listen"),
    ],
)
def test_routes_are_checked_as_run_checks_them(routes: list[str], expected: str) -> None:
    with pytest.raises(InjectError) as info:
        inject_into(DEPLOYMENT, routes=routes)
    assert str(info.value).startswith(expected), str(info.value)


CONFIG_MAP = textwrap.dedent(
    """\
    apiVersion: v1
    kind: ConfigMap
    metadata: {name: web-sidelink}
    data:
      sidelink.yaml: |
        routes:
          - {listen: 8081, service: app1, port: %s}
    ---
    """
)


def test_a_config_map_in_the_input_is_checked_too() -> None:
    good = CONFIG_MAP % 80 + DEPLOYMENT
    assert "sidelink" in inject_into(good, config_map="web-sidelink")
    bad = CONFIG_MAP % 70000 + DEPLOYMENT
    with pytest.raises(InjectError) as info:
        inject_into(bad, config_map="web-sidelink", source="app.yaml")
    assert str(info.value) == (
        "app.yaml:7: ConfigMap web-sidelink data.sidelink.yaml: routes[0].port: "
        "must be 1..65535 or a port name, got 70000"
    )
    # The line is the one `sidelink check -c app.yaml` names.
    with pytest.raises(ConfigError) as checked:
        parse(bad, "app.yaml")
    assert checked.value.problems == [
        "app.yaml:7: routes[0].port: must be 1..65535 or a port name, got 70000"
    ]
    with pytest.raises(InjectError, match="already used by routes"):
        inject_into(good, config_map="web-sidelink", routes=["8081=other"])
    with pytest.raises(InjectError) as info:
        inject_into(
            good.replace("containerPort: 8080", "containerPort: 8081"), config_map="web-sidelink"
        )
    assert "8081 of container app clashes with the sidecar's ConfigMap web-sidelink " in str(
        info.value
    )
    # A ConfigMap the input does not hold cannot be checked: it is trusted.
    assert "sidelink" in inject_into(DEPLOYMENT, config_map="elsewhere")


@pytest.mark.parametrize(
    "text",
    [
        # A | block after another document: its lines are counted from the file's start.
        SERVICE + "---\n" + CONFIG_MAP % 70000,
        # A quoted value stands on its key's line.
        "kind: ConfigMap\nmetadata: {name: web-sidelink}\ndata:\n"
        "  sidelink.yaml: 'routes: [{listen: 8081, service: app1, port: 70000}]'\n",
        # An item of a List.
        "kind: List\nitems:\n- kind: ConfigMap\n  metadata: {name: web-sidelink}\n  data:\n"
        "    sidelink.yaml: |\n      routes:\n      - {listen: 8081, service: app1, port: 70000}\n",
    ],
    ids=["block", "quoted", "list item"],
)
def test_a_config_map_problem_names_its_line_in_the_input(text: str) -> None:
    line = next(i for i, s in enumerate(text.splitlines(), 1) if "70000" in s)
    with pytest.raises(InjectError) as info:
        inject_into(text, config_map="web-sidelink", source="app.yaml")
    assert str(info.value) == (
        f"app.yaml:{line}: ConfigMap web-sidelink data.sidelink.yaml: routes[0].port: "
        "must be 1..65535 or a port name, got 70000"
    )


POD = "apiVersion: v1\nkind: Pod\nmetadata: {name: p%s}\nspec:\n%s"
SHARED_NETWORK = "the containers of a pod share one network, so one of them could not bind it"


@pytest.mark.parametrize(
    ("annotations", "spec", "routes", "refusal"),
    [
        (
            "",
            "  containers:\n  - {name: app, image: a, ports: [{containerPort: 8081}]}\n",
            [ROUTE],
            "spec.containers[0].ports[0].containerPort 8081 of container app clashes with the "
            "sidecar's --route[0].listen (127.0.0.1:8081)",
        ),
        (
            "",
            "  containers:\n  - {name: app, image: a, ports: [{containerPort: 9901}]}\n",
            [ROUTE],
            "spec.containers[0].ports[0].containerPort 9901 of container app clashes with the "
            "sidecar's admin.listen (0.0.0.0:9901)",
        ),
        (
            "",
            "  containers:\n  - {name: app, image: a}\n  - name: cache\n    image: c\n"
            "    ports: [{containerPort: 80}, {containerPort: 6379, protocol: TCP}]\n",
            [ROUTE, "6379=redis.cache:6379"],
            "spec.containers[1].ports[1].containerPort 6379 of container cache clashes with "
            "the sidecar's --route[1].listen (127.0.0.1:6379)",
        ),
        (
            "",
            "  initContainers:\n  - {name: seed, image: s, ports: [{containerPort: 8081}]}\n"
            "  containers: [{name: app, image: a}]\n",
            [ROUTE],
            "spec.initContainers[0].ports[0].containerPort 8081 of container seed clashes with "
            "the sidecar's --route[0].listen (127.0.0.1:8081)",
        ),
        (
            ", annotations: {sidelink.io/routes: '7000=api'}",
            "  containers:\n  - {name: app, image: a, ports: [{containerPort: 7000}]}\n",
            [],
            "spec.containers[0].ports[0].containerPort 7000 of container app clashes with the "
            "sidecar's sidelink.io/routes[0].listen (127.0.0.1:7000)",
        ),
    ],
    ids=["route", "admin", "second container", "init container", "annotation"],
)
def test_a_port_another_container_declares_is_refused(
    annotations: str, spec: str, routes: list[str], refusal: str
) -> None:
    text = POD % (annotations, spec)
    line = next(i for i, s in enumerate(text.splitlines(), 1) if "containerPort: " in s)
    with pytest.raises(InjectError) as info:
        inject_into(text, routes=routes, source="pod.yaml")
    assert str(info.value) == f"pod.yaml:{line}: document 1 (Pod p): {refusal}: {SHARED_NETWORK}"


@pytest.mark.parametrize(
    "ports",
    [
        "[{containerPort: 8080}]",
        "[{containerPort: 8081, protocol: UDP}]",
        "[{containerPort: 9901, protocol: SCTP}]",
    ],
)
def test_other_ports_and_protocols_leave_the_sidecar_room(ports: str) -> None:
    text = POD % ("", f"  containers:\n  - {{name: app, image: a, ports: {ports}}}\n")
    assert inject_objects(text, routes=[ROUTE]).report == ("pod/p: injected",)


@pytest.mark.parametrize(("policy", "refused"), [("", False), (", restartPolicy: Always", True)])
def test_a_classic_sidecar_shares_ports_only_with_native_sidecars_among_init_containers(
    policy: str, refused: bool
) -> None:
    """A classic sidecar starts once the init containers have run: only those that keep
    running (native sidecars) can hold its ports."""
    text = POD % (
        "",
        "  initContainers:\n"
        f"  - {{name: seed, image: s, ports: [{{containerPort: 8081}}]{policy}}}\n"
        "  containers: [{name: app, image: a}]\n",
    )
    if refused:
        with pytest.raises(InjectError, match="of container seed clashes"):
            inject(text, routes=[ROUTE], classic=True)
    else:
        assert inject_objects(text, routes=[ROUTE], classic=True).report == ("pod/p: injected",)


JOB = DEPLOYMENT.replace("kind: Deployment", "kind: Job").replace(
    "      containers:\n", "      restartPolicy: Never\n      containers:\n"
)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (JOB, "document 1 (Job web): spec.template.spec.restartPolicy is Never"),
        (
            CRONJOB,
            "document 1 (CronJob nightly): spec.jobTemplate.spec.template.spec.restartPolicy "
            "is OnFailure",
        ),
        (
            POD % ("", "  restartPolicy: Never\n  containers: [{name: app, image: a}]\n"),
            "document 1 (Pod p): spec.restartPolicy is Never",
        ),
    ],
    ids=["Job", "CronJob", "Pod"],
)
def test_a_classic_sidecar_is_refused_to_a_pod_that_runs_to_completion(
    text: str, where: str
) -> None:
    line = next(i for i, s in enumerate(text.splitlines(), 1) if "restartPolicy" in s)
    with pytest.raises(InjectError) as info:
        inject(text, classic=True, source="job.yaml")
    assert str(info.value) == (
        f"job.yaml:{line}: {where}: the pod must run to completion, and a classic sidecar "
        "never exits; use the native sidecar (the default, without --classic), which works "
        "for Jobs"
    )
    # The native sidecar, which the kubelet stops once the other containers have exited.
    assert inject_objects(text, routes=[ROUTE]).report[0].endswith(": injected")


def test_the_report_names_each_object_and_what_was_done() -> None:
    listing = textwrap.dedent(
        """\
        kind: List
        items:
        - {kind: Pod, metadata: {name: p}, spec: {containers: [{name: a, image: a}]}}
        - {kind: Secret, metadata: {name: s}}
        """
    )
    first = inject_objects(SERVICE + "---\n" + DEPLOYMENT + "---\n" + listing, routes=[ROUTE])
    assert first.report == (
        "service/web: skipped",
        "deployment/web: injected",
        "pod/p: injected",
        "secret/s: skipped",
    )
    again = inject_objects(first.text, routes=[ROUTE])
    assert again.report == (
        "service/web: skipped",
        "deployment/web: unchanged",
        "pod/p: unchanged",
        "secret/s: skipped",
    )
    other = inject_objects(first.text, routes=["8082=x"])
    assert other.text == first.text
    assert other.report == again.report
    assert inject_objects("a: 1\n", routes=[ROUTE]).report == ("document 1: skipped (no kind)",)


def test_a_document_nested_too_deeply_is_an_inject_error() -> None:
    with pytest.raises(InjectError, match="nested too deeply"):
        inject("[" * 5000 + "]" * 5000)


# --- pod annotations: the pod's own routes, and the opt-out ------------------------------


def annotated(annotations: dict[str, str], text: str = DEPLOYMENT) -> str:
    lines = "".join(f"        {k}: {v!r}\n" for k, v in annotations.items())
    replaced = text.replace(
        "      labels: {app: web}\n", f"      labels: {{app: web}}\n      annotations:\n{lines}"
    )
    assert replaced != text
    return replaced


def test_the_routes_annotation_gives_the_pods_routes() -> None:
    text = annotated({"sidelink.io/routes": " 8082=api.ns:80/http , 5432=db:5432,"})
    # No --route needed: the pod has its own; and they win over the command's.
    for routes in ([], [ROUTE]):
        [sidecar] = pod_spec(load(inject_into(text, routes=routes))[0])["initContainers"]
        assert sidecar["env"] == [
            {"name": "SIDELINK_ROUTES", "value": "8082=api.ns:80/http,5432=db:5432"}
        ]
    # An empty annotation adds nothing: the command's routes are used.
    [sidecar] = pod_spec(load(inject(annotated({"sidelink.io/routes": ""})))[0])["initContainers"]
    assert sidecar["env"] == [{"name": "SIDELINK_ROUTES", "value": ROUTE}]


def test_a_bad_routes_annotation_is_refused_with_its_line() -> None:
    text = annotated({"sidelink.io/routes": "8081,8082=ok"})
    line = text.splitlines().index("        sidelink.io/routes: '8081,8082=ok'") + 1
    with pytest.raises(InjectError) as caught:
        inject_into(text, source="app.yaml")
    assert str(caught.value) == (
        f"app.yaml:{line}: document 1 (Deployment web): "
        "spec.template.metadata.annotations.sidelink.io/routes is refused: "
        "sidelink.io/routes[0]: expected [HOST:]LISTEN_PORT=SERVICE[:PORT][/tcp|/http], "
        "got '8081'"
    )
    with pytest.raises(InjectError, match="annotations must be a mapping"):
        inject(DEPLOYMENT.replace("labels: {app: web}", "annotations: [x]"))


def test_a_pod_without_routes_of_its_own_needs_the_commands() -> None:
    pods = (
        "kind: Pod\nmetadata: {name: a, annotations: {sidelink.io/routes: '8081=a'}}\n"
        "spec: {containers: [{name: app, image: a}]}\n---\n"
        "kind: Pod\nmetadata: {name: b}\nspec: {containers: [{name: app, image: a}]}\n"
    )
    with pytest.raises(NoRoutesError, match=r"^no routes: give --route SPEC"):
        inject_into(pods)
    assert inject_objects(pods, config_map="cm").report == ("pod/a: injected", "pod/b: injected")
    # With nothing to inject, nothing is missing.
    assert inject_into(SERVICE) == inject(SERVICE)


def test_a_pod_annotated_disabled_is_left_alone() -> None:
    text = annotated({"sidelink.io/inject": "disabled"})
    done = inject_objects(text, routes=[ROUTE])
    assert done.report == ("deployment/web: skipped (sidelink.io/inject: disabled)",)
    assert load(done.text) == load(text)
    assert inject_objects(annotated({"sidelink.io/inject": "enabled"}), routes=[ROUTE]).report == (
        "deployment/web: injected",
    )


# --- inject_pod: the webhook's way in -------------------------------------------------------


def test_inject_pod_does_what_inject_does_to_a_pod() -> None:
    text = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: a}]\n"
    for classic in (False, True):
        options = SidecarOptions(routes=(ROUTE,), config_map="cm", classic=classic)
        [pod] = load(text)
        assert inject_pod(pod, options) is Outcome.INJECTED
        assert [pod] == load(inject(text, routes=[ROUTE], config_map="cm", classic=classic))
        assert inject_pod(pod, options) is Outcome.UNCHANGED


def test_inject_pod_errors_name_the_field() -> None:
    options = SidecarOptions()
    with pytest.raises(NoRoutesError):
        inject_pod({"spec": {"containers": []}}, options)
    with pytest.raises(InjectError, match=r"^spec is missing$"):
        inject_pod({}, options)
    with pytest.raises(InjectError, match=r"^spec.containers\[0\] must be a mapping"):
        inject_pod({"spec": {"containers": [1]}}, options)
    pod = {"metadata": {"annotations": {"sidelink.io/routes": "x"}}, "spec": {"containers": []}}
    with pytest.raises(InjectError, match=r"^metadata.annotations.sidelink.io/routes is refused"):
        inject_pod(pod, options)
    with pytest.raises(TypeError):
        SidecarOptions(routes="8081=a")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="config_map"):
        SidecarOptions(config_map="")


# --- what inject writes is what the API server accepts ----------------------------------

VALIDATED = textwrap.dedent(
    """\
    apiVersion: v1
    kind: Pod
    metadata: {name: p, annotations: {sidelink.io/routes: "8082=api.ns:80/http"}}
    spec:
      initContainers: [{name: migrate, image: m}]
      containers: [{name: app, image: a}]
      volumes: [{name: data, emptyDir: {}}]
    """
)


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("classic", [False, True])
@pytest.mark.parametrize("config_map", [None, "web-sidelink"])
def test_inject_output_is_valid_kubernetes(
    version: str, classic: bool, config_map: str | None
) -> None:
    # A classic sidecar is refused to a CronJob's pods, which must run to completion.
    text = f"{DEPLOYMENT}---\n{VALIDATED}" + ("" if classic else f"---\n{CRONJOB}")
    docs = load(inject(text, classic=classic, config_map=config_map))
    kinds = ["Deployment", "Pod"] if classic else ["Deployment", "Pod", "CronJob"]
    assert [d["kind"] for d in docs] == kinds
    for doc in docs:
        assert kube_errors(doc, version) is None
