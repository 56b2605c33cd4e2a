"""`operator at N templates`: valid and invalid ImageTemplates applied at once; how fast
each gets its first condition, the operator's memory and idle CPU, and deleting them all."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from bench.builds import demo_template
from bench.env import Body, Cluster, Operator, Watcher, wait_until
from bench.report import Figure, Goal, percentile
from kiln.kube import TEMPLATES

P99_GOAL = 1.0  # seconds from creation to the first condition
RSS_GOAL = 256.0  # MiB, the most the operator uses
IDLE_CPU_GOAL = 0.01  # CPU seconds per second with every template present: no busy polling
CLIENTS = 8  # concurrent API clients creating or deleting


def templates(valid: int, invalid: int) -> list[Body]:
    """Copies of the demo template; the invalid ones have a schedule that is no cron
    expression the API server can tell (minute 61: admitted, then stalled as InvalidSpec)."""
    base = demo_template()
    out = []
    for i in range(valid + invalid):
        spec = dict(base["spec"])
        if i >= valid:
            spec["triggers"] = [{"kind": "Schedule", "schedule": "61 * * * *"}]
        kind = "valid" if i < valid else "invalid"
        body = {**base, "metadata": {"name": f"bench-{kind}-{i:05d}"}, "spec": spec}
        out.append(body)
    return out


class FirstConditions:
    """When each template was sent and when the watch first saw it with a condition."""

    def __init__(self) -> None:
        self.sent: dict[str, float] = {}
        self.first: dict[str, float] = {}
        self.stalled: set[str] = set()
        self.deleted: set[str] = set()

    def observe(self, kind: str, body: Body, now: float) -> None:
        name = body["metadata"]["name"]
        if kind == "DELETED":
            self.deleted.add(name)
            return
        conditions = (body.get("status") or {}).get("conditions") or []
        if conditions and name not in self.first:
            self.first[name] = now
        if any(c["type"] == "Stalled" and c["status"] == "True" for c in conditions):
            self.stalled.add(name)


class RssSampler(threading.Thread):
    """The operator's peak RSS while a phase runs."""

    def __init__(self, operator: Operator) -> None:
        super().__init__(daemon=True)
        self.operator = operator
        self.peak = operator.rss_mib()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.25):
            self.peak = max(self.peak, self.operator.rss_mib())

    def stop(self) -> float:
        self._done.set()
        self.join(5)
        return self.peak


def run(
    cluster: Cluster, operator: Operator, valid: int, invalid: int, idle_seconds: float
) -> list[Figure]:
    bodies = templates(valid, invalid)
    seen = FirstConditions()
    fresh = operator.rss_mib()
    sampler = RssSampler(operator)
    sampler.start()
    with Watcher(cluster, TEMPLATES, seen.observe) as watcher:

        def create(body: Body) -> None:
            seen.sent[body["metadata"]["name"]] = time.monotonic()
            cluster.create(TEMPLATES, body)

        applied = time.monotonic()
        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(create, bodies))
        timeout = 120 + len(bodies) * 0.5
        wait_until(lambda: len(seen.first) == len(bodies), timeout, "first conditions", watcher)
        all_conditioned = max(seen.first.values()) - applied
        during = sampler.stop()
        time.sleep(min(10.0, idle_seconds))  # let the last status writes settle
        cpu, requests = operator.cpu_seconds(), cluster.requests_total()
        time.sleep(idle_seconds)
        idle_cpu = operator.cpu_seconds() - cpu
        idle_requests = cluster.requests_total() - requests - 1  # our own first /metrics
        with_templates = operator.rss_mib()

        started = time.monotonic()
        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(lambda b: cluster.delete(TEMPLATES, b["metadata"]["name"]), bodies))
        wait_until(lambda: len(seen.deleted) == len(bodies), timeout, "deletions", watcher)
        deleted = time.monotonic() - started
    time.sleep(min(10.0, idle_seconds))
    after = operator.rss_mib()

    latencies = [seen.first[name] - sent for name, sent in seen.sent.items()]
    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    invalid_stalled = sum(1 for b in bodies[valid:] if b["metadata"]["name"] in seen.stalled)
    if invalid_stalled != invalid:
        raise RuntimeError(f"only {invalid_stalled} of {invalid} invalid templates stalled")
    cpu_rate = idle_cpu / idle_seconds
    return [
        Figure(
            name=f"operator at {valid:,} templates",
            parts=[
                f"first condition p50 {p50:.2f} s",
                f"p99 {p99:.2f} s",
                f"all {all_conditioned:.1f} s",
                f"rss fresh {fresh:.0f} MiB",
                f"during {during:.0f} MiB",
                f"idle {with_templates:.0f} MiB",
                f"after delete {after:.0f} MiB",
                f"idle cpu {idle_cpu:.2f} s in {idle_seconds:.0f} s",
                f"idle api {idle_requests * 60 / idle_seconds:.0f} req/min",
                f"delete all {deleted:.1f} s",
            ],
            goals=[
                Goal(what="first condition p99 s", value=p99, limit=P99_GOAL),
                Goal(what="peak rss MiB", value=max(during, with_templates), limit=RSS_GOAL),
                Goal(what="idle cpu s/s", value=cpu_rate, limit=IDLE_CPU_GOAL),
            ],
            raw={
                "valid": valid,
                "invalid": invalid,
                "latencies_s": sorted(latencies),
                "rss_mib": {
                    "fresh": fresh,
                    "during": during,
                    "idle": with_templates,
                    "after_delete": after,
                },
                "idle_cpu_s": idle_cpu,
                "idle_seconds": idle_seconds,
                "idle_requests": idle_requests,
                "all_conditioned_s": all_conditioned,
                "delete_all_s": deleted,
            },
        )
    ]
