"""`cdul-label`: label image corpora with a cdul server (pseudo, relabel, predict, search)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import grpc

from cdul_client import __version__
from cdul_client.client import LabelerClient
from cdul_client.config import (
    DEFAULT_TIMEOUT_S,
    GLOBAL_VIEWS,
    ChannelConfig,
    PseudoLabelOptions,
    RetryConfig,
    TlsConfig,
)
from cdul_client.corpus import DEFAULT_EXTENSIONS, CorpusError, CorpusImage, discover
from cdul_client.errors import LabelerError
from cdul_client.images import ContentKey
from cdul_client.labelfile import (
    FORMAT_VERSION,
    PREDICTION_FORMAT,
    PSEUDO_LABEL_FORMAT,
    OutputError,
    check_output_folder,
    errors_path,
    journal_path,
    open_error_log,
    open_output,
    read_label_file,
)
from cdul_client.labeling import (
    BatchLabeler,
    RunStopped,
    Summary,
    WorkItem,
    predict_pairs,
    prediction_record,
    pseudo_label_pairs,
    pseudo_label_record,
)
from cdul_client.results import ModelInfo

_logger = logging.getLogger(__name__)

DEFAULT_SERVER = "localhost:50051"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_SOME_IMAGES_FAILED = 3
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Bad input from the command line; printed as one line, exit status 2."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run `cdul-label` and return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.handler(args))
    except UsageError as err:
        _fail(str(err))
        return EXIT_USAGE
    except (CorpusError, OutputError) as err:
        _fail(str(err))
        return EXIT_USAGE
    except LabelerError as err:
        _fail(describe_call_error(err, args.server, args.timeout))
        return EXIT_FAILED


def _fail(message: str) -> None:
    print(f"cdul-label: error: {message}", file=sys.stderr)


class _ArgumentParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line that points to --help, without usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of `cdul-label` and its subcommands."""
    parser = _ArgumentParser(
        prog="cdul-label",
        description=(
            "Label image corpora with a cdul server: CDUL pseudo labels (pseudo, relabel), "
            "classifier scores (predict) and crop search (search). Exit status: 0 done, 1 the "
            "server failed or could not be reached, 2 bad input, 3 some images failed (see "
            "<out>.errors.jsonl), 130 interrupted."
        ),
    )
    parser.add_argument("--version", action="version", version=f"cdul-label {__version__}")
    subparsers = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_ArgumentParser
    )
    connection = _connection_parser()
    output = _output_parser()

    pseudo = subparsers.add_parser(
        "pseudo",
        parents=[connection, output],
        help="write CDUL pseudo labels of a corpus",
        description=(
            "Write one pseudo-label record per image of the inputs (global, aggregate and "
            "final scores over --classes) to --out, resumably."
        ),
    )
    pseudo.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image folders (searched recursively by --extensions), text files listing one "
        "image path per line (.txt, .lst, .list; relative to the list's folder), webdataset "
        "tar shards (.tar, .tar.gz, .tgz), or image files",
    )
    pseudo.add_argument(
        "--classes",
        required=True,
        type=Path,
        metavar="FILE",
        help="class names: a JSON list, or a text file with one name per line (no blank "
        "lines, no duplicates); their order is the order of every score list",
    )
    _add_model_option(pseudo, "CLIP model name (default: the server's default CLIP model)")
    _add_pseudo_options(pseudo, defaults=True)
    _add_extensions_option(pseudo)
    pseudo.set_defaults(handler=run_pseudo)

    relabel = subparsers.add_parser(
        "relabel",
        parents=[connection, output],
        help="relabel a pseudo-label file with a new vocabulary, by content key",
        description=(
            "Relabel the images of an existing pseudo-label file with new class names. The "
            "images are sent by content key, so the server answers from its embedding cache "
            "without the image bytes; images it no longer has are sent again from their files. "
            "Model, grid, threshold, lambda, temperature, view and templates default to those "
            "in the header of --from."
        ),
    )
    relabel.add_argument(
        "--from",
        dest="source",
        required=True,
        type=Path,
        metavar="FILE",
        help="pseudo-label file to relabel (JSON Lines, or Parquet by its .parquet suffix)",
    )
    relabel.add_argument(
        "--classes",
        required=True,
        type=Path,
        metavar="FILE",
        help="the new class names, in the format of `pseudo --classes`",
    )
    _add_model_option(relabel, "CLIP model name (default: the model in the header of --from)")
    _add_pseudo_options(relabel, defaults=False)
    relabel.set_defaults(handler=run_relabel)

    predict = subparsers.add_parser(
        "predict",
        parents=[connection, output],
        help="write classifier scores of a corpus",
        description=(
            "Write one record per image with the classifier's scores (sigmoid of its logits, "
            "one per class) and the selected labels, resumably."
        ),
    )
    predict.add_argument("inputs", nargs="+", metavar="INPUT", help="as for `pseudo`")
    _add_model_option(predict, "classifier name (default: the server's default classifier)")
    predict.add_argument(
        "--top-k",
        type=int,
        default=0,
        metavar="K",
        help="also list the K best labels of each image (default: 0, none)",
    )
    predict.add_argument(
        "--threshold",
        type=float,
        default=None,
        metavar="SCORE",
        help="also list every label with a score of at least SCORE in [0, 1] (default: off)",
    )
    _add_extensions_option(predict)
    predict.set_defaults(handler=run_predict)

    search = subparsers.add_parser(
        "search",
        parents=[connection],
        help="find cached tiles and images that match a text",
        description=(
            "Rank the whole-image and tile embeddings that the server has cached by cosine "
            "similarity to TEXT and print the best K."
        ),
    )
    search.add_argument("text", metavar="TEXT", help="what to look for, such as 'a red car'")
    search.add_argument(
        "-k", type=int, default=10, metavar="N", help="number of hits (default: 10)"
    )
    _add_model_option(search, "CLIP model name (default: the server's default CLIP model)")
    search.add_argument(
        "--whole-images",
        action="store_true",
        help="rank whole-image views too, not only tiles (default: tiles only)",
    )
    search.add_argument(
        "--json", action="store_true", help="print one JSON object a hit (default: a table)"
    )
    search.set_defaults(handler=run_search)
    return parser


