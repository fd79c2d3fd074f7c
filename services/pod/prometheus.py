"""Prometheus's scrape configuration for a pod: one job, one target per service, labelled
``service=<name>``, generated from the pod's addresses (never written by hand).

- ``xds up`` / tests: the URLs from the ready info (``Pod.ready_info()["metrics"]``: each
  service bound port 0, so only the running pod knows them).
- Compose (profile ``observability``): ``compose_targets(spec)``, the fixed metrics port of
  every service by name (``spec.address(..., "metrics")``); ``services/pod/compose.py`` puts the
  result in compose.yaml for the ``prometheus`` service.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping

import yaml

from services.pod.spec import PodSpec, address, services

JOB = "xds"


def compose_targets(spec: PodSpec) -> dict[str, str]:
    """Every service's /metrics URL as other containers reach it (compose addressing)."""
    return {s.name: f"http://{address(spec, s.name, 'metrics')}/metrics" for s in services(spec)}


def scrape_config(urls: Mapping[str, str], *, interval_s: float = 5.0) -> str:
    """prometheus.yml scraping ``urls`` (service name -> http://host:port/path)."""
    by_path: dict[str, list[dict]] = {}
    for name, url in sorted(urls.items()):
        u = urllib.parse.urlsplit(url)
        if u.scheme != "http" or not u.netloc:
            raise ValueError(f"metrics URL of {name} must be http://host:port/path, got {url!r}")
        by_path.setdefault(u.path or "/metrics", []).append({"targets": [u.netloc], "labels": {"service": name}})
    interval = f"{max(1, round(interval_s * 1000))}ms"
    cfg = {"global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
           "scrape_configs": [{"job_name": JOB if len(by_path) == 1 else f"{JOB}{i}", "metrics_path": path,
                               "static_configs": targets}
                              for i, (path, targets) in enumerate(sorted(by_path.items()))]}
    return yaml.safe_dump(cfg, sort_keys=False)
