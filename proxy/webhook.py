"""``sidelink webhook``: the mutating admission webhook that injects the sidecar into new pods.

The API server POSTs an ``AdmissionReview`` (``admission.k8s.io/v1``) for each pod CREATE it
selects; the answer allows the pod and, to inject it, carries an RFC 6902 JSONPatch made by
diffing the pod before and after :func:`proxy.inject.inject_pod`, the code ``sidelink
inject`` runs on each pod template, so both give the same pod.

Which pods arrive is the ``MutatingWebhookConfiguration``'s choice (deploy/webhook/): on
``/mutate`` those of namespaces labelled ``sidelink.io/inject=enabled``, injected unless the
pod is annotated ``sidelink.io/inject: disabled``; on ``/mutate/annotated`` those of other
namespaces, injected only when annotated ``sidelink.io/inject: enabled`` (labels can be
selected by the API server, annotations cannot, so this path checks it). A pod that already
has a ``sidelink`` container gets no patch.

The webhook is meant to run with ``failurePolicy: Ignore``: whatever it is sent, it answers
200 with an allowed ``AdmissionReview``. A request it cannot read, and a pod it cannot inject
(routes the sidecar would refuse, none at all), get the answer with a warning, which kubectl
shows the user, and no patch; never an error page.

TLS: the certificate and key are read at start, and again when their files change (a
renewed Secret, which the kubelet swaps in place) or on SIGHUP; new connections get the new
pair. SIGTERM: ``/healthz`` turns 503 at once, requests are served ``drain_delay`` more
(while the Service's endpoints follow), then those under way finish and it exits.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import logging
import os
import socket
import ssl
from typing import Any, Final

from aiohttp import web

from proxy.inject import (
    CONTAINER_NAME,
    ENABLED,
    INJECT_ANNOTATION,
    ROUTES_ANNOTATION,
    InjectError,
    NoRoutesError,
    Outcome,
    SidecarOptions,
    inject_pod,
)

log = logging.getLogger("sidelink.webhook")
http_log = logging.getLogger("sidelink.webhook.http")

DEFAULT_LISTEN: Final = "0.0.0.0:8443"
MUTATE_PATH: Final = "/mutate"
# For the webhook entry that sends every pod of the namespaces not opted in: inject only
# those annotated sidelink.io/inject: enabled.
MUTATE_ANNOTATED_PATH: Final = "/mutate/annotated"
HEALTH_PATH: Final = "/healthz"

REVIEW_VERSION: Final = "admission.k8s.io/v1"
# An AdmissionReview holds the object (and, on updates, the old one); the API server stores
# objects of at most 1.5 MiB, so this is room for two and the envelope.
MAX_REVIEW_BYTES: Final = 4 * 1024 * 1024
# How often the certificate and key files are looked at for a renewal.
CERT_CHECK_INTERVAL: Final = 30.0
# Answers under way get this long to finish once the listener is closed.
STOP_TIMEOUT: Final = 5.0
# The API server's own timeout for a call is seconds: a client idle longer is let go.
KEEPALIVE_TIMEOUT: Final = 75.0

_Patch = list[dict[str, Any]]


class CertificateError(ValueError):
    """The certificate or key cannot be loaded; the message says which and why."""


def review(body: bytes, options: SidecarOptions, *, annotated_only: bool = False) -> dict[str, Any]:
    """The ``AdmissionReview`` answering ``body``: always allowed, patched to inject the pod.

    ``annotated_only``: inject only a pod annotated ``sidelink.io/inject: enabled`` (else one
    not annotated ``disabled``). Pure but for a log line per pod: no I/O.
    """
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return _answer("", warning="the request is not JSON")
    request = data.get("request") if isinstance(data, dict) else None
    uid = request.get("uid") if isinstance(request, dict) else None
    # The API server discards an answer whose uid is not its request's: echo it wherever it
    # can be read, refusals included.
    uid = uid if isinstance(uid, str) else ""
    if (
        not isinstance(data, dict)
        or data.get("apiVersion") != REVIEW_VERSION
        or data.get("kind") != "AdmissionReview"
    ):
        return _answer(uid, warning=f"the request is not an AdmissionReview {REVIEW_VERSION}")
    if not isinstance(request, dict):
        return _answer("", warning="the AdmissionReview has no request")
    if not uid:
        return _answer("", warning="the AdmissionReview's request has no uid")
    try:
        return _review_request(uid, request, options, annotated_only)
    except Exception:  # a bug of ours must not become an error page: the pod goes in as it is
        log.exception("cannot review the request")
        return _answer(uid, warning="internal error, see the webhook's log")


def _review_request(
    uid: str, request: dict[str, Any], options: SidecarOptions, annotated_only: bool
) -> dict[str, Any]:
    kind = request.get("kind")
    if not isinstance(kind, dict) or (kind.get("group"), kind.get("kind")) != ("", "Pod"):
        return _answer(uid, warning="the request is not for a Pod")
    if request.get("operation") != "CREATE" or request.get("subResource"):
        # Only a new pod gets a sidecar: its containers cannot change afterwards.
        return _answer(uid)
    pod = request.get("object")
    if not isinstance(pod, dict):
        return _answer(uid, warning="the request holds no Pod object")
    name = _pod_name(pod, request.get("namespace"))
    try:
        return _mutate(uid, name, pod, options, annotated_only)
    except RecursionError:
        return _answer(uid, warning=f"pod {name}: nested too deeply")


def _mutate(
    uid: str, name: str, pod: dict[str, Any], options: SidecarOptions, annotated_only: bool
) -> dict[str, Any]:
    metadata = pod.get("metadata")
    annotations = metadata.get("annotations") if isinstance(metadata, dict) else None
    opted_in = isinstance(annotations, dict) and annotations.get(INJECT_ANNOTATION) == ENABLED
    if annotated_only and not opted_in:
        return _answer(uid)
    injected = copy.deepcopy(pod)
    try:
        outcome = inject_pod(injected, options)
    except NoRoutesError:
        log.warning("pod %s: not injected: no routes", name)
        return _answer(
            uid,
            warning=(
                f"pod {name}: not injected: no routes; annotate it {ROUTES_ANNOTATION}: "
                '"PORT=SERVICE[:PORT][/tcp|/http],..." (or run the webhook with --config-map)'
            ),
        )
    except InjectError as e:
        log.warning("pod %s: not injected: %s", name, e)
        return _answer(uid, warning=f"pod {name}: not injected: {e}")
    if outcome is not Outcome.INJECTED:
        why = (
            f"it has a {CONTAINER_NAME} container" if outcome is Outcome.UNCHANGED else "opted out"
        )
        log.info("pod %s: left as it is (%s)", name, why)
        return _answer(uid)
    log.info("pod %s: injected", name)
    return _answer(uid, json_patch(pod, injected))


def _pod_name(pod: dict[str, Any], namespace: object) -> str:
    """``ns/name``; a pod of a ReplicaSet has only its generateName yet (``ns/web-7d9c-*``)."""
    metadata = pod.get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    name = metadata.get("name")
    if not isinstance(name, str) or not name:
        prefix = metadata.get("generateName")
        name = f"{prefix}*" if isinstance(prefix, str) and prefix else "(unnamed)"
    return f"{namespace}/{name}" if isinstance(namespace, str) and namespace else name


def _answer(uid: str, patch: _Patch | None = None, *, warning: str = "") -> dict[str, Any]:
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode("ascii")
    if warning:
        # kubectl prints each as "Warning: ..."; the pod is created either way.
        response["warnings"] = [f"sidelink: {warning}; the pod is admitted as it is"]
    return {"apiVersion": REVIEW_VERSION, "kind": "AdmissionReview", "response": response}


def json_patch(before: Any, after: Any, path: str = "") -> _Patch:
    """An RFC 6902 patch turning ``before`` into ``after`` (JSON values), for pod specs.

    Mappings are compared key by key; a list that only gained items at its front or its end
    (containers, init containers, volumes) gets an ``add`` per item, so what other webhooks
    did to the same list is kept; any other change replaces the value whole.
    """
    if isinstance(before, dict) and isinstance(after, dict):
        ops: _Patch = [
            {"op": "remove", "path": _pointer(path, k)} for k in before if k not in after
        ]
        for key, value in after.items():
            if key not in before:
                ops.append({"op": "add", "path": _pointer(path, key), "value": value})
            elif before[key] != value:
                ops += json_patch(before[key], value, _pointer(path, key))
        return ops
    if isinstance(before, list) and isinstance(after, list) and len(after) > len(before):
        gained = len(after) - len(before)
        if after[gained:] == before:
            return [{"op": "add", "path": f"{path}/{i}", "value": after[i]} for i in range(gained)]
        if after[: len(before)] == before:
            return [{"op": "add", "path": f"{path}/-", "value": v} for v in after[len(before) :]]
    if before == after:
        return []
    return [{"op": "replace", "path": path, "value": after}]


def _pointer(path: str, key: str) -> str:
    """RFC 6901: ``~`` and ``/`` in a key are escaped (``sidelink.io~1routes``)."""
    return f"{path}/{key.replace('~', '~0').replace('/', '~1')}"


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """A server context holding the pair; raises CertificateError naming the files."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_pair(context, cert, key)
    return context