def _connection_parser() -> _ArgumentParser:
    parser = _ArgumentParser(add_help=False)
    group = parser.add_argument_group("server connection")
    group.add_argument(
        "--server",
        default=os.environ.get("CDUL_SERVER", DEFAULT_SERVER),
        metavar="HOST:PORT",
        help=f"the cdul server (default: $CDUL_SERVER, else {DEFAULT_SERVER})",
    )
    group.add_argument(
        "--token",
        default=os.environ.get("CDUL_TOKEN"),
        help="bearer token sent as 'authorization: Bearer TOKEN' (default: $CDUL_TOKEN, else none)",
    )
    group.add_argument(
        "--tls", action="store_true", help="use TLS (default: plaintext, for loopback only)"
    )
    group.add_argument(
        "--root-certs",
        type=Path,
        metavar="PEM",
        help="PEM file of the root certificates that sign the server's certificate; implies "
        "--tls (default: the system's)",
    )
    group.add_argument(
        "--server-name",
        metavar="NAME",
        help="name expected in the server's certificate, when it differs from HOST",
    )
    group.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"deadline of each call, retries included (default: {DEFAULT_TIMEOUT_S:g} s)",
    )
    group.add_argument(
        "--attempts",
        type=int,
        default=RetryConfig().max_attempts,
        metavar="N",
        help="attempts per call on UNAVAILABLE or RESOURCE_EXHAUSTED, with exponential "
        f"backoff (default: {RetryConfig().max_attempts})",
    )
    group.add_argument(
        "--max-message-mb",
        type=float,
        default=64.0,
        metavar="MIB",
        help="largest request and response message (default: 64 MiB)",
    )
    group.add_argument(
        "--keepalive-ms",
        type=int,
        default=ChannelConfig().keepalive_time_ms,
        metavar="MS",
        help="HTTP/2 keepalive ping interval, 0 to disable (default: "
        f"{ChannelConfig().keepalive_time_ms} ms)",
    )
    group.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also log retries and fallbacks on stderr (default: warnings and errors only)",
    )
    return parser


