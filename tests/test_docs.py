"""The docs against the code they document: every default in a config table is the schema's.

Config defaults have one source, ``nst_exp/config.py``; the README's short table and the manual's
full one (``docs/configuration.md``) are checked against it (and against the group choices in
``conf/config.yaml``), so they cannot drift apart.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from nst_exp.api import compose_config
from nst_exp.config import CONF_DIR, to_container

REPO = Path(__file__).resolve().parent.parent
TABLES = ["README.md", "docs/configuration.md"]


def config_table(doc: str) -> list[tuple[str, str]]:
    """(keys cell, default cell) of each row of ``doc``'s ``| key | default | meaning |`` table."""
    lines = (REPO / doc).read_text().splitlines()
    start = lines.index("| key | default | meaning |") + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        rows.append((cells[0], cells[1]))
    return rows


def split_values(cell: str) -> list[str]:
    """``1, 20`` / ``null / 1.0`` / ```[relu4_2]`, `[a, b]``` -> the values, brackets kept whole."""
    cell = re.sub(r"\([^)]*\)", "", cell).replace("`", "")
    values, depth, current = [], 0, ""
    for ch in cell:
        depth += ch == "["
        depth -= ch == "]"
        if ch in ",/" and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += ch
    return [v for v in [*values, current.strip()] if v]


def same(doc: str, value: object) -> bool:
    if isinstance(value, list):
        return doc == "[" + ", ".join(map(str, value)) + "]"
    if value is None:
        return doc == "null"
    if isinstance(value, bool):
        return doc == str(value).lower()
    if isinstance(value, (int, float)):
        try:
            return float(doc) == float(value)
        except ValueError:
            return False
    return doc == str(value)


def group_defaults() -> dict[str, str]:
    entries = yaml.safe_load((CONF_DIR / "config.yaml").read_text())["defaults"]
    return {k: v for e in entries if isinstance(e, dict) for k, v in e.items()}


@pytest.mark.parametrize("doc", TABLES)
def test_config_table_defaults_are_the_schemas(doc):
    cfg = to_container(compose_config())
    groups = group_defaults()
    checked = 0
    for keys_cell, default_cell in config_table(doc):
        keys = re.findall(r"`([a-z_.]+=?)`", keys_cell)
        if not keys or keys[0].startswith("hydra.") or default_cell == "bundled images":
            continue
        values = split_values(default_cell)
        if len(values) == 1:
            values = values * len(keys)
        assert len(values) == len(keys), f"{doc} row {keys_cell!r}: {len(keys)} keys, {len(values)} defaults"
        for key, doc in zip(keys, values):
            if key.endswith("="):
                actual: object = groups[key[:-1]]
            else:
                actual = cfg
                for part in key.split("."):
                    actual = actual[part]
            assert same(doc, actual), f"{doc} says {key} defaults to {doc!r}; the schema (nst_exp/config.py) says {actual!r}"
            checked += 1
    assert checked >= 25  # the table was found and read


def test_the_two_tables_list_the_same_keys():
    """The README's short table and the manual's full one name the same keys, row by row."""
    assert [k for k, _ in config_table("README.md")] == [k for k, _ in config_table("docs/configuration.md")]