def _load_pair(context: ssl.SSLContext, cert: str, key: str) -> None:
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as e:
        # OpenSSL says "PEM lib" for either file: which one it is, is found out here.
        why = _bad_pair(cert, e)
        raise CertificateError(f"--cert {cert} --key {key}: cannot load: {why}") from None
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        raise CertificateError(
            f"--cert {cert} --key {key}: cannot load{where}: {e.strerror or e}"
        ) from None


def _bad_pair(cert: str, e: ssl.SSLError) -> str:
    """What is wrong with a pair OpenSSL refused: the certificate file, or the key."""
    if e.reason == "KEY_VALUES_MISMATCH":
        return "the key is not the certificate's"
    try:
        ssl.create_default_context().load_verify_locations(cafile=cert)
    except ssl.SSLError:
        return f"{cert} holds no PEM certificate"
    return "the key file holds no PEM private key (without a passphrase)"


class Webhook:
    """The HTTPS server: ``/mutate``, ``/mutate/annotated``, ``/healthz``; and its lifecycle."""

    def __init__(
        self,
        options: SidecarOptions,
        cert: str,
        key: str,
        *,
        drain_delay: float = 0.0,
        check_interval: float = CERT_CHECK_INTERVAL,
    ) -> None:
        self.options = options
        self.cert = cert
        self.key = key
        self.drain_delay = drain_delay
        self.check_interval = check_interval
        self.draining = False
        self.address: tuple[str, int] | None = None
        self.reloads = 0
        self.ssl = tls_context(cert, key)
        self._files = self._file_state()
        self._shutdown_requested = asyncio.Event()
        self._force = asyncio.Event()
        self._watch: asyncio.Task[None] | None = None
        app = web.Application(logger=log, client_max_size=MAX_REVIEW_BYTES)
        app.router.add_post(MUTATE_PATH, self.mutate)
        app.router.add_post(MUTATE_ANNOTATED_PATH, self.mutate_annotated)
        app.router.add_get(HEALTH_PATH, self.healthz)
        self._runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            logger=http_log,
            shutdown_timeout=STOP_TIMEOUT,
            keepalive_timeout=KEEPALIVE_TIMEOUT,
        )

    def __repr__(self) -> str:
        where = f"{self.address[0]}:{self.address[1]}" if self.address else "not listening"
        return f"<Webhook {where} cert={self.cert} reloads={self.reloads} draining={self.draining}>"

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen; return the address bound (port 0 picks one). Raises OSError."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # Bound here rather than by a TCPSite, so the port it took is known (port 0 in tests).
        sock = socket.create_server((host, port), family=family)
        await self._runner.setup()
        await web.SockSite(self._runner, sock, ssl_context=self.ssl).start()
        sockname = sock.getsockname()
        self.address = (sockname[0], sockname[1])
        self._watch = asyncio.get_running_loop().create_task(self._watch_files())
        log.info("webhook listening on https://%s:%d%s", sockname[0], sockname[1], MUTATE_PATH)
        return sockname[0], sockname[1]

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        await self._runner.cleanup()

    def shutdown(self) -> None:
        """The SIGTERM trigger: the first call drains, a second one ends everything now."""
        if self._shutdown_requested.is_set():
            log.warning("second shutdown signal: exiting now")
            self._force.set()
            return
        log.info("shutting down: not ready; serving %.1fs more", self.drain_delay)
        self.draining = True
        self._shutdown_requested.set()

    async def serve_until_shutdown(self) -> None:
        """Run (after start) until a shutdown has completed."""
        await self._shutdown_requested.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._force.wait(), self.drain_delay)
        await self.stop()

    def reload_certificate(self) -> bool:
        """Load the pair again into the live context (new connections get it); False: kept."""
        files = self._file_state()
        try:
            _load_pair(self.ssl, self.cert, self.key)
        except CertificateError as e:
            # A renewal seen half way (the new certificate, the old key) loads at the next look.
            log.warning("certificate not reloaded, the one loaded stays: %s", e)
            return False
        self._files = files
        self.reloads += 1
        log.info("certificate reloaded from %s", self.cert)
        return True

    def _file_state(self) -> tuple[tuple[int, int, int], ...]:
        """What changes when a file is replaced (a Secret update swaps a symlink)."""
        state = []
        for path in (self.cert, self.key):
            try:
                st = os.stat(path)
            except OSError:
                state.append((0, 0, 0))
                continue
            state.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(state)

    async def _watch_files(self) -> None:
        while True:
            await asyncio.sleep(self.check_interval)
            if self._file_state() != self._files:
                self.reload_certificate()

    async def mutate(self, request: web.Request) -> web.Response:
        return await self._review(request, annotated_only=False)

    async def mutate_annotated(self, request: web.Request) -> web.Response:
        return await self._review(request, annotated_only=True)

    async def _review(self, request: web.Request, *, annotated_only: bool) -> web.Response:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            answer = _answer("", warning=f"the request is over {MAX_REVIEW_BYTES} bytes")
        else:
            answer = review(body, self.options, annotated_only=annotated_only)
        return web.json_response(answer)

    async def healthz(self, request: web.Request) -> web.Response:
        if self.draining:
            return web.Response(status=503, text="draining\n")
        return web.Response(text="ok\n")