def _output_parser() -> _ArgumentParser:
    parser = _ArgumentParser(add_help=False)
    group = parser.add_argument_group("output")
    group.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="FILE",
        help="output file, in an existing folder; failed images go to FILE.errors.jsonl",
    )
    group.add_argument(
        "--format",
        choices=("jsonl", "parquet"),
        default=None,
        help="jsonl (a header line, then one record a line) or parquet (needs pyarrow) "
        "(default: parquet when FILE ends in .parquet, else jsonl)",
    )
    group.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run: skip the images already in FILE (which must have "
        "the same classes, model and options) and append the rest (default: off, an existing "
        "FILE is an error)",
    )
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="replace FILE and its error file if they exist (default: off)",
    )
    group.add_argument(
        "--batch-size",
        type=int,
        default=16,
        metavar="N",
        help="images per call; results are written after each batch (default: 16)",
    )
    group.add_argument(
        "--concurrency",
        type=int,
        default=4,
        metavar="N",
        help="calls in flight at once (default: 4)",
    )
    group.add_argument(
        "--no-progress", action="store_true", help="hide the progress bar (default: shown)"
    )
    return parser


def _add_model_option(parser: argparse.ArgumentParser, text: str) -> None:
    parser.add_argument("--model", default=None, metavar="NAME", help=text)


def _add_extensions_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--extensions",
        default=",".join(DEFAULT_EXTENSIONS),
        metavar="LIST",
        help="comma-separated image suffixes searched for in folders and tar shards, any case "
        f"(default: {','.join(DEFAULT_EXTENSIONS)})",
    )


def _add_pseudo_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    group = parser.add_argument_group("pseudo labels")

    def default(value: Any, text: str) -> tuple[Any, str]:
        return (value, text) if defaults else (None, "the value in the header of --from")

    grid, grid_text = default(3, "3, a 3 x 3 grid of 9 tiles")
    group.add_argument(
        "--grid",
        type=int,
        default=grid,
        metavar="N",
        help=f"tiles per side of the grid (default: {grid_text})",
    )
    threshold, threshold_text = default(0.0, "0.0")
    group.add_argument(
        "--threshold",
        type=float,
        default=threshold,
        metavar="SCORE",
        help="aggregation threshold on the per-class maximum tile score, in [0, 1]; below it "
        f"the class takes its minimum tile score (default: {threshold_text})",
    )
    weight, weight_text = default(0.0, "0.0")
    group.add_argument(
        "--lambda",
        dest="lambda_weight",
        type=float,
        default=weight,
        metavar="WEIGHT",
        help="weight in [0, 1] of |global - aggregate| in the final label (global + "
        f"aggregate + WEIGHT * |global - aggregate|) / 2 (default: {weight_text})",
    )
    _, temperature_text = default(None, "the model's logit scale, about 100 for CLIP")
    group.add_argument(
        "--temperature",
        type=float,
        default=None,
        metavar="T",
        help=f"multiplier of the cosine similarities before the softmax, a finite number > 0 "
        f"(default: {temperature_text})",
    )
    view, view_text = default("center_crop", "center_crop")
    group.add_argument(
        "--global-view",
        choices=GLOBAL_VIEWS,
        default=view,
        help="how the whole-image view is made: the model's center crop, a squash of the "
        f"whole image, or padding to a square (default: {view_text})",
    )
    _, template_text = default(None, "the model's default templates")
    group.add_argument(
        "--template",
        action="append",
        dest="templates",
        default=None,
        metavar="TEXT",
        help="prompt template with one {} for the class name, such as 'a photo of a {}.'; "
        f"repeat for prompt ensembling (default: {template_text})",
    )
    group.add_argument(
        "--tiles",
        action="store_true",
        help="also write the per-tile scores, 'tiles' (default: off)",
    )
    group.add_argument(
        "--embeddings",
        action="store_true",
        help="also write the whole-image and tile embeddings (default: off)",
    )


