"""``sidelink inject``: add the sidelink container to every pod template in Kubernetes YAML.

The input may hold many documents and ``kind: List`` objects. Each pod template found gets one
container named ``sidelink``: by default a native sidecar (first in ``initContainers`` with
``restartPolicy: Always``, which needs Kubernetes 1.29 or later), or with ``classic=True`` a
regular container appended to ``containers``. Every other object passes through unchanged, and
the documents come out in the order they went in.

Injecting is idempotent: an existing ``sidelink`` container is replaced in place by a freshly
generated one (or moved, if it sits in the other list), so running the command again, or again
with different options, leaves exactly one.

The routes are checked as ``sidelink run`` checks them, so a sidecar that could not start is
refused rather than written: quick routes must parse, and either some route or a ConfigMap
must be given (a ConfigMap in the same input is validated too, with the quick routes).

The output is re-serialised YAML: key order and values are kept, but comments, quoting style
and anchors of the input are not.
"""

from __future__ import annotations

import copy
import posixpath
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from proxy import __version__
from proxy.config import (
    CONFIG_MAP_KEY,
    DEFAULT_CONFIG_PATH,
    ROUTES_ENV,
    AdminConfig,
    ConfigError,
    parse,
)

DEFAULT_IMAGE = "ghcr.io/sidelink/sidelink:" + __version__

CONTAINER_NAME = "sidelink"
CONFIG_VOLUME = "sidelink-config"
ADMIN_PORT_NAME = "sidelink-admin"
# The proxy reads DEFAULT_CONFIG_PATH when no --config is given, so mounting the ConfigMap
# on its directory means the pod needs no extra argument; the ConfigMap must hold that key.
CONFIG_MOUNT_PATH = posixpath.dirname(DEFAULT_CONFIG_PATH)
ADMIN_PORT = AdminConfig().port

_POD_SPEC_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": ("spec",),
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "ReplicationController": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
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


class InjectError(ValueError):
    """Input that cannot be injected; the message names the source, line and document."""


