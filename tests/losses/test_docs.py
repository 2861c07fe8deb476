"""docs/losses.md cannot drift from the registry: every registered loss and miner is listed,
in its family's section and under its class name, and nothing else is."""

from __future__ import annotations

import re

from losses.registry import LOSSES, MINERS
from tests.conftest import REPO

#: A section heading names the module of the family: ``## Regression — `losses/regression.py```.
SECTION = re.compile(r"^## .*`losses/(\w+)\.py`")
ROW = re.compile(r"^\| `([a-z0-9-]+)` \| `([^`]+)` \|")


def _documented() -> dict[str, dict[str, str]]:
    """``{module: {registry name: class cell}}`` from the tables of docs/losses.md."""
    out: dict[str, dict[str, str]] = {}
    module = None
    for line in (REPO / "docs" / "losses.md").read_text(encoding="utf-8").splitlines():
        if (m := SECTION.match(line)) is not None:
            module = m.group(1)
            out[module] = {}
        elif line.startswith("## "):
            module = None
        elif module is not None and (m := ROW.match(line)) is not None:
            assert m.group(1) not in out[module], f"{m.group(1)} listed twice"
            out[module][m.group(1)] = m.group(2)
    return out


def test_every_registered_loss_is_documented_in_its_family_and_nothing_else():
    documented = _documented()
    listed = {
        name: (module, cls)
        for module, rows in documented.items()
        if module != "miners"
        for name, cls in rows.items()
    }
    assert set(listed) == set(LOSSES)
    for name, (_, cls) in LOSSES.items():
        module, cell = listed[name]
        assert cls.__module__ == f"losses.{module}", name
        assert cell == cls.__name__, name


def test_every_registered_miner_is_documented_and_nothing_else():
    assert set(_documented()["miners"]) == set(MINERS)
