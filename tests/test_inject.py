"""Tests for ``proxy.inject``: where the sidecar goes, what it holds, and idempotency."""

from __future__ import annotations

import textwrap
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from support.manifests import DEPLOYMENT

from proxy import __version__
from proxy.inject import DEFAULT_IMAGE, InjectError, inject_objects
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
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/healthz", "port": 9901}
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
    }


def test_classic_appends_to_containers_without_restart_policy() -> None:
    [doc] = load(inject(DEPLOYMENT, classic=True))
    spec = pod_spec(doc)
    assert names(spec["containers"]) == ["app", "sidelink"]
    assert "restartPolicy" not in spec["containers"][1]
    assert "initContainers" not in spec


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
    cronjob = textwrap.dedent(
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
    [doc] = load(inject(cronjob))
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
    options: dict[str, Any] = {"routes": ["8080=api:80"], "config_map": "web-sidelink"}
    once = inject(text, classic=classic, **options)
    assert inject(once, classic=classic, **options) == once
    assert len(sidelinks(pod_spec(load(once)[1]))) == 1


@pytest.mark.parametrize("classic", [False, True])
def test_switching_modes_moves_the_container(classic: bool) -> None:
    first = inject(DEPLOYMENT, classic=not classic)
    switched = inject(first, classic=classic)
    assert switched == inject(DEPLOYMENT, classic=classic)
    spec = pod_spec(load(switched)[0])
    [sidecar] = sidelinks(spec)
    if classic:
        assert spec["containers"][-1] is sidecar
        assert "initContainers" not in spec
    else:
        assert spec["initContainers"][0] is sidecar
        assert names(spec["containers"]) == ["app"]


def test_an_existing_sidelink_is_replaced_in_place() -> None:
    text = DEPLOYMENT.replace(
        "      containers:\n",
        "      initContainers:\n"
        "      - {name: migrate, image: m}\n"
        "      - {name: sidelink, image: old, env: [{name: X, value: y}]}\n"
        "      containers:\n",
    )
    spec = pod_spec(load(inject(text, image="new"))[0])
    assert names(spec["initContainers"]) == ["migrate", "sidelink"]
    assert spec["initContainers"][1]["image"] == "new"
    assert spec["initContainers"][1]["env"] == [{"name": "SIDELINK_ROUTES", "value": ROUTE}]


def test_routes_go_into_sidelink_routes() -> None:
    routes = ["8080=api:80", "127.0.0.1:5432=db:5432/tcp"]
    sidecar = pod_spec(load(inject(DEPLOYMENT, routes=routes))[0])["initContainers"][0]
    assert sidecar["env"] == [
        {"name": "SIDELINK_ROUTES", "value": "8080=api:80,127.0.0.1:5432=db:5432/tcp"}
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


def test_config_map_volume_is_replaced_by_name_and_dropped_when_no_longer_asked_for() -> None:
    once = inject(DEPLOYMENT, config_map="old")
    spec = pod_spec(load(inject(once, config_map="new"))[0])
    assert [v for v in spec["volumes"] if v["name"] == "sidelink-config"] == [
        {"name": "sidelink-config", "configMap": {"name": "new"}}
    ]
    assert inject(once) == inject(DEPLOYMENT)


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
    assert names(spec["containers"]) == ["app", "sidelink"]


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
    [sidecar] = sidelinks(spec)
    original = pod_spec(load(text)[0])
    # A sidelink already in the requested list keeps its place; otherwise it goes to the end of
    # containers (classic) or the front of initContainers (native).
    if classic:
        assert "sidelink" not in names(spec.get("initContainers", []))
        if "sidelink" not in names(original["containers"]):
            assert spec["containers"][-1] == sidecar
    else:
        assert "sidelink" not in names(spec["containers"])
        if "sidelink" not in names(original.get("initContainers", [])):
            assert spec["initContainers"][0] == sidecar
    others = [n for n in names(original["containers"]) if n != "sidelink"]
    assert [n for n in names(spec["containers"]) if n != "sidelink"] == others


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
    with pytest.raises(InjectError) as info:
        inject_into(CONFIG_MAP % 70000 + DEPLOYMENT, config_map="web-sidelink", source="app.yaml")
    assert str(info.value) == (
        "app.yaml: ConfigMap web-sidelink data.sidelink.yaml:2: routes[0].port: "
        "must be 1..65535 or a port name, got 70000"
    )
    with pytest.raises(InjectError, match="already used by routes"):
        inject_into(good, config_map="web-sidelink", routes=["8081=other"])
    # A ConfigMap the input does not hold cannot be checked: it is trusted.
    assert "sidelink" in inject_into(DEPLOYMENT, config_map="elsewhere")


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
    assert other.report[1] == "deployment/web: updated"
    assert inject_objects("a: 1\n", routes=[ROUTE]).report == ("document 1: skipped (no kind)",)


def test_a_document_nested_too_deeply_is_an_inject_error() -> None:
    with pytest.raises(InjectError, match="nested too deeply"):
        inject("[" * 5000 + "]" * 5000)
