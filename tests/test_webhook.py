"""The admission webhook over real TLS: AdmissionReviews in, patches that do what inject does.

The webhook runs in-process on a free port with a certificate from a test CA (trustme), and as
the `sidelink webhook` command; every pod it patches, and every manifest of deploy/webhook/,
is checked against Kubernetes' own schemas (kubernetes-validate, strict).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import pytest
import pytest_asyncio
import trustme
import yaml
from support.kube import KUBE_VERSIONS, kube_errors
from support.procs import clean_environ, free_port
from support.wait import until, until_sync

from proxy.cli import _parser
from proxy.inject import SidecarOptions, inject
from proxy.webhook import MAX_REVIEW_BYTES, CertificateError, Webhook, json_patch, review

ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "deploy" / "webhook"
ROUTES = "8081=app1-service.namespace-a:80/http,6379=redis.cache:6379"


def pod(annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"generateName": "web-7d9c-", "labels": {"app": "web"}}
    if annotations is not None:
        metadata["annotations"] = annotations
    body = {"containers": [{"name": "app", "image": "example/web:1"}], **spec}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": body}


def admission(obj: Any, *, uid: str = "u-1", operation: str = "CREATE") -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": operation,
            "object": obj,
            "dryRun": False,
        },
    }


def inject_like_the_command(obj: dict[str, Any], **options: Any) -> dict[str, Any]:
    """What `sidelink inject` writes for this pod."""
    [out] = yaml.safe_load_all(inject(yaml.safe_dump(obj), **options))
    assert isinstance(out, dict)
    return out


def patched(obj: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    """The pod after the API server applies the answer's patch (with the jsonpatch library)."""
    assert response["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(response["patch"]))
    out = jsonpatch.apply_patch(obj, ops)
    assert isinstance(out, dict)
    return out


def assert_valid(obj: dict[str, Any]) -> None:
    for version in KUBE_VERSIONS:
        assert kube_errors(obj, version) is None


# --- the webhook over HTTPS, in-process -------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def cert_files(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    where = tmp_path_factory.mktemp("tls")
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(where / "tls.crt"))
    cert.private_key_pem.write_to_path(str(where / "tls.key"))
    return str(where / "tls.crt"), str(where / "tls.key")


