from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from services.common.config import ConfigError, from_mapping, load_yaml, to_mapping


@dataclass(frozen=True, slots=True)
class Link:
    bandwidth_gbps: float = 100.0
    latency_us: float = 1.0


@dataclass(frozen=True, slots=True)
class Svc:
    name: str
    interval_s: float = 0.5
    ranks: tuple[int, ...] = ()
    mode: Literal["shm", "tcp"] = "shm"
    link: Link = field(default_factory=Link)
    port: int | None = None


def test_builds_nested_frozen_config_and_round_trips() -> None:
    cfg = from_mapping(Svc, {"name": "a", "interval_s": 1, "ranks": [1, 2], "link": {"latency_us": 2}})
    assert cfg == Svc("a", 1.0, (1, 2), "shm", Link(100.0, 2.0))
    assert from_mapping(Svc, to_mapping(cfg)) == cfg
    with pytest.raises(AttributeError):
        cfg.name = "b"  # type: ignore[misc]


@pytest.mark.parametrize("data, path", [
    ({"name": "a", "intervl_s": 1}, "Svc.intervl_s"),
    ({"name": "a", "link": {"bandwith_gbps": 1}}, "Svc.link.bandwith_gbps"),
    ({"name": "a", "interval_s": "fast"}, "Svc.interval_s"),
    ({"name": "a", "ranks": [1, "x"]}, "Svc.ranks[1]"),
    ({"name": "a", "mode": "rdma"}, "Svc.mode"),
    ({"name": "a", "port": True}, "Svc.port"),
    ({}, "Svc.name"),
])
def test_errors_name_the_setting(data, path) -> None:
    with pytest.raises(ConfigError) as exc:
        from_mapping(Svc, data)
    assert exc.value.path == path and path in str(exc.value)


def test_yaml_loading(tmp_path) -> None:
    f = tmp_path / "svc.yaml"
    f.write_text("name: x\nlink:\n  bandwidth_gbps: 400\n")
    assert load_yaml(Svc, f).link.bandwidth_gbps == 400.0
    f.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(Svc, f)


@dataclass(frozen=True, slots=True)
class Pair:
    span: tuple[int, str] = (0, "")


def test_fixed_length_tuples_coerce_each_item_by_its_own_type() -> None:
    assert from_mapping(Pair, {"span": [3, "x"]}).span == (3, "x")
    with pytest.raises(ConfigError, match=r"Pair.span\[1\]: expected a string"):
        from_mapping(Pair, {"span": [3, 4]})
    with pytest.raises(ConfigError, match="expected 2 items"):
        from_mapping(Pair, {"span": [3]})
