"""The example configs and manifests shipped in config/ and deploy/ stay valid and current."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from proxy.config import parse
from proxy.inject import inject

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((ROOT / "config").glob("*.yaml")), ids=lambda p: p.name)
def test_example_config_is_valid(path: Path) -> None:
    assert parse(path.read_text(), str(path)).routes


def test_the_configmap_holds_a_valid_config() -> None:
    (config_map,) = yaml.safe_load_all((ROOT / "deploy" / "sidelink-config.yaml").read_text())
    assert parse(config_map["data"]["sidelink.yaml"], "sidelink-config").routes


def test_the_injected_example_is_what_inject_writes() -> None:
    source = (ROOT / "deploy" / "client-app.yaml").read_text()
    expected = (ROOT / "deploy" / "client-app-injected.yaml").read_text()
    assert inject(source, config_map="sidelink-config") == expected
