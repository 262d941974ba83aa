"""Addresses: host:port parsing and formatting, IP and loopback checks."""

from __future__ import annotations

import ipaddress

Address = tuple[str, int]


def split_host_port(text: str, default_port: int | None = None) -> Address:
    """``1.2.3.4:53``, ``[::1]:53``, ``1.2.3.4`` (with a default port); raises ValueError."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError("unbalanced [")
        port_text = rest[1:] if rest.startswith(":") else None
        if rest and port_text is None:
            raise ValueError("expected :PORT after ]")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, None
    ipaddress.ip_address(host)
    if port_text is None:
        if default_port is None:
            raise ValueError("a port is required")
        return host, default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port must be 0..65535, got {port_text}")
    return host, int(port_text)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