# Builds (does not raise) the error for a path inside one pod spec, so callers stay explicit.
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
    checks them when it starts. ``config_map`` names a ConfigMap holding ``sidelink.yaml``,
    mounted read-only where the proxy looks by default. ``source`` only labels error messages.

    Raises :class:`InjectError` for routes the proxy would refuse, no routes and no ConfigMap
    (the sidecar could not start), invalid YAML, a document that is not a mapping, or a pod
    template that is malformed.
    """
    # A bare string is a Sequence[str] too, and would silently become one route per character.
    if isinstance(routes, str):
        raise TypeError("routes must be a sequence of route specs, not a single string")
    if config_map is not None and not config_map:
        raise ValueError("config_map must be a ConfigMap name, got an empty string")
    options = _Options(tuple(routes), config_map, image, classic)

    loaded = _load(text, source)
    _check_routes(options, [data for _, data in loaded], source)
    documents: list[Any] = []
    report: list[str] = []
    for doc, data in loaded:
        if data is None:
            continue
        _inject_object(data, doc, (), options, report)
        documents.append(data)
    out = yaml.safe_dump_all(documents, sort_keys=False, allow_unicode=True, width=float("inf"))
    return Injection(out, tuple(report))


def _check_routes(options: _Options, documents: list[Any], source: str) -> None:
    """Refuse what `sidelink run` in the sidecar would refuse: it exits 2, the pod crash-loops."""
    config_text = None
    if options.config_map is not None:
        # A ConfigMap in the same input is checked with the routes; one elsewhere cannot be.
        for data in _objects(documents):
            metadata = data.get("metadata")
            if (
                data.get("kind") == "ConfigMap"
                and isinstance(metadata, dict)
                and metadata.get("name") == options.config_map
            ):
                held = data.get("data")
                value = held.get(CONFIG_MAP_KEY) if isinstance(held, dict) else None
                if not isinstance(value, str):
                    raise InjectError(
                        f"{source}: ConfigMap {options.config_map} has no data.{CONFIG_MAP_KEY}, "
                        f"which the sidecar reads as {DEFAULT_CONFIG_PATH}"
                    )
                config_text = value
    elif not options.routes:
        raise InjectError(
            "no routes: give --route SPEC (repeatable) or --config-map NAME; "
            "a sidecar without routes cannot start"
        )
    label = "<none>"
    if config_text is not None:
        label = f"{source}: ConfigMap {options.config_map} data.{CONFIG_MAP_KEY}"
    try:
        config = parse(config_text, label, options.routes, "--route")
    except ConfigError as e:
        raise InjectError("\n".join(e.problems)) from None
    if config_text is not None and not config.routes:
        raise InjectError(
            f"{label}: no routes, and no --route SPEC adds one; "
            "a sidecar without routes cannot start"
        )


def _objects(documents: list[Any]) -> list[dict[str, Any]]:
    """Every object, the items of ``kind: List`` included."""
    out: list[dict[str, Any]] = []
    for data in documents:
        if isinstance(data, dict):
            out.append(data)
            if data.get("kind") == "List" and isinstance(data.get("items"), list):
                out += _objects(data["items"])
    return out


@dataclass(frozen=True, slots=True)
class _Options:
    routes: tuple[str, ...]
    config_map: str | None
    image: str
    classic: bool


def _load(text: str, source: str) -> list[tuple[_Document, Any]]:
    """Every document with its node tree, kept so that later errors can name a line."""
    loader = _Loader(text)
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
    obj: Any, doc: _Document, base: _Path, options: _Options, report: list[str]
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
            _inject_object(item, doc, (*base, "items", i), options, report)
        return
    spec_path = _POD_SPEC_PATHS.get(kind)
    if spec_path is None:
        report.append(f"{_object_name(obj, kind)}: skipped")
        return
    before = copy.deepcopy(obj)
    spec: Any = obj
    for depth, key in enumerate(spec_path):
        child = spec.get(key)
        if not isinstance(child, dict):
            problem = (
                "is missing" if child is None else f"must be a mapping, got {_type_name(child)}"
            )
            raise doc.error(obj, base, spec_path[: depth + 1], problem)
        spec = child
    had = _has_sidecar(spec)
    _inject_pod_spec(spec, options, lambda path, msg: doc.error(obj, base, spec_path + path, msg))
    done = "unchanged" if obj == before else ("updated" if had else "injected")
    report.append(f"{_object_name(obj, kind)}: {done}")


def _object_name(obj: dict[str, Any], kind: str) -> str:
    """``deployment/web``, as kubectl names objects."""
    metadata = obj.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    return f"{kind.lower()}/{name if isinstance(name, str) else '(unnamed)'}"


def _has_sidecar(spec: dict[str, Any]) -> bool:
    return any(
        isinstance(c, dict) and c.get("name") == CONTAINER_NAME
        for key in ("containers", "initContainers")
        if isinstance(spec.get(key), list)
        for c in spec[key]
    )


def _inject_pod_spec(spec: dict[str, Any], options: _Options, error: _ErrorAt) -> None:
    containers = _container_list(spec, "containers", error, required=True)
    init_containers = _container_list(spec, "initContainers", error, required=False)
    fresh = _sidecar(options)

    if options.classic:
        target, other, other_key = containers, init_containers, "initContainers"
    else:
        target, other, other_key = init_containers, containers, "containers"

    kept = [c for c in other if c.get("name") != CONTAINER_NAME]
    if len(kept) != len(other):
        other[:] = kept
        # Only our container was there, so the key is ours too: dropping it makes switching
        # modes give the same output as injecting the original in that mode.
        if not kept and other_key == "initContainers":
            del spec[other_key]

    existing = [i for i, c in enumerate(target) if c.get("name") == CONTAINER_NAME]
    if existing:
        target[existing[0]] = fresh
        for i in reversed(existing[1:]):
            del target[i]
    elif options.classic:
        target.append(fresh)
    else:
        # First, so the kubelet starts the proxy (and waits for its startup probe) before any
        # other init container, which may already need to reach a service through it.
        target.insert(0, fresh)
        spec["initContainers"] = target

    _set_config_volume(spec, options, error)


def _container_list(
    spec: dict[str, Any], key: str, error: _ErrorAt, *, required: bool
) -> list[Any]:
    value = spec.get(key)
    if value is None:
        if required:
            raise error((key,), "is missing")
        return []
    if not isinstance(value, list):
        raise error((key,), f"must be a list, got {_type_name(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise error((key, i), f"must be a mapping (a container), got {_type_name(item)}")
    return value


def _set_config_volume(spec: dict[str, Any], options: _Options, error: _ErrorAt) -> None:
    volumes = spec.get("volumes")
    if volumes is None:
        volumes = []
    elif not isinstance(volumes, list):
        raise error(("volumes",), f"must be a list, got {_type_name(volumes)}")
    ours = [
        i for i, v in enumerate(volumes) if isinstance(v, dict) and v.get("name") == CONFIG_VOLUME
    ]

    if options.config_map is not None:
        volume = {"name": CONFIG_VOLUME, "configMap": {"name": options.config_map}}
        if ours:
            volumes[ours[0]] = volume
            for i in reversed(ours[1:]):
                del volumes[i]
        else:
            volumes.append(volume)
        spec["volumes"] = volumes
        return

    # Re-injecting without --config-map regenerates the container without the mount; drop the
    # volume we added earlier unless some other container has come to rely on it.
    if not ours or _volume_mounted_elsewhere(spec, CONFIG_VOLUME):
        return
    for i in reversed(ours):
        del volumes[i]
    if not volumes:
        del spec["volumes"]


def _volume_mounted_elsewhere(spec: dict[str, Any], volume: str) -> bool:
    for key in ("containers", "initContainers", "ephemeralContainers"):
        listed = spec.get(key)
        if not isinstance(listed, list):
            continue
        for container in listed:
            if not isinstance(container, dict) or container.get("name") == CONTAINER_NAME:
                continue
            mounts = container.get("volumeMounts")
            if isinstance(mounts, list) and any(
                isinstance(m, dict) and m.get("name") == volume for m in mounts
            ):
                return True
    return False


def _sidecar(options: _Options) -> dict[str, Any]:
    """A new container every call: shared sub-objects would be dumped as YAML anchors."""
    container: dict[str, Any] = {"name": CONTAINER_NAME, "image": options.image}
    if not options.classic:
        container["restartPolicy"] = "Always"
    container["args"] = ["run"]
    if options.routes:
        container["env"] = [{"name": ROUTES_ENV, "value": ",".join(options.routes)}]
    container["ports"] = [{"name": ADMIN_PORT_NAME, "containerPort": ADMIN_PORT}]
    if options.config_map is not None:
        container["volumeMounts"] = [
            {"name": CONFIG_VOLUME, "mountPath": CONFIG_MOUNT_PATH, "readOnly": True}
        ]
    container["startupProbe"] = {
        # For a native sidecar the kubelet holds back the app until this passes, so the app's
        # first outbound call already finds the proxy listening.
        "httpGet": {"path": "/healthz", "port": ADMIN_PORT},
        "periodSeconds": 1,
        "failureThreshold": 30,
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
    }
    return container


def _line_of(node: yaml.Node, path: _Path) -> int:
    """The 1-based line of ``path`` in the document, or of its deepest ancestor that exists."""
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
    return int(node.start_mark.line) + 1


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
