"""`pacflow bench policy-push`: time from Publish until every subscriber holds the new version.

Ours: a real `PolicyServer` on loopback in the driver; a publisher process (the learner's role)
calls `policies.client.publish`; S subscriber processes each run a `PolicySubscriber`, which
receives the version while the server receives and stores it, checks the sha256 and every
tensor (finite values; names and shapes against the held version) and holds it once the server
says it is stored. Three ways: streamed (data parts over gRPC, each subscriber its own copy),
with local_read (the server's file through the shared page cache, what a subscriber on the
server's host gets), and through a relay (a `PolicyRelay` process takes one streamed copy into
its own files, which the subscribers read: what a run's collectors on another node get, one
copy per node). Each subscriber waits in `wait_for_version` on a thread armed before the
publish and stamps `time.time()` when it returns; the case time is the last stamp minus the
publisher's stamp just before Publish (one machine, one clock, no Ray RPC inside the interval).

Baseline, in the same run and processes: the publisher `ray.put`s the same safetensors bytes and
calls every subscriber with the ref; each `ray.get`s it and runs the same checks (sha256, decode)
before holding it. Case time: put start until the last subscriber holds it; this includes one
Ray actor call per subscriber, the way a Ray broadcast would tell them.

Each way (streamed, local read, relay, Ray) publishes WARMUP_VERSIONS untimed versions, then
`repeats` timed versions; medians are reported. Ratio = baseline seconds / ours (higher is
better; 1.0 = as fast as Ray's object store).
A case whose estimated peak memory does not fit the machine is recorded as skipped, not run.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import tempfile
from pathlib import Path

import psutil
import ray

from cluster.bench import machine
from cluster.bench_push_workers import PublisherWorker, RelayWorker, SubscriberWorker, \
    release_memory
from policies.server import PolicyServer
from policies.store import CACHED_VERSIONS

log = logging.getLogger(__name__)

SIZES = (1_000_000, 10_000_000, 100_000_000)  # float32 parameters per snapshot
SUBSCRIBERS = (4, 16)
REPEATS = 5  # timed versions per case and way, after the warm-up versions
# Untimed versions first, per way: the server's cache of versions fills and pushes one out,
# so each timed publish writes into the pages an evicted version gave back, as in a long run
# (a fresh page costs several times a reused one here); the same for Ray, whose first gets
# also take fresh pages.
WARMUP_VERSIONS = CACHED_VERSIONS + 1
# Memory one subscriber process adds while taking versions, in snapshot sizes: the held
# version and the one arriving (one buffer each, tensors are views into it), plus gRPC's and the
# allocator's slack: 2.02-2.09 measured for 100M parameters in a plain process; in Ray workers on
# 2 cores single subscribers reached 2.8, but not all at once. The baseline's subscriber drops
# its held version first and then holds the got bytes and their decoded copy: also 2.
SUBSCRIBER_PEAK_FACTOR = 2.1
LOCAL_PEAK_FACTOR = 0.5  # local_read: the pages are the server's page cache, shared
LOCAL_METRIC = "seconds_until_all_hold_local_read"
RELAY_METRIC = "seconds_until_all_hold_relay"
DRIVER_FACTOR = 4.0  # server (receive buffer, cached versions' frames), publisher (its weights
#                      and one snapshot) and Ray's object store. Measured: 100M x 16 (both ways
#                      and Ray) took at most 14 GB more than the machine used before it, 35
#                      snapshots, against (2.1 x 16 + 4) = 37.6 here
SAFETY_BYTES = 1 << 30  # left free for whatever else shares the machine


def _check_held(held: list[dict], version: int, sha256: str, what: str) -> None:
    wrong = [h for h in held if "error" in h or h["version"] != version or h["sha256"] != sha256]
    if wrong:
        raise RuntimeError(f"{what}: {len(wrong)} of {len(held)} subscribers do not hold "
                           f"v{version}: {wrong[0]}")


def _time_ours(publisher, subscribers: list, address: str, version: int,
               local_read: bool) -> dict:
    ray.get([s.arm.remote(version) for s in subscribers])
    sent = ray.get(publisher.publish.remote(address, version))
    held = ray.get([s.held.remote() for s in subscribers])
    _check_held(held, version, sent["sha256"], "policy push")
    if any(h["local_read"] != local_read for h in held):  # a fallback would mislabel the case
        raise RuntimeError(f"policy push: a subscriber's local_read is not {local_read}")
    stamps = [h["held_at"] - sent["start"] for h in held]
    return {"all_s": max(stamps), "first_s": min(stamps),
            "publish_s": sent["returned"] - sent["start"],
            "peak_growth": max(h["peak_growth"] for h in held),
            "peak_over_base": max(h["peak_over_base"] for h in held)}


def _time_ray(publisher, subscribers: list, version: int) -> dict:
    sent = ray.get(publisher.broadcast.remote(subscribers, version))
    _check_held(sent["held"], version, sent["sha256"], "ray broadcast")
    stamps = [h["held_at"] - sent["start"] for h in sent["held"]]
    return {"all_s": max(stamps), "put_s": sent["put_done"] - sent["start"],
            "get_s": max(h["get_s"] for h in sent["held"]),
            "check_s": max(h["check_s"] for h in sent["held"]),
            "peak_growth": max(h["peak_growth"] for h in sent["held"])}


def _median(samples: list[dict], key: str) -> float:
    return statistics.median(s[key] for s in samples)


def bench_case(publisher, subscribers: list, num_bytes: int, repeats: int,
               directory: Path, local_only: bool = False, relay=None) -> dict:
    """Ours, streamed (data parts, one copy per subscriber), read locally (local_read: the
    server's file through the shared page cache, what a subscriber on the server's host gets)
    and through `relay` (a RelayWorker: one streamed copy into its files, which the
    subscribers read), then the baseline, for one (size, subscriber count); `local_only`: the
    local read alone (no streamed push, no relay, no baseline)."""
    server = PolicyServer(directory, host="127.0.0.1", port=0)
    address = server.start()
    runs, version, per_way = {}, 1, WARMUP_VERSIONS + repeats
    try:
        for mode in ("local",) if local_only else ("stream", "local", "relay"):
            source = ray.get(relay.start.remote(address, str(directory / "relay"))) \
                if mode == "relay" else address
            ray.get([s.subscribe.remote(source, mode != "stream") for s in subscribers])
            runs[mode] = [_time_ours(publisher, subscribers, address, v, mode != "stream")
                          for v in range(version, version + per_way)]
            ray.get([s.release.remote() for s in subscribers])  # frees the held versions
            if mode == "relay":
                ray.get(relay.stop.remote())
            version += per_way
        base = [_time_ray(publisher, subscribers, v)
                for v in range(version, version + per_way)] if not local_only else []
        ray.get([s.release.remote() for s in subscribers])
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)  # every version published, on disk
        del server
        release_memory()
    w = WARMUP_VERSIONS
    return {"ours": runs.get("stream", [])[w:], "local": runs["local"][w:],
            "relay": runs.get("relay", [])[w:], "base": base[w:],
            "bytes": num_bytes, "subscribers": len(subscribers)}


def push_results(case: str, r: dict) -> list[dict]:
    """The DESIGN §6 rows for one case: latency and delivered bandwidth of the streamed push,
    and latency of the local read, each against Ray."""
    ours_s, base_s = _median(r["ours"], "all_s"), _median(r["base"], "all_s")
    delivered_gb = r["bytes"] * r["subscribers"] / 1e9
    detail = {
        "bytes": r["bytes"], "subscribers": r["subscribers"], "repeats": len(r["ours"]),
        "verified_subscribers": r["subscribers"],  # every repeat checked version and sha256
        "ours_samples_s": [s["all_s"] for s in r["ours"]],
        "baseline_samples_s": [s["all_s"] for s in r["base"]],
        "ours_publish_rpc_s": _median(r["ours"], "publish_s"),
        "ours_first_subscriber_s": _median(r["ours"], "first_s"),
        "baseline_put_s": _median(r["base"], "put_s"),
        "baseline_slowest_get_s": _median(r["base"], "get_s"),  # ray.get, per subscriber
        "baseline_slowest_check_s": _median(r["base"], "check_s"),  # sha256 + decode
        # The largest subscriber's peak RSS while it took a version, over its RSS before the
        # case's first version (so: every version it held, buffers, gRPC's), in snapshots.
        "subscriber_peak_over_snapshot": max(s["peak_over_base"] for s in r["ours"]) / r["bytes"],
        # Peak RSS growth while taking one version, over the RSS just before (ours then holds
        # the previous version and its spare buffer; the baseline holds nothing). Mapped file
        # and object store pages a process touches count in its RSS, though they are shared.
        "subscriber_peak_growth_bytes": max(s["peak_growth"] for s in r["ours"]),
        "baseline_subscriber_peak_growth_bytes": max(s["peak_growth"] for s in r["base"]),
    }
    return [
        {"case": case, "metric": "seconds_until_all_hold", "value": ours_s, "unit": "s",
         "baseline": base_s, "ratio": base_s / ours_s, "detail": detail},
        {"case": case, "metric": "delivered_gb_per_s", "value": delivered_gb / ours_s,
         "unit": "GB/s", "baseline": delivered_gb / base_s, "ratio": base_s / ours_s},
        local_row(case, r, base_s),
        local_row(case, r, base_s, "relay"),
    ]


def local_row(case: str, r: dict, base_s: float | None, way: str = "local") -> dict:
    """The latency row of the local read ("local": the server's files, a subscriber on its
    host) or of the relay ("relay": one streamed subscription into a relay's files, which the
    subscribers read: another host's subscribers behind their host's relay), against Ray when
    the baseline ran."""
    runs = r[way]
    seconds = _median(runs, "all_s")
    return {"case": case, "metric": LOCAL_METRIC if way == "local" else RELAY_METRIC,
            "value": seconds, "unit": "s", "baseline": base_s,
            "ratio": base_s / seconds if base_s else None,
            "detail": {"bytes": r["bytes"], "subscribers": r["subscribers"],
                       f"{way}_samples_s": [s["all_s"] for s in runs],
                       f"{way}_publish_rpc_s": _median(runs, "publish_s"),
                       f"{way}_subscriber_peak_growth_bytes":
                           max(s["peak_growth"] for s in runs)}}


def _label(num_params: int) -> str:
    return f"{num_params / 1e6:g}M" if num_params >= 1_000_000 else f"{num_params / 1e3:g}k"


def _memory_shortfall(num_bytes: int, num_subscribers: int,
                      per_subscriber: float = SUBSCRIBER_PEAK_FACTOR) -> str | None:
    need = (per_subscriber * num_subscribers + DRIVER_FACTOR) * num_bytes
    available = psutil.virtual_memory().available
    if need > available - SAFETY_BYTES:
        return f"needs ~{need / 1e9:.1f} GB, {available / 1e9:.1f} GB available"
    return None


def _skipped_row(case: str, reason: str, metric: str = "seconds_until_all_hold") -> dict:
    return {"case": case, "metric": metric, "value": None, "unit": "s",
            "baseline": None, "ratio": None, "detail": {"skipped": reason}}


def run_push_bench(json_path: str | None, sizes: tuple[int, ...] = SIZES,
                   subscribers: tuple[int, ...] = SUBSCRIBERS, repeats: int = REPEATS) -> dict:
    """Runs every (size, subscriber count) case; writes the DESIGN §6 JSON to `json_path`.

    Args:
        sizes: float32 parameters per snapshot (4 bytes each, plus a small safetensors header).
        subscribers: subscriber process counts.
        repeats: timed versions per case and way, after WARMUP_VERSIONS untimed ones.
    """
    largest = 4 * max(sizes)
    ray.init(num_cpus=psutil.cpu_count(), include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING, object_store_memory=max(3 * largest, 256 << 20))
    results = []
    try:
        publisher = ray.remote(num_cpus=0)(PublisherWorker).remote()
        workers = [ray.remote(num_cpus=0)(SubscriberWorker).remote(i)
                   for i in range(max(subscribers))]
        relay = ray.remote(num_cpus=0)(RelayWorker).remote()
        with tempfile.TemporaryDirectory(prefix="pacflow-bench-push-") as tmp:
            for num_params in sorted(sizes, reverse=True):  # largest first, while most is free
                num_bytes = ray.get(publisher.prepare.remote(num_params))
                for count in subscribers:
                    case = f"params={_label(num_params)},subscribers={count}"
                    folder = Path(tmp) / case.replace(",", "_").replace("=", "-")
                    shortfall = _memory_shortfall(num_bytes, count)
                    if not shortfall:
                        r = bench_case(publisher, workers[:count], num_bytes, repeats, folder,
                                       relay=relay)
                        results += push_results(case, r)
                        continue
                    log.warning("streamed push and Ray baseline of %s: %s", case, shortfall)
                    results.append(_skipped_row(case, shortfall))
                    shortfall = _memory_shortfall(num_bytes, count, LOCAL_PEAK_FACTOR)
                    if shortfall:  # not even subscribers that share the server's pages fit
                        results.append(_skipped_row(case, shortfall, LOCAL_METRIC))
                        continue
                    r = bench_case(publisher, workers[:count], num_bytes, repeats, folder,
                                   local_only=True)
                    results.append(local_row(case, r, None))
    finally:
        ray.shutdown()
    report = {"benchmark": "policy-push", "machine": machine(), "results": results}
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=1))
    return report