class Client:
    """POSTs to the webhook over TLS, trusting only the test CA."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base

    async def post(self, body: bytes | dict[str, Any], path: str = "/mutate") -> dict[str, Any]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        async with self.session.post(self.base + path, data=data, headers=headers) as r:
            assert r.status == 200
            answer = await r.json()
        assert (answer["apiVersion"], answer["kind"]) == ("admission.k8s.io/v1", "AdmissionReview")
        assert answer["response"]["allowed"] is True
        response: dict[str, Any] = answer["response"]
        return response

    async def get(self, path: str) -> tuple[int, str]:
        async with self.session.get(self.base + path) as r:
            return r.status, await r.text()


@pytest_asyncio.fixture
async def webhook(cert_files: tuple[str, str]) -> AsyncIterator[Webhook]:
    hook = Webhook(SidecarOptions(), *cert_files)
    await hook.start("127.0.0.1", 0)
    try:
        yield hook
    finally:
        await hook.stop()


async def client_for(hook: Webhook, ca: trustme.CA) -> AsyncIterator[Client]:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    _, port = hook_address(hook)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        yield Client(session, f"https://localhost:{port}")


def hook_address(hook: Webhook) -> tuple[str, int]:
    address = hook.address
    assert address is not None
    return address


@pytest_asyncio.fixture
async def client(webhook: Webhook, ca: trustme.CA) -> AsyncIterator[Client]:
    async for c in client_for(webhook, ca):
        yield c


async def test_a_pod_is_patched_to_what_inject_writes(client: Client) -> None:
    obj = pod({"sidelink.io/routes": ROUTES}, volumes=[{"name": "data", "emptyDir": {}}])
    response = await client.post(admission(obj, uid="705ab4f5-6393-11e8-b7cc-42010a800002"))
    assert response["uid"] == "705ab4f5-6393-11e8-b7cc-42010a800002"
    assert "warnings" not in response
    after = patched(obj, response)
    assert after == inject_like_the_command(obj)
    [sidecar] = after["spec"]["initContainers"]
    assert sidecar["env"] == [{"name": "SIDELINK_ROUTES", "value": ROUTES}]
    assert_valid(after)


@pytest.mark.parametrize("classic", [False, True])
@pytest.mark.parametrize("config_map", [None, "sidelink-config"])
async def test_every_option_patches_to_what_inject_writes(
    cert_files: tuple[str, str], ca: trustme.CA, classic: bool, config_map: str | None
) -> None:
    options = SidecarOptions(
        config_map=config_map, image="registry.local/sidelink:9", classic=classic
    )
    hook = Webhook(options, *cert_files)
    await hook.start("127.0.0.1", 0)
    try:
        async for c in client_for(hook, ca):
            for obj in (
                pod({"sidelink.io/routes": ROUTES}),
                # Other init containers and volumes stay, ours go first and last.
                pod(
                    {"sidelink.io/routes": ROUTES, "team": "shop"},
                    initContainers=[{"name": "migrate", "image": "m"}],
                    volumes=[{"name": "data", "emptyDir": {}}],
                ),
            ):
                after = patched(obj, await c.post(admission(obj)))
                assert after == inject_like_the_command(
                    obj, config_map=config_map, image="registry.local/sidelink:9", classic=classic
                )
                assert_valid(after)
            if config_map is not None:
                # With a ConfigMap, a pod without routes of its own is injected too.
                obj = pod()
                after = patched(obj, await c.post(admission(obj)))
                assert after == inject_like_the_command(
                    obj, config_map=config_map, image="registry.local/sidelink:9", classic=classic
                )
                assert_valid(after)
    finally:
        await hook.stop()


async def test_a_pod_annotated_disabled_gets_no_patch(client: Client) -> None:
    obj = pod({"sidelink.io/inject": "disabled", "sidelink.io/routes": ROUTES})
    response = await client.post(admission(obj))
    assert response == {"uid": "u-1", "allowed": True}


@pytest.mark.parametrize("where", ["containers", "initContainers"])
async def test_a_pod_that_has_a_sidelink_container_gets_no_patch(
    client: Client, where: str
) -> None:
    obj = pod({"sidelink.io/routes": ROUTES})
    obj["spec"].setdefault(where, []).append({"name": "sidelink", "image": "mine"})
    assert await client.post(admission(obj)) == {"uid": "u-1", "allowed": True}


async def test_the_annotated_path_injects_only_pods_annotated_enabled(client: Client) -> None:
    plain = pod({"sidelink.io/routes": ROUTES})
    response = await client.post(admission(plain), "/mutate/annotated")
    assert response == {"uid": "u-1", "allowed": True}
    opted_in = pod({"sidelink.io/inject": "enabled", "sidelink.io/routes": ROUTES})
    response = await client.post(admission(opted_in), "/mutate/annotated")
    assert patched(opted_in, response) == inject_like_the_command(opted_in)
    # On /mutate, the namespace opted in: enabled or not annotated at all, both are injected.
    assert patched(opted_in, await client.post(admission(opted_in))) == inject_like_the_command(
        opted_in
    )


async def test_a_pod_with_bad_routes_is_admitted_with_a_warning(client: Client) -> None:
    obj = pod({"sidelink.io/routes": "8081=app1-service.namespace-a:80/http,8081"})
    response = await client.post(admission(obj))
    assert set(response) == {"uid", "allowed", "warnings"}
    [warning] = response["warnings"]
    assert warning == (
        "sidelink: pod shop/web-7d9c-*: not injected: metadata.annotations.sidelink.io/routes "
        "is refused: sidelink.io/routes[1]: expected [HOST:]LISTEN_PORT=SERVICE[:PORT]"
        "[/tcp|/http], got '8081'; the pod is admitted as it is"
    )


@pytest.mark.parametrize(
    ("options", "obj", "refusal"),
    [
        (
            SidecarOptions(),
            pod(
                {"sidelink.io/routes": ROUTES},
                containers=[{"name": "app", "image": "a", "ports": [{"containerPort": 6379}]}],
            ),
            "spec.containers[0].ports[0].containerPort 6379 of container app clashes with the "
            "sidecar's sidelink.io/routes[1].listen (127.0.0.1:6379): the containers of a pod "
            "share one network, so one of them could not bind it",
        ),
        (
            # A Job's pod, as the Job controller creates it.
            SidecarOptions(classic=True),
            pod({"sidelink.io/routes": ROUTES}, restartPolicy="OnFailure"),
            "spec.restartPolicy is OnFailure: the pod must run to completion, and a classic "
            "sidecar never exits; use the native sidecar (the default, without --classic), "
            "which works for Jobs",
        ),
    ],
    ids=["shared port", "classic for a Job"],
)
def test_a_pod_the_sidecar_could_not_run_in_is_admitted_with_a_warning(
    options: SidecarOptions, obj: dict[str, Any], refusal: str
) -> None:
    response = review(json.dumps(admission(obj)).encode(), options)["response"]
    assert response == {
        "uid": "u-1",
        "allowed": True,
        "warnings": [
            f"sidelink: pod shop/web-7d9c-*: not injected: {refusal}; the pod is admitted as it is"
        ],
    }


async def test_a_pod_without_routes_is_admitted_with_a_warning(client: Client) -> None:
    response = await client.post(admission(pod()))
    assert "patch" not in response
    [warning] = response["warnings"]
    assert warning.startswith("sidelink: pod shop/web-7d9c-*: not injected: no routes; annotate")


def garbled(**fields: Any) -> bytes:
    """An AdmissionReview of a pod (uid u-1) with these top-level fields changed."""
    return json.dumps({**admission(pod()), **fields}).encode()


# Each answer carries the request's uid wherever one can be read: the API server discards an
# answer whose uid is not its request's.
GARBAGE = {
    "not json": (b"{not json", "the request is not JSON", ""),
    "a list": (b"[1, 2]", "the request is not an AdmissionReview admission.k8s.io/v1", ""),
    "v1beta1": (
        garbled(apiVersion="admission.k8s.io/v1beta1"),
        "the request is not an AdmissionReview admission.k8s.io/v1",
        "u-1",
    ),
    "another kind": (
        garbled(kind="AdmissionRequest"),
        "the request is not an AdmissionReview admission.k8s.io/v1",
        "u-1",
    ),
    "a uid not a string": (
        garbled(request={"uid": 7}),
        "the AdmissionReview's request has no uid",
        "",
    ),
    "no request": (
        b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}',
        "the AdmissionReview has no request",
        "",
    ),
    "nested deep": (b"[" * 100_000 + b"]" * 100_000, "the request is not JSON", ""),
    "empty": (b"", "the request is not JSON", ""),
    "binary": (bytes(range(256)), "the request is not JSON", ""),
}


@pytest.mark.parametrize("name", GARBAGE)
async def test_a_request_it_cannot_read_is_allowed_with_a_warning(
    client: Client, name: str
) -> None:
    body, why, uid = GARBAGE[name]
    response = await client.post(body)
    assert response == {
        "uid": uid,
        "allowed": True,
        "warnings": [f"sidelink: {why}; the pod is admitted as it is"],
    }


async def test_a_review_without_a_pod_keeps_its_uid_and_warns(client: Client) -> None:
    for obj in (None, "a pod", [1]):
        response = await client.post(admission(obj, uid="u-7"))
        assert response["uid"] == "u-7"
        assert response["warnings"] == [
            "sidelink: the request holds no Pod object; the pod is admitted as it is"
        ]
    review_ = admission(pod())
    review_["request"]["kind"] = {"group": "apps", "version": "v1", "kind": "Deployment"}
    assert (await client.post(review_))["warnings"] == [
        "sidelink: the request is not for a Pod; the pod is admitted as it is"
    ]
    review_ = admission(pod())
    del review_["request"]["uid"]
    assert (await client.post(review_))["uid"] == ""
    # Not a CREATE: nothing to do, nothing to say.
    obj = pod({"sidelink.io/routes": ROUTES})
    assert await client.post(admission(obj, operation="UPDATE")) == {"uid": "u-1", "allowed": True}
    odd = pod({"sidelink.io/routes": ROUTES})
    odd["spec"] = {"containers": "app"}
    [warning] = (await client.post(admission(odd)))["warnings"]
    assert "spec.containers must be a list, got a string" in warning


async def test_a_request_over_the_limit_is_allowed_with_a_warning(client: Client) -> None:
    response = await client.post(b" " * (MAX_REVIEW_BYTES + 1))
    assert response["warnings"] == [
        f"sidelink: the request is over {MAX_REVIEW_BYTES} bytes; the pod is admitted as it is"
    ]


async def test_healthz_and_draining(webhook: Webhook, client: Client) -> None:
    assert await client.get("/healthz") == (200, "ok\n")
    webhook.shutdown()
    assert await client.get("/healthz") == (503, "draining\n")
    # Still answering reviews while the endpoints follow.
    obj = pod({"sidelink.io/routes": ROUTES})
    assert patched(obj, await client.post(admission(obj))) == inject_like_the_command(obj)
    await asyncio.wait_for(webhook.serve_until_shutdown(), 5)


async def test_plain_http_gets_no_answer(webhook: Webhook) -> None:
    _, port = hook_address(webhook)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):
            async with session.get(f"http://127.0.0.1:{port}/healthz") as r:
                await r.read()


async def test_a_renewed_certificate_is_served_to_new_connections(
    ca: trustme.CA, tmp_path: Path
) -> None:
    crt, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    first = ca.issue_cert("localhost")
    first.cert_chain_pems[0].write_to_path(str(crt))
    first.private_key_pem.write_to_path(str(key))
    hook = Webhook(SidecarOptions(), str(crt), str(key), check_interval=0.05)
    await hook.start("127.0.0.1", 0)
    try:
        _, port = hook_address(hook)
        assert repr(hook) == f"<Webhook 127.0.0.1:{port} cert={crt} reloads=0 draining=False>"
        assert await served_cert(port, ca) == first.cert_chain_pems[0].bytes()
        second = ca.issue_cert("localhost")
        # As the kubelet updates a Secret volume: new files, moved in place.
        (tmp_path / "new.crt").write_bytes(second.cert_chain_pems[0].bytes())
        (tmp_path / "new.key").write_bytes(second.private_key_pem.bytes())
        (tmp_path / "new.key").replace(key)
        (tmp_path / "new.crt").replace(crt)
        await until(lambda: hook.reloads == 1, 5, "the certificate to be reloaded")
        assert await served_cert(port, ca) == second.cert_chain_pems[0].bytes()
        # A broken pair is not loaded: the one in use stays.
        crt.write_text("not a certificate")
        assert hook.reload_certificate() is False
        assert await served_cert(port, ca) == second.cert_chain_pems[0].bytes()
    finally:
        await hook.stop()


async def served_cert(port: int, ca: trustme.CA) -> bytes:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    _, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="localhost"
    )
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True)
        return ssl.DER_cert_to_PEM_cert(der).encode()
    finally:
        writer.close()


def test_a_missing_or_broken_certificate_is_a_certificate_error(
    ca: trustme.CA, cert_files: tuple[str, str], tmp_path: Path
) -> None:
    crt, key = cert_files
    other_key = tmp_path / "other.key"
    ca.issue_cert("localhost").private_key_pem.write_to_path(str(other_key))
    with pytest.raises(CertificateError, match=r"^--cert nope --key .*: cannot load.*No such file"):
        Webhook(SidecarOptions(), "nope", key)
    bad = tmp_path / "bad.pem"
    bad.write_text("junk")
    # Which of the two files is wrong (OpenSSL says "PEM lib" for either).
    with pytest.raises(
        CertificateError, match=f"cannot load: {re.escape(str(bad))} holds no PEM certificate$"
    ):
        Webhook(SidecarOptions(), str(bad), key)
    with pytest.raises(CertificateError, match="cannot load: the key file holds no PEM private"):
        Webhook(SidecarOptions(), crt, crt)
    with pytest.raises(CertificateError, match=r"cannot load: the key is not the certificate's$"):
        Webhook(SidecarOptions(), crt, str(other_key))


# --- the patch ------------------------------------------------------------------------------


def test_json_patch_adds_at_the_front_or_the_end_and_escapes_keys() -> None:
    before = {"a": [1, 2], "b": [1], "c": {"x/y~z": 1}, "d": 1, "gone": 0}
    after = {"a": [0, 1, 2], "b": [1, 2, 3], "c": {"x/y~z": 2}, "d": [1], "new": {}}
    ops = json_patch(before, after)
    assert ops == [
        {"op": "remove", "path": "/gone"},
        {"op": "add", "path": "/a/0", "value": 0},
        {"op": "add", "path": "/b/-", "value": 2},
        {"op": "add", "path": "/b/-", "value": 3},
        {"op": "replace", "path": "/c/x~1y~0z", "value": 2},
        {"op": "replace", "path": "/d", "value": [1]},
        {"op": "add", "path": "/new", "value": {}},
    ]
    assert jsonpatch.apply_patch(before, ops) == after
    assert json_patch(after, after) == []
    assert jsonpatch.apply_patch([1], json_patch([1], [2, 1, 3])) == [2, 1, 3]


def test_review_is_pure_and_leaves_the_request_as_it_was() -> None:
    obj = pod({"sidelink.io/routes": ROUTES})
    kept = copy.deepcopy(obj)
    answer = review(json.dumps(admission(obj)).encode(), SidecarOptions())
    assert obj == kept
    assert patched(obj, answer["response"]) == inject_like_the_command(obj)


# --- `sidelink webhook`, the command --------------------------------------------------------


@pytest.fixture
def command(cert_files: tuple[str, str]) -> Iterator[tuple[subprocess.Popen[str], int]]:
    port = free_port()
    args = ["webhook", "--cert", cert_files[0], "--key", cert_files[1], "--drain-delay", "0.2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", *args, "--listen", f"127.0.0.1:{port}"],
        env=clean_environ(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def https(ca: trustme.CA, url: str, body: bytes | None = None) -> tuple[int, bytes]:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, context=context, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_the_command_serves_and_stops_on_sigterm(
    command: tuple[subprocess.Popen[str], int], ca: trustme.CA
) -> None:
    proc, port = command
    base = f"https://localhost:{port}"

    def up() -> bool:
        assert proc.poll() is None, proc.communicate()
        try:
            return https(ca, base + "/healthz") == (200, b"ok\n")
        except OSError:
            return False

    until_sync(up, 15, "the webhook to answer")
    obj = pod({"sidelink.io/routes": ROUTES})
    status, body = https(ca, base + "/mutate", json.dumps(admission(obj)).encode())
    assert status == 200
    after = patched(obj, json.loads(body)["response"])
    assert after == inject_like_the_command(obj)
    assert_valid(after)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    _, err = proc.communicate()
    assert "pod shop/web-7d9c-*: injected" in err
    assert "webhook stopped" in err


def webhook_command(*args: str) -> subprocess.CompletedProcess[str]:
    """`sidelink webhook` with these arguments, run to its end (a refusal, here)."""
    return subprocess.run(
        [sys.executable, "-m", "proxy", "webhook", *args],
        env=clean_environ(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--cert", "nope.crt", "--key", "nope.key"],
            "--cert nope.crt --key nope.key: cannot load",
        ),
        (["--listen", "localhost:8443"], "--listen: must be IP:PORT"),
    ],
)
def test_the_command_refuses_bad_options_in_one_line(
    cert_files: tuple[str, str], args: list[str], expected: str
) -> None:
    done = webhook_command("--cert", cert_files[0], "--key", cert_files[1], *args)
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert line.startswith(expected), line


def test_the_command_needs_cert_and_key() -> None:
    done = webhook_command()
    assert done.returncode == 2
    assert "the following arguments are required: --cert, --key" in done.stderr


def test_a_taken_address_exits_1(cert_files: tuple[str, str]) -> None:
    args = ["webhook", "--cert", cert_files[0], "--key", cert_files[1]]
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "proxy", *args, "--listen", f"127.0.0.1:{port}"],
            env=clean_environ(),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert done.returncode == 1
    assert f"cannot start: 127.0.0.1:{port}:" in done.stderr


# --- deploy/webhook: valid manifests, and certificates by hand ------------------------------

CERT_MANAGER_KINDS = {("cert-manager.io/v1", "Issuer"), ("cert-manager.io/v1", "Certificate")}


def manifests(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)
    return docs


@pytest.mark.parametrize("name", ["webhook.yaml", "mutating-webhook.yaml", "cert-manager.yaml"])
@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_the_manifests_are_valid_kubernetes(name: str, version: str) -> None:
    for doc in manifests(DEPLOY / name):
        if (doc["apiVersion"], doc["kind"]) in CERT_MANAGER_KINDS:
            # Custom resources: kubernetes-validate has no schema for them. Their shape is
            # checked below against what cert-manager needs of them.
            continue
        assert kube_errors(doc, version) is None


def test_the_webhook_configuration_selects_as_documented() -> None:
    [config] = manifests(DEPLOY / "mutating-webhook.yaml")
    entries = {w["name"]: w for w in config["webhooks"]}
    assert set(entries) == {"namespaces.inject.sidelink.io", "pods.inject.sidelink.io"}
    for entry in entries.values():
        assert entry["failurePolicy"] == "Ignore"
        assert entry["sideEffects"] == "None"
        assert entry["admissionReviewVersions"] == ["v1"]
        assert entry["timeoutSeconds"] <= 5
        assert entry["rules"] == [
            {
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "operations": ["CREATE"],
                "resources": ["pods"],
                "scope": "Namespaced",
            }
        ]
        assert entry["clientConfig"]["service"]["name"] == "sidelink-webhook"
        expressions = entry["namespaceSelector"]["matchExpressions"]
        own = {"key": "kubernetes.io/metadata.name", "operator": "NotIn"}
        assert any(
            own.items() <= e.items() and "sidelink-system" in e["values"] for e in expressions
        )
    by_ns = entries["namespaces.inject.sidelink.io"]
    assert by_ns["clientConfig"]["service"]["path"] == "/mutate"
    assert {"key": "sidelink.io/inject", "operator": "In", "values": ["enabled"]} in by_ns[
        "namespaceSelector"
    ]["matchExpressions"]
    by_pod = entries["pods.inject.sidelink.io"]
    assert by_pod["clientConfig"]["service"]["path"] == "/mutate/annotated"
    assert "'sidelink.io/inject'" in by_pod["matchConditions"][0]["expression"]
    # cert-manager's cainjector fills the caBundle from the serving Certificate.
    issued = {d["metadata"]["name"]: d for d in manifests(DEPLOY / "cert-manager.yaml")}
    namespace, name = config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"].split("/")
    serving = issued[name]
    assert (serving["kind"], serving["metadata"]["namespace"]) == ("Certificate", namespace)
    assert "sidelink-webhook.sidelink-system.svc" in serving["spec"]["dnsNames"]
    # The Secret the Deployment mounts is the one cert-manager writes.
    deployment = next(d for d in manifests(DEPLOY / "webhook.yaml") if d["kind"] == "Deployment")
    [volume] = deployment["spec"]["template"]["spec"]["volumes"]
    assert volume["secret"]["secretName"] == serving["spec"]["secretName"]
    assert serving["spec"]["issuerRef"]["name"] in issued


def test_the_deployment_runs_the_webhook_command_with_its_options() -> None:
    deployment = next(d for d in manifests(DEPLOY / "webhook.yaml") if d["kind"] == "Deployment")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[0] == "webhook"
    # The same arguments parse for the command.
    parsed = _parser().parse_args(args)
    assert parsed.cert == "/etc/sidelink-webhook/tls.crt"
    assert parsed.key == "/etc/sidelink-webhook/tls.key"
    assert container["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"


@pytest.fixture
def certs_by_hand(tmp_path: Path) -> Path:
    """deploy/webhook/make-certs.sh run as the README says."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    done = subprocess.run(
        ["sh", str(DEPLOY / "make-certs.sh"), str(tmp_path / "certs")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return tmp_path / "certs"


async def test_certificates_made_by_hand_are_served_and_trusted(certs_by_hand: Path) -> None:
    certs = certs_by_hand
    [config] = manifests(certs / "mutating-webhook.yaml")
    assert "annotations" not in config["metadata"]
    for version in KUBE_VERSIONS:
        assert kube_errors(config, version) is None
    bundles = {w["clientConfig"]["caBundle"] for w in config["webhooks"]}
    assert bundles == {base64.b64encode((certs / "ca.crt").read_bytes()).decode()}
    # Everything else is the manifest as shipped.
    [shipped] = manifests(DEPLOY / "mutating-webhook.yaml")
    for w in config["webhooks"]:
        del w["clientConfig"]["caBundle"]
    del shipped["metadata"]["annotations"]
    assert config == shipped

    hook = Webhook(SidecarOptions(), str(certs / "tls.crt"), str(certs / "tls.key"))
    await hook.start("127.0.0.1", 0)
    try:
        _, port = hook_address(hook)
        # As the API server calls it: the Service's name, trusting the caBundle only. Strict
        # RFC 5280 checks, as Python 3.13 makes by default (a CA without keyUsage fails).
        context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        context.verify_flags |= ssl.VERIFY_X509_STRICT
        connector = aiohttp.TCPConnector(
            ssl=context, resolver=_Pinned("sidelink-webhook.sidelink-system.svc")
        )
        async with aiohttp.ClientSession(connector=connector) as session:
            obj = pod({"sidelink.io/routes": ROUTES})
            url = f"https://sidelink-webhook.sidelink-system.svc:{port}/mutate"
            async with session.post(url, json=admission(obj)) as r:
                answer = await r.json()
        assert patched(obj, answer["response"]) == inject_like_the_command(obj)
    finally:
        await hook.stop()


class _Pinned(aiohttp.abc.AbstractResolver):
    """Resolves the one Service name to 127.0.0.1, as cluster DNS would to its ClusterIP."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def resolve(self, host: str, port: int = 0, family: int = 0) -> list[dict[str, Any]]:
        assert host == self.name
        return [
            {
                "hostname": host,
                "host": "127.0.0.1",
                "port": port,
                "family": 2,
                "proto": 0,
                "flags": 0,
            }
        ]

    async def close(self) -> None:
        pass