def read_class_names(path: Path) -> list[str]:
    """Read a class file: a JSON list of names, or one name per line.

    Raises:
        UsageError: the file is missing, empty, has a blank line or a duplicate name.
    """
    try:
        # utf-8-sig drops the byte-order mark that some editors write, which would otherwise
        # become part of the first class name.
        text = path.read_text(encoding="utf-8-sig")
    except OSError as err:
        raise UsageError(f"cannot read --classes {path}: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise UsageError(f"--classes {path} is not UTF-8 text") from err
    if path.suffix == ".json" or text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as err:
            raise UsageError(f"--classes {path} is not valid JSON ({err.msg})") from err
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise UsageError(f"--classes {path} must be a JSON list of strings")
        where = [f"entry {index}" for index in range(len(names))]
    else:
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        names = [line.rstrip("\r") for line in lines]
        where = [f"line {index + 1}" for index in range(len(names))]
    if not names:
        raise UsageError(f"--classes {path} is empty: list one class name per line")
    seen: dict[str, str] = {}
    cleaned = []
    for name, place in zip(names, where, strict=True):
        stripped = name.strip()
        if not stripped:
            raise UsageError(
                f"--classes {path} has a blank {place}: remove it (every line is one class)"
            )
        if stripped in seen:
            raise UsageError(
                f"--classes {path} lists {stripped!r} twice ({seen[stripped]} and {place}): "
                "remove the duplicate"
            )
        seen[stripped] = place
        cleaned.append(stripped)
    return cleaned


def make_client(args: argparse.Namespace) -> LabelerClient:
    """Build the client from the connection options."""
    try:
        tls: bool | TlsConfig = False
        if args.tls or args.root_certs or args.server_name:
            tls = TlsConfig(root_certificates=args.root_certs, server_name=args.server_name)
        max_bytes = int(args.max_message_mb * 1024 * 1024)
        return LabelerClient(
            args.server,
            timeout_s=args.timeout,
            token=args.token or None,
            tls=tls,
            channel=ChannelConfig(
                max_send_message_bytes=max_bytes,
                max_receive_message_bytes=max_bytes,
                keepalive_time_ms=args.keepalive_ms,
            ),
            retry=RetryConfig(max_attempts=args.attempts),
        )
    except ValueError as err:
        raise UsageError(str(err)) from err


def describe_call_error(error: LabelerError, server: str, timeout_s: float) -> str:
    """Turn a failed call into a one-line message that names the next step."""
    code = error.code
    if code == grpc.StatusCode.UNAVAILABLE:
        return (
            f"cannot reach the server at {server} ({error.message}): check --server and that "
            "cdul-server is running there"
        )
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return (
            f"the server at {server} rejected the request ({code.name}: {error.message}): pass "
            "the right --token or set CDUL_TOKEN"
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return (
            f"the server at {server} did not answer within {timeout_s:g} s: raise --timeout "
            "or lower --batch-size"
        )
    return f"the server at {server} failed the request: {error}"


def _check_run_options(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.concurrency < 1:
        raise UsageError(f"--concurrency must be at least 1, got {args.concurrency}")
    if args.attempts < 1:
        raise UsageError(f"--attempts must be at least 1, got {args.attempts}")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other: pass one")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise UsageError(f"--timeout must be a finite number of seconds > 0, got {args.timeout}")
    check_output_folder(args.out)


def _output_format(args: argparse.Namespace) -> str:
    if args.format is not None:
        return str(args.format)
    return "parquet" if args.out.suffix == ".parquet" else "jsonl"


def _pseudo_options(args: argparse.Namespace, base: dict[str, Any]) -> PseudoLabelOptions:
    def pick(name: str, header_name: str, fallback: Any) -> Any:
        value = getattr(args, name)
        if value is None:
            value = base.get(header_name)
        return fallback if value is None else value

    threshold = float(pick("threshold", "threshold", 0.0))
    lambda_weight = float(pick("lambda_weight", "lambda_weight", 0.0))
    temperature = pick("temperature", "temperature", None)
    for option, value in (("--threshold", threshold), ("--lambda", lambda_weight)):
        if not 0.0 <= value <= 1.0:
            raise UsageError(f"{option} must be in [0, 1], got {value}")
    if temperature is not None and not (math.isfinite(temperature) and temperature > 0):
        raise UsageError(
            f"--temperature must be a finite number > 0, got {temperature}: pass about 100 "
            "for CLIP, or leave it out for the model's logit scale"
        )
    try:
        return PseudoLabelOptions(
            grid_size=int(pick("grid", "grid_size", 3)),
            threshold=threshold,
            lambda_weight=lambda_weight,
            temperature=temperature,
            global_view=str(pick("global_view", "global_view", "center_crop")),
            templates=tuple(pick("templates", "templates", ())),
            return_tile_scores=args.tiles,
            return_embeddings=args.embeddings,
        )
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from err


def _clip_model(client: LabelerClient, name: str | None) -> ModelInfo:
    models = client.list_models()
    clips = [model for model in models if model.kind == "clip"]
    if name:
        for model in models:
            if model.name == name:
                if model.kind != "clip":
                    raise UsageError(
                        f"model {name!r} is a {model.kind}, not a CLIP model: pass a CLIP --model"
                    )
                return model
        names = ", ".join(model.name for model in clips) or "none"
        raise UsageError(f"CLIP model {name!r} not found on the server: use one of {names}")
    defaults = [model for model in clips if model.is_default] or clips
    if not defaults:
        raise UsageError(
            f"the server at {client.target} serves no CLIP model: start it with a CLIP model "
            "in its model repository"
        )
    return defaults[0]


def _pseudo_header(
    classes: list[str], model: ModelInfo, options: PseudoLabelOptions
) -> dict[str, Any]:
    return {
        "type": "header",
        "format": PSEUDO_LABEL_FORMAT,
        "version": FORMAT_VERSION,
        "classes": classes,
        "model": model.name,
        "options": {
            "grid_size": options.grid_size,
            "threshold": options.threshold,
            "lambda_weight": options.lambda_weight,
            "temperature": options.temperature,
            "global_view": options.global_view,
            "templates": list(options.templates or model.default_templates),
        },
        "optional_keys": _optional_keys(options),
        "created_by": f"cdul-label {__version__}",
    }


def _optional_keys(options: PseudoLabelOptions) -> list[str]:
    keys = ["tiles"] if options.return_tile_scores else []
    if options.return_embeddings:
        keys += ["embedding", "tile_embeddings"]
    return keys


def run_pseudo(args: argparse.Namespace) -> int:
    """`cdul-label pseudo`."""
    _check_run_options(args)
    classes = read_class_names(args.classes)
    options = _pseudo_options(args, {})
    images = discover(args.inputs, _extensions(args.extensions))
    with make_client(args) as client:
        model = _clip_model(client, args.model)
        header = _pseudo_header(classes, model, options)
        items = [WorkItem(image) for image in images]
        return _label(args, client, header, items, classes, options, model.name)


def run_relabel(args: argparse.Namespace) -> int:
    """`cdul-label relabel`."""
    _check_run_options(args)
    if args.source.absolute() == args.out.absolute():
        raise UsageError("--out must differ from --from: write the new labels to a new file")
    classes = read_class_names(args.classes)
    old_header, records = read_label_file(args.source)
    if old_header.get("format") != PSEUDO_LABEL_FORMAT:
        raise UsageError(
            f"--from {args.source} has format {old_header.get('format')!r}, expected "
            f"{PSEUDO_LABEL_FORMAT!r}: pass a file written by `cdul-label pseudo`"
        )
    base = old_header.get("options") or {}
    options = _pseudo_options(args, base)
    source_dir = args.source.parent
    items = []
    for number, record in enumerate(records, start=1):
        if not isinstance(record.get("id"), str):
            raise UsageError(f"--from {args.source}: record {number} has no string 'id'")
        path = Path(record.get("path") or record["id"])
        image = CorpusImage(
            id=record["id"],
            path=path if path.is_absolute() else source_dir / path,
            member=record.get("member"),
        )
        items.append(WorkItem(image, content_key=_valid_content_key(record)))
    with make_client(args) as client:
        model = _clip_model(client, args.model or old_header.get("model"))
        header = _pseudo_header(classes, model, options)
        header["relabeled_from"] = args.source.name
        return _label(args, client, header, items, classes, options, model.name)


def _valid_content_key(record: dict[str, Any]) -> str | None:
    key = record.get("content_key")
    if not key:
        return None
    try:
        return ContentKey(str(key)).key
    except ValueError:
        _logger.warning("record %r has an invalid content key: sending its file", record["id"])
        return None


def _label(
    args: argparse.Namespace,
    client: LabelerClient,
    header: dict[str, Any],
    items: list[WorkItem],
    classes: list[str],
    options: PseudoLabelOptions,
    model: str,
) -> int:
    sink, done = open_output(
        args.out, _output_format(args), header, resume=args.resume, overwrite=args.overwrite
    )
    todo = [item for item in items if item.image.id not in done]
    errors = open_error_log(args.out)
    labeler = BatchLabeler(
        sink, errors, args.out.parent, batch_size=args.batch_size, progress=not args.no_progress
    )

    def call(batches: Any) -> Any:
        return client.pseudo_label_batches(
            batches,
            classes,
            options=options,
            model=model,
            max_in_flight=args.concurrency,
            timeout_s=args.timeout,
            return_exceptions=True,
        )

    pair = pseudo_label_pairs(labeler, client, classes, options, model, args.timeout)
    return _finish_run(
        args,
        labeler,
        errors,
        len(items) - len(todo),
        lambda: labeler.run(todo, call, pair, pseudo_label_record(args.out.parent)),
    )


def _finish_run(
    args: argparse.Namespace,
    labeler: BatchLabeler,
    errors: Any,
    skipped: int,
    work: Any,
) -> int:
    summary = labeler.summary
    summary.skipped = skipped
    complete = False
    stopped: RunStopped | None = None
    try:
        work()
        complete = True
    except RunStopped as stop:
        stopped = stop
    except KeyboardInterrupt:
        _fail(f"interrupted; {summary.labeled} records were written: rerun with --resume")
        return EXIT_INTERRUPTED
    finally:
        labeler.sink.close(complete=complete)
        errors.close()
    if stopped is not None:
        return _report_stop(args, summary, stopped)
    _print_summary(summary, args.out)
    return EXIT_SOME_IMAGES_FAILED if summary.failed else EXIT_OK


def _report_stop(args: argparse.Namespace, summary: Summary, stop: RunStopped) -> int:
    """Report a whole-call failure; remove the output when this run wrote nothing to it.

    A first call rejected as invalid (a class name or template the server does not accept)
    would fail again on resume, because the header keeps that vocabulary. So a new run that
    wrote no record removes its output, and the message advises a plain rerun.
    """
    problem = describe_call_error(stop.error, args.server, args.timeout)
    invalid = stop.error.code == grpc.StatusCode.INVALID_ARGUMENT
    if not args.resume and summary.labeled == 0 and summary.failed == 0:
        for path in (args.out, journal_path(args.out), errors_path(args.out)):
            path.unlink(missing_ok=True)
        _fail(f"{problem}; nothing was written to {args.out}: fix that, then run again")
    else:
        _fail(
            f"{problem}; {summary.labeled} records were written to {args.out}: fix that, then "
            "rerun with --resume"
        )
    return EXIT_USAGE if invalid else EXIT_FAILED


def _print_summary(summary: Summary, out: Path) -> None:
    line = (
        f"labeled {summary.labeled}, failed {summary.failed}, skipped {summary.skipped} "
        f"(already in {out})"
    )
    if summary.failed:
        line += f"; failures are listed in {errors_path(out)}"
    print(line)


def run_predict(args: argparse.Namespace) -> int:
    """`cdul-label predict`."""
    _check_run_options(args)
    if args.top_k < 0:
        raise UsageError(f"--top-k must be >= 0, got {args.top_k}")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise UsageError(f"--threshold must be a score in [0, 1], got {args.threshold}")
    images = discover(args.inputs, _extensions(args.extensions))
    with make_client(args) as client:
        model = _classifier_model(client, args.model)
        header = {
            "type": "header",
            "format": PREDICTION_FORMAT,
            "version": FORMAT_VERSION,
            "classes": list(model.class_names),
            "model": model.name,
            "options": {"top_k": args.top_k, "threshold": args.threshold},
            "created_by": f"cdul-label {__version__}",
        }
        sink, done = open_output(
            args.out, _output_format(args), header, resume=args.resume, overwrite=args.overwrite
        )
        todo = [WorkItem(image) for image in images if image.id not in done]
        errors = open_error_log(args.out)
        labeler = BatchLabeler(
            sink,
            errors,
            args.out.parent,
            batch_size=args.batch_size,
            progress=not args.no_progress,
        )

        def call(batches: Any) -> Any:
            return client.predict_batches(
                batches,
                model=model.name,
                top_k=args.top_k,
                threshold=args.threshold,
                max_in_flight=args.concurrency,
                timeout_s=args.timeout,
                return_exceptions=True,
            )

        return _finish_run(
            args,
            labeler,
            errors,
            len(images) - len(todo),
            lambda: labeler.run(todo, call, predict_pairs, prediction_record(args.out.parent)),
        )


def _classifier_model(client: LabelerClient, name: str | None) -> ModelInfo:
    models = client.list_models()
    classifiers = [model for model in models if model.kind == "classifier"]
    if name:
        for model in models:
            if model.name == name:
                if model.kind != "classifier":
                    names = ", ".join(model.name for model in classifiers) or "none"
                    raise UsageError(
                        f"model {name!r} is a {model.kind}, not a classifier: pass one of "
                        f"{names} with --model"
                    )
                return model
        names = ", ".join(model.name for model in classifiers) or "none"
        raise UsageError(f"classifier {name!r} not found on the server: use one of {names}")
    defaults = [model for model in classifiers if model.is_default] or classifiers
    if not defaults:
        raise UsageError(
            f"the server at {client.target} serves no classifier: start it with a classifier "
            "in its model repository"
        )
    return defaults[0]


def run_search(args: argparse.Namespace) -> int:
    """`cdul-label search`."""
    if args.k < 1:
        raise UsageError(f"-k must be at least 1, got {args.k}")
    if not args.text.strip():
        raise UsageError("TEXT is empty: describe what to look for, such as 'a red car'")
    with make_client(args) as client:
        hits = client.search_crops(
            args.text, k=args.k, model=args.model or "", include_whole_images=args.whole_images
        )
    for rank, hit in enumerate(hits, start=1):
        if args.json:
            print(
                json.dumps(
                    {
                        "rank": rank,
                        "score": round(hit.score, 6),
                        "image_id": hit.image_id,
                        "content_key": hit.content_key,
                        "tile_index": hit.tile_index,
                        "grid_size": hit.grid_size,
                        "row": hit.row,
                        "col": hit.col,
                        "box": list(hit.box),
                    }
                )
            )
        else:
            view = "whole" if hit.tile_index < 0 else f"tile {hit.row},{hit.col}/{hit.grid_size}"
            x0, y0, x1, y1 = hit.box
            print(f"{rank:3d}  {hit.score:.4f}  {view:<14} [{x0},{y0},{x1},{y1}]  {hit.image_id}")
    if not hits:
        print("no hits: the server has no cached images for this model yet", file=sys.stderr)
    return EXIT_OK


def _extensions(text: str) -> list[str]:
    extensions = [part.strip() for part in text.split(",") if part.strip()]
    if not extensions:
        raise UsageError("--extensions is empty: pass suffixes such as .jpg,.png")
    return extensions


if __name__ == "__main__":
    sys.exit(main())
