"""(b) cdul-server end to end through cdul_client, (d) relabeling from its cache, and Predict.

The server runs as a subprocess on a loopback port, started with the same command a user
types, so decoding, views, batching, encoding, aggregation and transport are all measured.
"""

from __future__ import annotations

import logging
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .measure import Measurement, load_average, percentile

_logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 30.0


def server_executable() -> list[str]:
    """Return the command that starts cdul-server with this Python."""
    script = Path(sys.executable).with_name("cdul-server")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "cdul_server.cli"]


def server_help() -> str:
    """Return the ``--help`` text of cdul-server, or raise RuntimeError when it cannot run."""
    try:
        done = subprocess.run(
            [*server_executable(), "--help"], capture_output=True, text=True, timeout=120
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise RuntimeError(f"cdul-server --help failed: {err}") from err
    if done.returncode != 0:
        raise RuntimeError(f"cdul-server --help exited {done.returncode}: {done.stderr[-500:]}")
    return done.stdout


@dataclass
class ServerProcess:
    """A cdul-server subprocess bound to a loopback port."""

    command: list[str]
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def target(self) -> str:
        """The gRPC target of the server."""
        return f"127.0.0.1:{self.port}"

    @property
    def command_line(self) -> str:
        """The command as a shell line, with the temporary paths shortened to their names."""
        return shlex.join(self.command)

    def stop(self) -> None:
        """Send SIGTERM and wait for the server to drain and exit; kill it after a timeout."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _logger.warning("cdul-server pid %d did not stop in time; killing", self.process.pid)
            self.process.kill()
            self.process.wait()


def start_server(
    models_dir: Path, work_dir: Path, flags: dict[str, str | int | None]
) -> ServerProcess:
    """Start cdul-server on port 0 and wait until its health check reports SERVING.

    Args:
        models_dir: Model repository to serve.
        work_dir: Folder for the port file and the server log.
        flags: Further command-line flags, such as ``{"--precision": "int8"}``; a value of None
            passes the flag alone.

    Raises:
        RuntimeError: The server exited or did not become ready within the startup timeout.
    """
    from cdul_client import LabelerClient, LabelerError

    work_dir.mkdir(parents=True, exist_ok=True)
    tag = f"{int(time.time() * 1000)}"
    port_file = work_dir / f"port-{tag}"
    log_path = work_dir / f"server-{tag}.log"
    command = [
        *server_executable(),
        "--models",
        str(models_dir),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--port-file",
        str(port_file),
    ]
    for flag, value in flags.items():
        command.append(flag)
        if value is not None:
            command.append(str(value))
    log = log_path.open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not (port_file.is_file() and port_file.read_text().strip()):
        if process.poll() is not None:
            raise RuntimeError(
                f"cdul-server exited {process.returncode} at startup: "
                f"{log_path.read_text(errors='replace')[-2000:]}"
            )
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"cdul-server wrote no port file in {STARTUP_TIMEOUT_S} s")
        time.sleep(0.1)
    server = ServerProcess(command, process, int(port_file.read_text().strip()), log_path)
    with LabelerClient(server.target, timeout_s=10) as client:
        while True:
            try:
                if client.health() == "SERVING":
                    break
            except LabelerError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(
                    "cdul-server did not report SERVING: "
                    f"{log_path.read_text(errors='replace')[-2000:]}"
                )
            time.sleep(0.2)
    _logger.info("started %s on %s", server.command_line, server.target)
    return server


@dataclass
class LoadResult:
    """One timed load run: wall time, per-request latencies and what the server returned."""

    seconds: float
    latencies_s: list[float]
    images: int
    content_keys: list[str] = field(default_factory=list)
    cache_hits: int = 0


def run_load(
    target: str,
    requests: Sequence[list[Any]],
    *,
    concurrency: int,
    call: str,
    class_names: Sequence[str] = (),
    options: Any = None,
    model: str = "",
) -> LoadResult:
    """Send ``requests`` from ``concurrency`` threads, each with its own client, and time them.

    Args:
        target: The server.
        requests: The images of each request (bytes, ContentKeys or (id, image) pairs).
        concurrency: Client threads, so requests in flight at once.
        call: "pseudo_label" or "predict".
        class_names: Vocabulary of pseudo_label calls.
        options: PseudoLabelOptions of pseudo_label calls.
        model: Model name; empty for the server's default.

    Raises:
        RuntimeError: A call or an image failed; a benchmark counts only correct results.
    """
    from cdul_client import LabelerClient

    pending: queue.Queue[int] = queue.Queue()
    for index in range(len(requests)):
        pending.put(index)
    latencies: list[float] = []
    keys: list[str] = []
    hits = [0]
    errors: list[BaseException] = []
    lock = threading.Lock()
    clients = [LabelerClient(target, timeout_s=600) for _ in range(concurrency)]
    start_barrier = threading.Barrier(concurrency + 1)

    def worker(client: Any) -> None:
        start_barrier.wait()
        while not errors:
            try:
                index = pending.get_nowait()
            except queue.Empty:
                return
            try:
                begin = time.perf_counter()
                if call == "pseudo_label":
                    response = client.pseudo_label(
                        requests[index], class_names, options=options, model=model
                    )
                else:
                    response = client.predict(requests[index], model=model)
                elapsed = time.perf_counter() - begin
                for result in response.results:
                    result.raise_for_status()
            except BaseException as err:  # recorded and re-raised in the caller's thread
                with lock:
                    errors.append(err)
                return
            with lock:
                latencies.append(elapsed)
                for result in response.results:
                    keys.append(result.content_key)
                    hits[0] += int(bool(getattr(result, "cache_hit", False)))

    threads = [threading.Thread(target=worker, args=(client,)) for client in clients]
    for thread in threads:
        thread.start()
    start_barrier.wait()
    begin = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - begin
    for client in clients:
        client.close()
    if errors:
        raise RuntimeError(f"a {call} call failed during the benchmark: {errors[0]}") from errors[0]
    images = sum(len(request) for request in requests)
    return LoadResult(seconds, latencies, images, keys, hits[0])


def summarize_load(
    figure: str,
    label: str,
    runs: list[LoadResult],
    params: dict[str, Any],
    load_start: float,
) -> Measurement:
    """Turn repeated load runs into one measurement with pooled latency percentiles."""
    latencies_ms = [1000.0 * value for run in runs for value in run.latencies_s]
    measurement = Measurement(
        figure=figure,
        label=label,
        unit="images/s",
        values=[run.images / run.seconds for run in runs],
        params=params,
        load_start=load_start,
        load_end=load_average(),
    )
    measurement.extra.update(
        p50_ms=percentile(latencies_ms, 50),
        p95_ms=percentile(latencies_ms, 95),
        p99_ms=percentile(latencies_ms, 99),
        requests=len(latencies_ms),
        cache_hits=sum(run.cache_hits for run in runs),
    )
    _logger.info(
        "%s %s: %.3g images/s [%.3g-%.3g], p50 %.0f ms p99 %.0f ms",
        figure,
        label,
        measurement.median,
        measurement.low,
        measurement.high,
        measurement.extra["p50_ms"],
        measurement.extra["p99_ms"],
    )
    return measurement


def profile_server(
    server: ServerProcess, out_path: Path, duration_s: int, load: Any
) -> dict[str, Any] | None:
    """Sample the server with py-spy while ``load()`` runs, and summarize where time goes.

    Returns:
        Top frames by own samples and by inclusive samples, or None when py-spy is missing.
    """
    py_spy = Path(sys.executable).with_name("py-spy")
    if not py_spy.is_file():
        _logger.warning("py-spy is not installed in this environment; no server profile")
        return None
    command = [
        str(py_spy),
        "record",
        "--pid",
        str(server.process.pid),
        "--duration",
        str(duration_s),
        "--rate",
        "50",
        "--format",
        "raw",
        "--output",
        str(out_path),
    ]
    recorder = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)
    load()
    _, stderr = recorder.communicate(timeout=duration_s + 60)
    if recorder.returncode != 0 or not out_path.is_file():
        _logger.warning("py-spy failed (%s): %s", recorder.returncode, stderr[-500:])
        return None
    return summarize_collapsed(out_path)


# Innermost frames of threads that wait for work: py-spy's idle detection misses some of them
# when the machine is loaded, because a thread blocked in C can look runnable.
_IDLE_LEAVES = (
    "concurrent/futures/thread.py",
    "threading.py",
    "queue.py",
    "selectors.py",
)


def summarize_collapsed(path: Path, top: int = 12) -> dict[str, Any]:
    """Return where a py-spy ``raw`` profile spends its samples.

    py-spy leaves out most idle threads by default. Samples whose innermost frame is a wait in
    the thread pool, threading, queue or selectors modules are counted as ``idle`` too, so
    the shares are of threads doing work in Python or in a C extension called from it.

    Returns:
        ``samples``, ``own`` (the innermost Python frames, so a call into ONNX Runtime or
        Pillow counts at its Python caller) and ``server`` (functions of cdul_server counted
        wherever they are on the stack), each as (frame, share of samples) pairs.
    """
    own: dict[str, int] = {}
    server: dict[str, int] = {}
    total = 0
    idle = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        if any(marker in frames[-1] for marker in _IDLE_LEAVES):
            idle += count
            continue
        total += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            if "cdul_server/" in frame:
                name = (
                    frame.split(" (")[0] + " (" + frame.split("cdul_server/")[1].split(":")[0] + ")"
                )
                server[name] = server.get(name, 0) + count

    def ranked(counts: dict[str, int]) -> list[tuple[str, float]]:
        best = sorted(counts.items(), key=lambda item: -item[1])[:top]
        return [(frame, count / max(total, 1)) for frame, count in best]

    return {"samples": total, "idle": idle, "own": ranked(own), "server": ranked(server)}
