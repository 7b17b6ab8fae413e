"""``cdul-server``: serve CDUL pseudo labels and classifier predictions over gRPC."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import re
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import NoReturn

import prometheus_client

from cdul_server import __version__
from cdul_server.app import ServerConfig, StartupError, create_server, write_port_file
from cdul_server.limits import MIB

_logger = logging.getLogger(__name__)

_DEFAULTS = ServerConfig()


def _parse_int(text: str, requirement: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}") from None


def _int(text: str) -> int:
    return _parse_int(text, "an integer")


def _positive_int(text: str) -> int:
    value = _parse_int(text, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    value = _parse_int(text, "an integer of at least 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer of at least 0, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number of at least 0, got {text!r}")
    return value


class _ArgumentParser(argparse.ArgumentParser):
    """Reports a usage error on one line, naming the option, instead of the whole usage."""

    def error(self, message: str) -> NoReturn:
        # argparse words errors of one option as "argument --flag[/-f]: what is wrong".
        match = re.match(r"argument (\S+?)(?:/\S+)?: (.*)", message, flags=re.DOTALL)
        if match:
            flag, problem = match.groups()
            message = f"{flag} {problem}" if problem.startswith("must ") else f"{flag}: {problem}"
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


class _HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to help texts that do not state their default themselves."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, [], argparse.SUPPRESS):
            return text
        if isinstance(action.default, bool):
            return text
        return f"{text} (default: {action.default})"


def build_parser() -> argparse.ArgumentParser:
    d = _DEFAULTS
    parser = _ArgumentParser(
        prog="cdul-server",
        description="Serve CLIP-driven multi-label pseudo labels (CDUL) and classifier "
        "predictions over gRPC, with dynamic batching, an embedding cache and Prometheus "
        "metrics. Without --models it serves the model repository packaged with cdul-server.",
        formatter_class=_HelpFormatter,
    )
    add = parser.add_argument
    models = parser.add_argument_group("models")
    models.add_argument(
        "--models",
        type=Path,
        default=None,
        metavar="DIR",
        help="model repository folder written by cdul-export (default: the packaged repository)",
    )
    models.add_argument(
        "--clip",
        default=None,
        metavar="NAME",
        help="default CLIP model for requests that name none (default: "
        "digits-clip if present, else the first CLIP model by name)",
    )
    models.add_argument(
        "--classifier",
        default=None,
        metavar="NAME",
        help="default classifier for Predict (default: the first by name)",
    )
    models.add_argument(
        "--precision",
        choices=("fp32", "int8", "fp16"),
        default=d.precision,
        help="image-encoder graph to load; int8 and fp16 need the exported variant",
    )
    models.add_argument(
        "--providers",
        default=",".join(d.providers),
        metavar="LIST",
        help="ONNX Runtime execution providers, comma-separated, in order of "
        "preference; an unavailable provider is a startup error",
    )
    models.add_argument(
        "--threads",
        type=_int,
        default=d.threads,
        metavar="N",
        help="ONNX Runtime threads inside one operator (0: ONNX Runtime chooses)",
    )
    models.add_argument(
        "--inter-op-threads",
        type=_int,
        default=d.inter_op_threads,
        metavar="N",
        help="ONNX Runtime threads across operators (0: ONNX Runtime chooses)",
    )
    models.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="skip the warm-up encoder runs before reporting SERVING (default: warm up)",
    )

    net = parser.add_argument_group("network")
    net.add_argument("--host", default=d.host, help="address to listen on (0.0.0.0 for all)")
    net.add_argument("--port", type=_int, default=d.port, help="gRPC port (0: any free port)")
    net.add_argument(
        "--port-file",
        type=Path,
        default=None,
        metavar="PATH",
        help="write the bound gRPC port to this file once SERVING (default: no file)",
    )
    net.add_argument(
        "--metrics-host", default=d.metrics_host, help="address of the metrics endpoint"
    )
    net.add_argument(
        "--metrics-port",
        type=_int,
        default=d.metrics_port,
        help="Prometheus metrics HTTP port (0: any free port)",
    )
    net.add_argument(
        "--metrics-port-file",
        type=Path,
        default=None,
        metavar="PATH",
        help="write the bound metrics port to this file once SERVING (default: no file)",
    )
    net.add_argument(
        "--max-concurrent-rpcs",
        type=_positive_int,
        default=d.max_concurrent_rpcs,
        metavar="N",
        help="calls served at once; more get RESOURCE_EXHAUSTED",
    )

    batching = parser.add_argument_group("batching")
    batching.add_argument(
        "--max-batch-size",
        type=_positive_int,
        default=d.max_batch_size,
        metavar="VIEWS",
        help="most views (whole images and tiles) per encoder call",
    )
    batching.add_argument(
        "--max-queue-delay-ms",
        type=_non_negative_float,
        default=d.max_queue_delay_ms,
        metavar="MS",
        help="maximum wait of the oldest queued view for a fuller batch, in ms",
    )
    batching.add_argument(
        "--max-queue-views",
        type=_positive_int,
        default=d.max_queue_views,
        metavar="VIEWS",
        help="views queued per model; a request that does not fit gets RESOURCE_EXHAUSTED",
    )
    batching.add_argument(
        "--decode-workers",
        type=_positive_int,
        default=d.decode_workers,
        metavar="N",
        help="threads that decode and preprocess images",
    )

    cache = parser.add_argument_group("embedding cache")
    cache.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder of the persisted cache; loaded at start, saved on shutdown "
        "and on the interval (default: in memory only)",
    )
    cache.add_argument(
        "--cache-max-embeddings",
        type=_non_negative_int,
        default=d.cache_max_embeddings,
        metavar="N",
        help="most image and tile embeddings kept; least recently used entries are evicted "
        "(0: no image cache)",
    )
    cache.add_argument(
        "--cache-save-interval-s",
        type=_non_negative_float,
        default=d.cache_save_interval_s,
        metavar="S",
        help="seconds between saves of a changed cache (0: only on shutdown)",
    )
    cache.add_argument(
        "--text-cache-size",
        type=_positive_int,
        default=d.text_cache_size,
        metavar="N",
        help="prompt embeddings kept",
    )
    cache.add_argument(
        "--prediction-cache-size",
        type=_positive_int,
        default=d.prediction_cache_size,
        metavar="N",
        help="classifier outputs kept for Predict by content key",
    )

    limits = parser.add_argument_group("limits")
    limits.add_argument(
        "--max-receive-message-bytes",
        type=_positive_int,
        default=d.max_receive_message_bytes,
        metavar="BYTES",
        help=f"largest request message (default {d.max_receive_message_bytes // MIB} MiB)",
    )
    limits.add_argument(
        "--max-send-message-bytes",
        type=_positive_int,
        default=d.max_send_message_bytes,
        metavar="BYTES",
        help=f"largest response message (default {d.max_send_message_bytes // MIB} MiB)",
    )
    limits.add_argument(
        "--max-images-per-request",
        type=_positive_int,
        default=d.max_images_per_request,
        metavar="N",
        help="images per request message",
    )
    limits.add_argument(
        "--max-classes",
        type=_positive_int,
        default=d.max_classes,
        metavar="N",
        help="class names per vocabulary",
    )
    limits.add_argument(
        "--max-templates",
        type=_positive_int,
        default=d.max_templates,
        metavar="N",
        help="prompt templates per vocabulary",
    )
    limits.add_argument(
        "--max-prompt-chars",
        type=_positive_int,
        default=d.max_prompt_chars,
        metavar="CHARS",
        help="characters of a class name, template, prompt or search text",
    )
    limits.add_argument(
        "--max-grid-size",
        type=_positive_int,
        default=d.max_grid_size,
        metavar="N",
        help="tiles per side of the pseudo-label grid",
    )
    limits.add_argument(
        "--max-pixels",
        type=_positive_int,
        default=d.max_pixels,
        metavar="PIXELS",
        help="decoded pixels (width x height) of one image; larger images fail "
        "with reason too_many_pixels",
    )
    limits.add_argument(
        "--max-search-k",
        type=_positive_int,
        default=d.max_search_k,
        metavar="N",
        help="hits of one SearchCrops call",
    )

    security = parser.add_argument_group("security")
    security.add_argument(
        "--allow-root",
        dest="allow_roots",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="folder whose files requests may name by file:// URI (repeatable; "
        "default: no file reading)",
    )
    security.add_argument(
        "--tls-cert",
        type=Path,
        default=None,
        metavar="PEM",
        help="server certificate chain in PEM; with --tls-key turns on TLS (default: no TLS)",
    )
    security.add_argument(
        "--tls-key",
        type=Path,
        default=None,
        metavar="PEM",
        help="private key of --tls-cert (default: plaintext, no TLS)",
    )
    security.add_argument(
        "--auth-token-file",
        type=Path,
        default=None,
        metavar="PATH",
        help="file holding a bearer token that every call but health checks "
        "must send as 'authorization: Bearer <token>' (default: no auth)",
    )

    life = parser.add_argument_group("lifecycle")
    life.add_argument(
        "--grace-s",
        type=_non_negative_float,
        default=d.grace_s,
        metavar="S",
        help="seconds that calls in flight get to finish after SIGTERM",
    )
    life.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="logging level",
    )
    add("--version", action="version", version=f"cdul-server {__version__}")
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Build a ServerConfig from parsed arguments."""
    names = {field.name for field in dataclasses.fields(ServerConfig)}
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    values["providers"] = tuple(p.strip() for p in args.providers.split(",") if p.strip())
    values["allow_roots"] = tuple(args.allow_roots)
    return ServerConfig(**values)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until SIGTERM or SIGINT; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = config_from_args(args)
    # The *_created series double the exposition without use for dashboards; the CLI owns the
    # process, so it may change prometheus_client's global setting.
    prometheus_client.disable_created_metrics()
    if not config.providers:
        parser.error("--providers is empty: name at least one, such as CPUExecutionProvider")
    settings = ", ".join(
        f"{field.name}={getattr(config, field.name)}"
        for field in dataclasses.fields(config)
        if field.name != "extra"
    )
    _logger.info("cdul-server %s settings: %s", __version__, settings)

    stop_requested = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        _logger.info("received %s", signal.Signals(signum).name)
        stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        server = create_server(config)
    except (StartupError, ValueError) as err:
        print(f"cdul-server: error: {err}", file=sys.stderr)
        return 2
    if args.port_file is not None:
        write_port_file(args.port_file, server.port)
    if args.metrics_port_file is not None:
        write_port_file(args.metrics_port_file, server.metrics_port)
    while not stop_requested.wait(1.0):
        pass
    drained = server.stop(config.grace_s)
    _logger.info("exiting (%s)", "all calls finished" if drained else "calls were cancelled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
