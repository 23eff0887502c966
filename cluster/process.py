"""What every long-lived process of a run shares: logging to node scratch shipped to run
storage, a Prometheus endpoint on its node's address announced as a file_sd target, and a
restart count."""

from __future__ import annotations

import atexit
import json
import logging
import socket
import threading
import time
import uuid
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer

from cluster.config import ClusterConfig
from replay.storage import Storage, run_id, scratch_dir


class ScrapeClock:
    """A collector with no samples that notes when each full scrape begins (registered first,
    so a scrape that began after a value was set reads it) and, through `start_metrics_server`,
    when its body has been sent: `final_scrape` lets a process end only once Prometheus has
    been sent its final counts (a process killed while a scrape's body is still being made
    loses that scrape). A scrape restricted to named metrics (`/metrics?name[]=...`, as the
    driver's live progress reads) does not count: this collector's own name is never among
    them."""

    NAME = "pacflow_scrape_clock"

    def __init__(self):
        self._scraped = threading.Condition()
        self._last = None  # time.monotonic() at the start of the newest sent scrape; None: never
        self._began = threading.local()  # in a request's thread: when its full scrape began

    def describe(self):
        return [GaugeMetricFamily(self.NAME, "never exported")]

    def collect(self):
        self._began.at = time.monotonic()
        return []

    def sent(self) -> None:
        """The request on this thread has written its whole body to the socket."""
        began, self._began.at = getattr(self._began, "at", None), None
        if began is not None:
            with self._scraped:
                self._last = began if self._last is None else max(self._last, began)
                self._scraped.notify_all()

    def final_scrape(self, timeout: float) -> bool:
        """Waits up to `timeout` s for a scrape that begins after this call and is sent, if
        something scraped this endpoint in the last `timeout` s (a scraper is at work; else
        returns at once); whether one came."""
        now = time.monotonic()
        with self._scraped:
            if self._last is None or now - self._last > timeout:
                return False
            return self._scraped.wait_for(lambda: self._last > now, timeout)


class _Sent:
    """A WSGI body that tells the clock once the server has written all of it (wsgiref asks
    for the next chunk only after writing the last one, and calls `close` at the end)."""

    def __init__(self, body, clock: ScrapeClock):
        self._body, self._clock, self._written = body, clock, False

    def __iter__(self):
        yield from self._body
        self._written = True

    def close(self) -> None:
        if self._written:  # not after a failed write
            self._clock.sent()


class _Quiet(WSGIRequestHandler):
    def log_message(self, format, *args):  # no line per scrape on stderr
        pass


