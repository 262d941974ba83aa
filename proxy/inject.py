"""``sidelink inject``: add the sidelink container to every pod template in Kubernetes YAML.

The input may hold many documents and ``kind: List`` objects. Each pod template found gets one
container named ``sidelink``: by default a native sidecar (first in ``initContainers`` with
``restartPolicy: Always``, which needs Kubernetes 1.29 or later) whose startup probe on
``/readyz`` holds the app back until every route has resolved; or with ``classic=True`` a
regular container first in ``containers``, whose ``postStart`` hook waits for ``/readyz`` (the
kubelet starts the next container only once the hook has returned). Every other object passes
through unchanged, and the documents come out in the order they went in.

A pod template that already has a ``sidelink`` container (in either list) is left as it is, so
running the command again, with the same options or others, changes nothing. One annotated
``sidelink.io/inject: disabled`` is left alone too. A pod's annotation
``sidelink.io/routes: "8081=svc.ns:80/http,..."`` gives that pod's routes, in place of the
``routes`` option. The admission webhook (:mod:`proxy.webhook`) injects a Pod with the same
code, through :func:`inject_pod`.

The routes are checked as ``sidelink run`` checks them, so a sidecar that could not start is
refused rather than written: quick routes must parse, and either some route or a ConfigMap
must be given (a ConfigMap in the same input is validated too, with the quick routes); no
container of the pod may declare a TCP port the sidecar listens on. A pod that runs to
completion (a Job's) is refused a classic sidecar, which would never let it complete.

The output is re-serialised YAML: key order and values are kept, but comments, quoting style
and anchors of the input are not (a string of several lines is written as a ``|`` block).
"""

from __future__ import annotations

import enum
import posixpath
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from proxy import __version__
from proxy.config import (
    CONFIG_MAP_KEY,
    DEFAULT_CONFIG_PATH,
    ROUTES_ENV,
    AdminConfig,
    Config,
    ConfigError,
    parse,
    text_start,
    unacceptable,
)

DEFAULT_IMAGE = "ghcr.io/sidelink/sidelink:" + __version__

CONTAINER_NAME = "sidelink"
CONFIG_VOLUME = "sidelink-config"
ADMIN_PORT_NAME = "sidelink-admin"
# The proxy reads DEFAULT_CONFIG_PATH when no --config is given, so mounting the ConfigMap
# on its directory means the pod needs no extra argument; the ConfigMap must hold that key.
CONFIG_MOUNT_PATH = posixpath.dirname(DEFAULT_CONFIG_PATH)
ADMIN_PORT = AdminConfig().port

# Pod annotations: the opt-in and opt-out (the webhook's; inject honours the opt-out too), and
# a pod's own routes.
INJECT_ANNOTATION = "sidelink.io/inject"
ENABLED = "enabled"
DISABLED = "disabled"
ROUTES_ANNOTATION = "sidelink.io/routes"
# The native sidecar's startup probe runs each second, this many times before the kubelet
# restarts it: routes that take two minutes to resolve still start.
STARTUP_PROBE_FAILURES = 120
# The classic sidecar's postStart hook waits this many seconds for /readyz.
CLASSIC_READY_TIMEOUT = 120
# The restart policies of a pod that runs to completion (a Job's): a classic sidecar, which
# never exits, would keep it running for ever.
RUNS_TO_COMPLETION = ("Never", "OnFailure")

# Where the pod template (its metadata and spec) sits in each kind; a Pod is its own.
_TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}

_Path = tuple[str | int, ...]


class _Loader(yaml.SafeLoader):
    """SafeLoader without the YAML 1.1 scalars that Kubernetes reads as plain strings.

    Kubernetes never parses base-60 numbers (``10:30``) and keeps timestamps as strings; loaded
    as PyYAML does, they would be written back as different text (``630``,
    ``2024-01-01 10:00:00+00:00``) and silently change an env value or an annotation.
    """


