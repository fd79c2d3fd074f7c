"""Metric names and the router's observations, without sockets: the naming rule
(``xds:`` prefix, counters exposed with ``_total``, durations in ``_seconds``), every family the
services declare obeys it, and ``RouterMetrics`` counts TTFT / TPOT / tokens / finishes / replays
from the core's own effects exactly once per request."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.common import metrics as m
from services.model.config import EOS_ID
from services.model.sampling import SamplingParams
from services.pod.prometheus import compose_targets, scrape_config
from services.pod.spec import COMPOSE_PORTS, address, bind_address, pod_from_mapping, services
from services.router.core import RouterConfig, RouterCore
from services.router.metrics import RouterMetrics
from services.attention.metrics import AttentionMetrics

PROMPT = (256, 72, 105)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def families() -> dict:
    return {f.name: f for f in text_string_to_metric_families(m.exposition().decode())}


def sample(name: str, **labels: str) -> float:
    for f in text_string_to_metric_families(m.exposition().decode()):
        for s in f.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return 0.0


@pytest.mark.parametrize("name,kind", [
    ("time_to_first_token_seconds", "histogram"),    # no prefix
    ("xds:", "gauge"),
    ("xds:prompt_tokens_total", "counter"),           # prometheus_client adds _total itself
    ("xds:kv_blocks_total", "gauge"),                 # _total is for counters only
    ("xds:step_ms", "histogram"), ("xds:added_latency_us", "gauge"),  # durations in seconds
])
def test_naming_rule_refuses_with_what_to_change(name: str, kind: str) -> None:
    with pytest.raises(m.MetricNameError):
        m.check_name(name, kind)


def test_names_that_look_like_units_but_are_not_pass() -> None:
    m.check_name("xds:decode_kv_blocks_used", "gauge")   # "_used" is not "_us"
    m.check_name("xds:request_success", "counter")


def test_every_declared_family_obeys_the_rule_and_counters_end_in_total() -> None:
    RouterMetrics(RouterCore())
    AttentionMetrics(type("D", (), {"stats": {"retries": 0, "rank_failures": 0}})())
    m.peer_state("decode-0", "alive")
    fams = families()
    ours = {n: f for n, f in fams.items() if n.startswith("xds:")}
    assert {"xds:time_to_first_token_seconds", "xds:time_per_output_token_seconds", "xds:e2e_request_latency_seconds",
            "xds:prompt_tokens", "xds:generation_tokens", "xds:request_success", "xds:num_requests_running",
            "xds:num_requests_waiting", "xds:attention_a2e_seconds", "xds:peer_state"} <= set(ours)
    for name, f in ours.items():
        for s in f.samples:
            if f.type == "counter":
                assert s.name in (name + "_total", name + "_created"), s.name
            if f.type == "histogram":
                assert name.endswith("_seconds")
    ttft = m._made["xds:time_to_first_token_seconds"]
    assert tuple(ttft._upper_bounds[:-1]) == m.TTFT_BUCKETS and m.TTFT_BUCKETS[0] == 0.001 and m.TTFT_BUCKETS[-1] == 2560.0


def test_a_name_declared_twice_as_another_kind_is_refused() -> None:
    m.counter("xds:unit_test_things", "d")
    assert m.counter("xds:unit_test_things", "d") is m.counter("xds:unit_test_things", "d")
    with pytest.raises(m.MetricNameError):
        m.gauge("xds:unit_test_things", "d")


def test_router_metrics_count_each_request_once_from_the_cores_effects() -> None:
    core, clock = RouterCore(RouterConfig()), Clock()
    core.observe_beat("prefill-0", "prefill", -1, "e0", "serving", {"running": 0}, 0.0)
    core.observe_beat("decode-0", "decode", 0, "e1", "serving", {"running": 0, "free_kv_blocks": 100}, 0.0)
    rm = RouterMetrics(core, clock)
    base = {k: sample(k) for k in ("xds:time_to_first_token_seconds_count", "xds:prompt_tokens_total",
                                   "xds:generation_tokens_total", "xds:time_per_output_token_seconds_count",
                                   "xds:e2e_request_latency_seconds_count", "xds:request_replays_total")}
    stop = sample("xds:request_success_total", finished_reason="stop")
    core.open("r1", PROMPT, SamplingParams(max_tokens=8), 0.0)
    core.attach("r1")
    assert sample("xds:num_requests_waiting") == 1
    core.begin_prefill("r1", "prefill-0", 0.0)
    assert sample("xds:num_requests_running") == 1 and sample("xds:num_requests_waiting") == 0
    clock.t = 0.5
    rm.effects(core.prefill_done("r1", 10, 0.5))
    core.assign_decode("r1", "decode-0", 0.5)
    clock.t = 0.7
    rm.effects(core.on_tokens("r1", 1, (11, 12), "", "", "decode-0", 0.7))
    rm.effects(core.restart("r1", "decode-0 lost", 0.7))      # a replay: nothing counted twice
    core.begin_prefill("r1", "prefill-0", 0.8)
    clock.t = 1.0
    rm.effects(core.prefill_done("r1", 13, 1.0))
    core.assign_decode("r1", "decode-0", 1.0)
    clock.t = 1.2
    rm.effects(core.on_tokens("r1", 4, (EOS_ID,), "stop", "", "decode-0", 1.2))
    rm.effects(core.detach("r1", 1.3))                        # later wakes of a finished request count nothing
    got = {k: sample(k) - v for k, v in base.items()}
    assert got == {"xds:time_to_first_token_seconds_count": 1, "xds:prompt_tokens_total": len(PROMPT),
                   "xds:generation_tokens_total": 5, "xds:time_per_output_token_seconds_count": 3,
                   "xds:e2e_request_latency_seconds_count": 1, "xds:request_replays_total": 1}
    assert sample("xds:request_success_total", finished_reason="stop") - stop == 1
    assert sample("xds:time_to_first_token_seconds_bucket", le="0.5") >= 1   # 0.5 s exactly: in the 0.5 bucket


def test_metrics_addresses_local_and_compose_and_the_scrape_config() -> None:
    local = pod_from_mapping({"name": "m", "run_dir": "/tmp/xds-m"})
    assert all(address(local, s.name, "metrics") == "127.0.0.1:0" for s in services(local))
    compose = pod_from_mapping({"name": "m", "addressing": "compose"})
    assert address(compose, "router-0", "metrics") == f"router-0:{COMPOSE_PORTS['metrics']}"
    assert bind_address(compose, "router-0", "metrics") == f"0.0.0.0:{COMPOSE_PORTS['metrics']}"
    targets = compose_targets(compose)
    assert set(targets) == {s.name for s in services(compose)}
    import yaml
    cfg = yaml.safe_load(scrape_config(targets, interval_s=2))
    (job,) = cfg["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and cfg["global"]["scrape_interval"] == "2000ms"
    assert {c["labels"]["service"]: c["targets"][0] for c in job["static_configs"]}["fabric"] == "fabric:5103"
    with pytest.raises(ValueError):
        scrape_config({"x": "127.0.0.1:5/metrics"})