def start_metrics_server(host: str, port: int, registry: CollectorRegistry,
                         clock: ScrapeClock | None = None) -> ThreadingWSGIServer:
    """prometheus_client's endpoint for `registry` on `host:port` (0: any free port), served
    by a daemon thread; with `clock`, each full scrape is noted once its body is sent."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    server_class = type("MetricsServer", (ThreadingWSGIServer,), {"address_family": family})
    metrics = make_wsgi_app(registry)

    def app(environ, start_response):
        body = metrics(environ, start_response)
        return body if clock is None else _Sent(body, clock)

    server = make_server(host, port, app, server_class, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def serve_metrics(run: str, name: str, host: str = "127.0.0.1") -> CollectorRegistry:
    """A Prometheus endpoint on a free port of `host` (the node's address on a multi-node
    run), announced as a file_sd target in `<run>/metrics/targets/<name>.json`. The registry's
    `scrape_clock` is its ScrapeClock."""
    registry = CollectorRegistry()
    registry.scrape_clock = ScrapeClock()
    registry.register(registry.scrape_clock)
    server = start_metrics_server(host, 0, registry, registry.scrape_clock)
    entry = [{"targets": [f"{host}:{server.server_port}"],
              "labels": {"component": name.split("-")[0], "instance_name": name,
                         "run_id": run_id(run), "node_id": node_id()}}]
    Storage(run).put_bytes(f"metrics/targets/{name}.json", json.dumps(entry).encode())
    return registry


def setup_process(run: str, name: str, host: str = "127.0.0.1"
                  ) -> tuple[CollectorRegistry, Path]:
    """Logging to node-local scratch and a metrics endpoint announced in run storage; returns
    the registry and the local log file (shipped to `<run>/logs/` by `RunProcess.ship_logs`)."""
    log_path = scratch_dir(run, name) / f"{name}.log"
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    return serve_metrics(run, name, host), log_path


def advertised_host(config: ClusterConfig) -> str:
    """cluster.host, with "auto" resolved to the IP of the node this process runs on."""
    if config.host != "auto":
        return config.host
    import ray.util

    return ray.util.get_node_ip_address()


def node_id() -> str:
    """The Ray node this process runs on ("" outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def reconstructed() -> bool:
    """Whether this process is a Ray actor that Ray restarted."""
    import ray

    return ray.is_initialized() and ray.get_runtime_context().was_current_actor_reconstructed


def count_restart(run: str, name: str) -> int:
    """Restarts of process `name` so far, this one included when Ray is restarting it."""
    store, key = Storage(run), f"restarts/{name}.json"
    count = json.loads(store.get_bytes(key))["restarts"] if store.exists(key) else 0
    if reconstructed():
        count += 1
        store.put_bytes(key, json.dumps({"restarts": count}).encode())
    return count


def read_address(run: str, name: str) -> tuple[str, str] | None:
    """(address, incarnation id) that server `name` of the run announced last; None if none."""
    store, key = Storage(run), f"addresses/{name}.json"
    if not store.exists(key):
        return None
    entry = json.loads(store.get_bytes(key))
    return entry["address"], entry["incarnation"]


class RunProcess:
    """What every long-lived process of a run shares: its log, shipped to run storage, and its
    restart count, kept in `<run>/restarts/<name>.json` (Ray restarts an actor by running its
    constructor again, in a fresh process that remembers nothing)."""

    def __init__(self, run: str, name: str, metrics_host: str = "127.0.0.1"):
        self._run, self._name = str(run), name
        self.registry, self._log_path = setup_process(self._run, name, metrics_host)
        self.restarts = count_restart(self._run, name)
        self.reconstructed = reconstructed()  # by Ray, after this process died
        atexit.register(self._ship_logs_at_exit)
        Counter("pacflow_process_restarts", "times Ray restarted this process",
                registry=self.registry).inc(self.restarts)
        if self.restarts:
            logging.getLogger(__name__).warning("%s restarted (%d so far)", name, self.restarts)

    def _ship_logs_at_exit(self) -> None:
        try:
            self.ship_logs()
        except Exception:  # storage gone at shutdown: the log stays on the node's scratch
            pass

    def stable_port(self, configured: int) -> int:
        """The port to bind: the configured one; else, in a process Ray restarted, the one its
        first incarnation bound, so that clients reconnect to the same address; else 0 (any)."""
        found = None if configured or not self.reconstructed else \
            read_address(self._run, self._name)
        return int(found[0].rsplit(":", 1)[1]) if found else configured

    def remember_address(self, address: str) -> None:
        """Announces the address this process serves on, with an id of this incarnation, in
        `<run>/addresses/<name>.json` (read_address; clients find a restarted server by it)."""
        Storage(self._run).put_bytes(f"addresses/{self._name}.json", json.dumps(
            {"address": address, "incarnation": uuid.uuid4().hex}).encode())

    def node(self) -> str:
        """The Ray node this process runs on."""
        return node_id()

    def final_scrape(self, timeout: float) -> bool:
        """At the run's end: waits for Prometheus to read this process's final values
        (ScrapeClock.final_scrape)."""
        return self.registry.scrape_clock.final_scrape(timeout)

    def ship_logs(self) -> None:
        """Copies this process's log to `<run>/logs/<name>.log` (called after every cycle)."""
        for handler in logging.getLogger().handlers:
            handler.flush()
        Storage(self._run).put_file(self._log_path, f"logs/{self._name}.log")