_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
_Loader.yaml_implicit_resolvers = {
    first: [
        # Only the base-60 forms of int and float contain a colon.
        (tag, re.compile("(?!.*:)" + rx.pattern, rx.flags) if tag in _NUMBER_TAGS else rx)
        for tag, rx in resolvers
        if tag != "tag:yaml.org,2002:timestamp"
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


class _Dumper(yaml.SafeDumper):
    """SafeDumper writing a string of several lines as a ``|`` block, as people write them."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    # PyYAML falls back to quotes where a block cannot hold the text (trailing spaces, say).
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


class InjectError(ValueError):
    """Input that cannot be injected; the message names the source, line and document."""


class NoRoutesError(InjectError):
    """A pod that would get a sidecar with no routes at all (it could not start)."""


# Builds (does not raise) the error for a path inside one pod template, so callers stay
# explicit. Paths are relative to the template (``metadata``, ``spec``).
_ErrorAt = Callable[[_Path, str], InjectError]


class _Document:
    """One input document: where it came from, for error messages."""

    def __init__(self, source: str, index: int, node: yaml.Node) -> None:
        self.source = source
        self.index = index
        self.node = node

    def error(self, obj: dict[str, Any], base: _Path, path: _Path, message: str) -> InjectError:
        where = f"document {self.index}"
        if base:
            where += f", {_dotted(base)}"
        kind = obj.get("kind")
        if isinstance(kind, str):
            metadata = obj.get("metadata")
            name = metadata.get("name") if isinstance(metadata, dict) else None
            where += f" ({kind} {name})" if isinstance(name, str) else f" ({kind})"
        subject = _dotted(path) if path else "the object"
        line = _line_of(self.node, base + path)
        return InjectError(f"{self.source}:{line}: {where}: {subject} {message}")


@dataclass(frozen=True, slots=True)
class Injection:
    """The documents written, and one line per object saying what was done to it."""

    text: str
    report: tuple[str, ...]  # "deployment/web: injected", "service/web: skipped", ...


class Outcome(enum.Enum):
    """What injecting did to one pod template (the word the report uses)."""

    INJECTED = "injected"
    # It already has a sidelink container, which is left as it is.
    UNCHANGED = "unchanged"
    DISABLED = f"skipped ({INJECT_ANNOTATION}: {DISABLED})"


@dataclass(frozen=True, slots=True)
class SidecarOptions:
    """What the sidecar is made of; the same for ``inject`` and the webhook."""

    routes: tuple[str, ...] = ()
    config_map: str | None = None
    image: str = DEFAULT_IMAGE
    classic: bool = False

    def __post_init__(self) -> None:
        # A bare string is a Sequence[str] too, and would silently become one route per
        # character.
        if isinstance(self.routes, str):
            raise TypeError("routes must be a sequence of route specs, not a single string")
        if self.config_map is not None and not self.config_map:
            raise ValueError("config_map must be a ConfigMap name, got an empty string")


def inject(
    text: str,
    *,
    routes: Sequence[str] = (),
    config_map: str | None = None,
    image: str = DEFAULT_IMAGE,
    classic: bool = False,
    source: str = "<stdin>",
) -> str:
    """Return ``text`` with the sidelink container added to every pod template.

    See :func:`inject_objects`, which also reports what it did per object.
    """
    return inject_objects(
        text, routes=routes, config_map=config_map, image=image, classic=classic, source=source
    ).text


def inject_objects(
    text: str,
    *,
    routes: Sequence[str] = (),
    config_map: str | None = None,
    image: str = DEFAULT_IMAGE,
    classic: bool = False,
    source: str = "<stdin>",
) -> Injection:
    """Add the sidelink container to every pod template in ``text``; say what was done.

    ``routes`` become the comma-separated ``SIDELINK_ROUTES`` variable, checked as the proxy
    checks them when it starts; a pod template annotated ``sidelink.io/routes`` gets those
    instead. ``config_map`` names a ConfigMap holding ``sidelink.yaml``, mounted read-only
    where the proxy looks by default. ``source`` only labels error messages.

    Raises :class:`InjectError` for routes the proxy would refuse, a pod left with no routes
    and no ConfigMap (the sidecar could not start), invalid YAML, a document that is not a
    mapping, or a pod template that is malformed.
    """
    if isinstance(routes, str):
        raise TypeError("routes must be a sequence of route specs, not a single string")
    options = SidecarOptions(tuple(routes), config_map, image, classic)

    loaded = _load(text, source)
    checker = _RouteCheck(options, _embedded_config(options, loaded, source))
    if options.routes:
        # Checked once up front, so a bad --route is refused whatever the input holds.
        checker.check(options.routes, None)
    documents: list[Any] = []
    report: list[str] = []
    for doc, data in loaded:
        if data is None:
            continue
        _inject_object(data, doc, (), checker, report)
        documents.append(data)
    out = yaml.dump_all(
        documents, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=float("inf")
    )
    return Injection(out, tuple(report))


def inject_pod(pod: dict[str, Any], options: SidecarOptions) -> Outcome:
    """Add the sidelink container to a Pod object (a mapping, as JSON gives it), in place.

    This is what ``inject`` does to each pod template, for the admission webhook. A ConfigMap
    named by ``options`` is trusted to exist (it cannot be checked here). Raises
    :class:`InjectError` (:class:`NoRoutesError` for a pod without routes) naming the field.
    """

    def error(path: _Path, message: str) -> InjectError:
        return InjectError(f"{_dotted(path) if path else 'the pod'} {message}")

    spec = pod.get("spec")
    if not isinstance(spec, dict):
        problem = "is missing" if spec is None else f"must be a mapping, got {_type_name(spec)}"
        raise error(("spec",), problem)
    return _inject_template(pod, _RouteCheck(options, None), error)


@dataclass(frozen=True, slots=True)
class _EmbeddedConfig:
    """The ``sidelink.yaml`` of the ConfigMap named by ``--config-map``, found in the input."""

    name: str
    text: str
    source: str
    first_line: int  # 0-based, in the input: where the text starts

    @property
    def label(self) -> str:
        return f"ConfigMap {self.name} data.{CONFIG_MAP_KEY}"

    def parse(self, routes: tuple[str, ...] = (), origin: str = "--route") -> Config:
        """The config with ``routes`` added; its problems name lines of the input, as check's do."""
        # parse counts lines from the start of its text: a blank line for each above the key
        # makes its line numbers the input's.
        try:
            return parse("\n" * self.first_line + self.text, self.label, routes, origin)
        except ConfigError as e:
            raise ConfigError([self._placed(p) for p in e.problems]) from None

    def _placed(self, problem: str) -> str:
        """``LABEL:LINE: ...`` as ``SOURCE:LINE: LABEL: ...``, the shape of inject's errors."""
        m = re.match(rf"{re.escape(self.label)}(:\d+)?: ", problem)
        if m is None:
            return problem  # a quick route's, which names itself
        return f"{self.source}{m[1] or ''}: {self.label}: {problem[m.end() :]}"


def _embedded_config(
    options: SidecarOptions, loaded: list[tuple[_Document, Any]], source: str
) -> _EmbeddedConfig | None:
    """The ConfigMap's ``sidelink.yaml`` when the input holds that ConfigMap, else None."""
    if options.config_map is None:
        return None
    found = None
    # A ConfigMap in the same input is checked with the routes; one elsewhere cannot be.
    for doc, data in loaded:
        for base, obj in _objects(data, ()):
            metadata = obj.get("metadata")
            if (
                obj.get("kind") != "ConfigMap"
                or not isinstance(metadata, dict)
                or metadata.get("name") != options.config_map
            ):
                continue
            held = obj.get("data")
            value = held.get(CONFIG_MAP_KEY) if isinstance(held, dict) else None
            if not isinstance(value, str):
                raise InjectError(
                    f"{source}: ConfigMap {options.config_map} has no data.{CONFIG_MAP_KEY}, "
                    f"which the sidecar reads as {DEFAULT_CONFIG_PATH}"
                )
            node = _node_at(doc.node, (*base, "data", CONFIG_MAP_KEY))
            first_line = text_start(node) if isinstance(node, yaml.ScalarNode) else 0
            found = _EmbeddedConfig(options.config_map, value, source, first_line)
    if found is not None:
        # Checked once here, so its problems are reported even when no pod is injected.
        try:
            found.parse()
        except ConfigError as e:
            raise InjectError("\n".join(e.problems)) from None
    return found


# The ports the sidecar listens on, each with the key that claims it and its address:
# ``--route[0].listen (127.0.0.1:8081)``.
_Listeners = dict[int, str]


class _RouteCheck:
    """Refuse what `sidelink run` in the sidecar would refuse: it exits 2, the pod crash-loops.

    Each set of routes is checked once (with the ConfigMap of the input, when it holds it).
    """

    def __init__(self, options: SidecarOptions, embedded: _EmbeddedConfig | None) -> None:
        self.options = options
        self.embedded = embedded
        self.label = "<none>" if embedded is None else embedded.label
        self._checked: dict[tuple[str, ...], _Listeners] = {}

    def check(
        self, routes: tuple[str, ...], error: Callable[[str], InjectError] | None
    ) -> _Listeners:
        """Raise the problems with ``routes``; ``error`` places an annotation's (None: --route).

        Returns the ports the sidecar listens on with them.
        """
        listeners = self._checked.get(routes)
        if listeners is not None:
            return listeners
        if self.options.config_map is None and not routes:
            raise NoRoutesError(
                "no routes: give --route SPEC (repeatable) or --config-map NAME; "
                "a sidecar without routes cannot start"
            )
        origin = "--route" if error is None else ROUTES_ANNOTATION
        try:
            if self.embedded is None:
                config = parse(None, "<none>", routes, origin)
            else:
                config = self.embedded.parse(routes, origin)
        except ConfigError as e:
            if error is None:
                raise InjectError("\n".join(e.problems)) from None
            raise error("; ".join(e.problems)) from None
        if self.embedded is not None and not config.routes:
            raise NoRoutesError(
                f"{self.label}: no routes, and no --route SPEC or {ROUTES_ANNOTATION} "
                "annotation adds one; a sidecar without routes cannot start"
            )
        # parse puts the file's routes first, then the quick ones in their order.
        in_file = len(config.routes) - len(routes)
        claims = [f"{self.label} routes[{i}]" for i in range(in_file)]
        claims += [f"{origin}[{i}]" for i in range(len(routes))]
        listeners = {
            r.listen_port: f"{who}.listen ({r.listen})"
            for who, r in zip(claims, config.routes, strict=True)
        }
        listeners[config.admin.port] = f"admin.listen ({config.admin.listen})"
        self._checked[routes] = listeners
        return listeners


def _objects(data: Any, base: _Path) -> Iterator[tuple[_Path, dict[str, Any]]]:
    """Every object of a document, the items of ``kind: List`` included, with its path."""
    if isinstance(data, dict):
        yield base, data
        items = data.get("items")
        if data.get("kind") == "List" and isinstance(items, list):
            for i, item in enumerate(items):
                yield from _objects(item, (*base, "items", i))


def _load(text: str, source: str) -> list[tuple[_Document, Any]]:
    """Every document with its node tree, kept so that later errors can name a line."""
    try:
        loader = _Loader(text)  # (which checks every character is one YAML allows)
    except yaml.reader.ReaderError as e:
        at, what = unacceptable(text, e)
        raise InjectError(f"{source}:{at}: {what}") from e
    loaded: list[tuple[_Document, Any]] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                break
            doc = _Document(source, len(loaded) + 1, node)
            loaded.append((doc, loader.construct_document(node)))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = e.problem or e.context or "invalid YAML"
        if e.problem and e.context:
            problem = f"{e.context}: {e.problem}"
        raise InjectError(f"{source}{line}: document {len(loaded) + 1}: {problem}") from e
    except yaml.YAMLError as e:
        raise InjectError(f"{source}: document {len(loaded) + 1}: {e}") from e
    except RecursionError:
        # PyYAML composes recursively: a document nested thousands deep ends here.
        raise InjectError(f"{source}: document {len(loaded) + 1}: nested too deeply") from None
    finally:
        loader.dispose()
    return loaded


def _inject_object(
    obj: Any,
    doc: _Document,
    base: _Path,
    checker: _RouteCheck,
    report: list[str],
) -> None:
    if not isinstance(obj, dict):
        where = f"document {doc.index}" + (f", {_dotted(base)}" if base else "")
        line = _line_of(doc.node, base)
        raise InjectError(
            f"{doc.source}:{line}: {where}: expected a mapping (a Kubernetes object), "
            f"got {_type_name(obj)}"
        )
    kind = obj.get("kind")
    if not isinstance(kind, str):
        where = f"document {doc.index}" + (f", {_dotted(base)}" if base else "")
        report.append(f"{where}: skipped (no kind)")
        return
    if kind == "List":
        items = obj.get("items")
        if items is None:
            return
        if not isinstance(items, list):
            raise doc.error(obj, base, ("items",), f"must be a list, got {_type_name(items)}")
        for i, item in enumerate(items):
            _inject_object(item, doc, (*base, "items", i), checker, report)
        return
    template_path = _TEMPLATE_PATHS.get(kind)
    if template_path is None:
        report.append(f"{_object_name(obj, kind)}: skipped")
        return
    spec_path = (*template_path, "spec")
    template: dict[str, Any] = obj
    node: dict[str, Any] = obj
    for depth, key in enumerate(spec_path):
        child = node.get(key)
        if not isinstance(child, dict):
            problem = (
                "is missing" if child is None else f"must be a mapping, got {_type_name(child)}"
            )
            raise doc.error(obj, base, spec_path[: depth + 1], problem)
        if depth == len(template_path) - 1:
            template = child
        node = child
    outcome = _inject_template(
        template,
        checker,
        lambda path, msg: doc.error(obj, base, template_path + path, msg),
    )
    report.append(f"{_object_name(obj, kind)}: {outcome.value}")


def _object_name(obj: dict[str, Any], kind: str) -> str:
    """``deployment/web``, as kubectl names objects."""
    metadata = obj.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    return f"{kind.lower()}/{name if isinstance(name, str) else '(unnamed)'}"


def _inject_template(template: dict[str, Any], checker: _RouteCheck, error: _ErrorAt) -> Outcome:
    """Inject into a pod template (or a Pod): its ``metadata`` and its ``spec``, a mapping."""
    options = checker.options
    annotations = _annotations(template, error)
    if annotations.get(INJECT_ANNOTATION) == DISABLED:
        return Outcome.DISABLED
    spec: dict[str, Any] = template["spec"]
    containers = _container_list(spec, "containers", error, required=True)
    init_containers = _container_list(spec, "initContainers", error, required=False)
    if any(c.get("name") == CONTAINER_NAME for c in containers + init_containers):
        return Outcome.UNCHANGED
    policy = spec.get("restartPolicy")
    if options.classic and policy in RUNS_TO_COMPLETION:
        raise error(
            ("spec", "restartPolicy"),
            f"is {policy}: the pod must run to completion, and a classic sidecar never exits; "
            "use the native sidecar (the default, without --classic), which works for Jobs",
        )

    routes = options.routes
    annotated = annotations.get(ROUTES_ANNOTATION)
    annotation_path = ("metadata", "annotations", ROUTES_ANNOTATION)
    if annotated is not None:
        if not isinstance(annotated, str):
            raise error(annotation_path, f"must be a string, got {_type_name(annotated)}")
        # The pod's own routes win over the command's: they are the more specific.
        routes = split_routes(annotated) or routes
    listeners = checker.check(
        routes, lambda problems: error(annotation_path, f"is refused: {problems}")
    )
    # (A classic sidecar starts once the init containers have run, all but native sidecars.)
    _refuse_shared_ports(
        init_containers, ("spec", "initContainers"), listeners, error, options.classic
    )
    _refuse_shared_ports(containers, ("spec", "containers"), listeners, error)

    sidecar = _sidecar(options, routes)
    if options.classic:
        # First: the kubelet starts containers in order, and the next one only once this
        # one's postStart hook has returned, so the app starts with the proxy ready.
        containers.insert(0, sidecar)
    else:
        # First, so the kubelet starts the proxy (and waits for its startup probe) before any
        # other init container, which may already need to reach a service through it.
        init_containers.insert(0, sidecar)
        spec["initContainers"] = init_containers
    _add_config_volume(spec, options, error)
    return Outcome.INJECTED


def split_routes(value: str) -> tuple[str, ...]:
    """A comma-separated list of quick routes (the annotation, ``$SIDELINK_ROUTES``)."""
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _annotations(template: dict[str, Any], error: _ErrorAt) -> dict[str, Any]:
    metadata = template.get("metadata")
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise error(("metadata",), f"must be a mapping, got {_type_name(metadata)}")
    annotations = metadata.get("annotations")
    if annotations is None:
        return {}
    if not isinstance(annotations, dict):
        raise error(
            ("metadata", "annotations"), f"must be a mapping, got {_type_name(annotations)}"
        )
    return annotations


def _container_list(
    spec: dict[str, Any], key: str, error: _ErrorAt, *, required: bool
) -> list[Any]:
    value = spec.get(key)
    if value is None:
        if required:
            raise error(("spec", key), "is missing")
        return []
    if not isinstance(value, list):
        raise error(("spec", key), f"must be a list, got {_type_name(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise error(
                ("spec", key, i), f"must be a mapping (a container), got {_type_name(item)}"
            )
    return value


def _refuse_shared_ports(
    containers: list[dict[str, Any]],
    path: _Path,
    listeners: _Listeners,
    error: _ErrorAt,
    sidecars_only: bool = False,
) -> None:
    """Refuse a TCP port a container declares that the sidecar listens on (with
    ``sidecars_only``, of the native sidecars among them only: the others have exited).

    The containers of a pod share one network namespace, so one of the two could not bind it.
    """
    for i, container in enumerate(containers):
        if sidecars_only and container.get("restartPolicy") != "Always":
            continue
        ports = container.get("ports")
        if not isinstance(ports, list):
            continue  # (the API server refuses a malformed list: only a clash is ours to find)
        for j, port in enumerate(ports):
            if not isinstance(port, dict) or port.get("protocol") not in (None, "TCP"):
                continue
            number = port.get("containerPort")
            claim = listeners.get(number) if isinstance(number, int) else None
            if claim is not None:
                name = container.get("name")
                of = f" of container {name}" if isinstance(name, str) else ""
                raise error(
                    (*path, i, "ports", j, "containerPort"),
                    f"{number}{of} clashes with the sidecar's {claim}: the containers of a pod "
                    "share one network, so one of them could not bind it",
                )


def _add_config_volume(spec: dict[str, Any], options: SidecarOptions, error: _ErrorAt) -> None:
    if options.config_map is None:
        return
    volumes = spec.get("volumes")
    if volumes is None:
        volumes = []
    elif not isinstance(volumes, list):
        raise error(("spec", "volumes"), f"must be a list, got {_type_name(volumes)}")
    volume = {"name": CONFIG_VOLUME, "configMap": {"name": options.config_map}}
    # A volume of that name is ours (the sidecar mounts it by that name): it is made to hold
    # the ConfigMap asked for, where it stands.
    ours = [
        i for i, v in enumerate(volumes) if isinstance(v, dict) and v.get("name") == CONFIG_VOLUME
    ]
    if ours:
        volumes[ours[0]] = volume
        for i in reversed(ours[1:]):
            del volumes[i]
    else:
        volumes.append(volume)
    spec["volumes"] = volumes


def wait_ready_script(port: int = ADMIN_PORT, timeout: int = CLASSIC_READY_TIMEOUT) -> str:
    """The classic sidecar's postStart hook: poll ``/readyz`` until 200, at most ``timeout`` s.

    The image has Python (and no curl), so the hook is ``python -c`` with urllib. Failing
    (not ready in time) makes the kubelet kill the container, which then restarts.
    """
    return (
        "import time, urllib.request as r\n"
        f"end = time.monotonic() + {timeout}\n"
        "while time.monotonic() < end:\n"
        "    try:\n"
        f"        r.urlopen('http://127.0.0.1:{port}/readyz', timeout=1)\n"
        "        break\n"
        "    except OSError:\n"
        "        time.sleep(0.5)\n"
        "else:\n"
        f"    raise SystemExit('sidelink: /readyz not ready after {timeout}s')\n"
    )


def _sidecar(options: SidecarOptions, routes: tuple[str, ...]) -> dict[str, Any]:
    """A new container every call: shared sub-objects would be dumped as YAML anchors."""
    container: dict[str, Any] = {"name": CONTAINER_NAME, "image": options.image}
    if not options.classic:
        container["restartPolicy"] = "Always"
    container["args"] = ["run"]
    if routes:
        container["env"] = [{"name": ROUTES_ENV, "value": ",".join(routes)}]
    container["ports"] = [{"name": ADMIN_PORT_NAME, "containerPort": ADMIN_PORT}]
    if options.config_map is not None:
        container["volumeMounts"] = [
            {"name": CONFIG_VOLUME, "mountPath": CONFIG_MOUNT_PATH, "readOnly": True}
        ]
    if options.classic:
        container["lifecycle"] = {
            "postStart": {"exec": {"command": ["python", "-c", wait_ready_script()]}}
        }
    else:
        container["startupProbe"] = {
            # For a native sidecar the kubelet holds back the app until this passes: /readyz
            # answers 200 once every listener is bound and every route has resolved, so the
            # app's first outbound call already finds its service. Generous, for a slow DNS
            # or a Service created just after the pod.
            "httpGet": {"path": "/readyz", "port": ADMIN_PORT},
            "periodSeconds": 1,
            "failureThreshold": STARTUP_PROBE_FAILURES,
        }
    container["readinessProbe"] = {
        "httpGet": {"path": "/readyz", "port": ADMIN_PORT},
        "periodSeconds": 2,
    }
    container["livenessProbe"] = {
        "httpGet": {"path": "/healthz", "port": ADMIN_PORT},
        "periodSeconds": 10,
        "failureThreshold": 3,
    }
    container["resources"] = {
        "requests": {"cpu": "50m", "memory": "64Mi"},
        # No CPU limit: throttling a proxy adds latency to every call the app makes.
        "limits": {"memory": "128Mi"},
    }
    container["securityContext"] = {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        # With the rest, what the Pod Security "restricted" profile asks of a container.
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    return container


def _line_of(node: yaml.Node, path: _Path) -> int:
    """The 1-based line of ``path`` in the document, or of its deepest ancestor that exists."""
    return int(_node_at(node, path).start_mark.line) + 1


def _node_at(node: yaml.Node, path: _Path) -> yaml.Node:
    """The node of ``path`` in the document, or of its deepest ancestor that exists."""
    for step in path:
        child: yaml.Node | None = None
        if isinstance(step, str) and isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                # The last duplicate key wins, as it does when the document is constructed.
                if isinstance(key, yaml.ScalarNode) and key.value == step:
                    child = value
        elif (
            isinstance(step, int) and isinstance(node, yaml.SequenceNode) and step < len(node.value)
        ):
            child = node.value[step]
        if child is None:
            break
        node = child
    return node


def _dotted(path: _Path) -> str:
    text = ""
    for step in path:
        text += f"[{step}]" if isinstance(step, int) else (f".{step}" if text else step)
    return text


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    names = {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
    }
    return names.get(type(value), f"a {type(value).__name__}")
