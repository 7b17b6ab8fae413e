"""Run cdul's benchmarks and write the results page.

    python benchmarks/run.py --out benchmarks/RESULTS.md       # the full run, about 10 minutes
    python benchmarks/run.py --smoke --out smoke-RESULTS.md   # tiny sizes, under a minute

See ``python benchmarks/run.py --help`` for every option.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import tempfile
from pathlib import Path

from cdul_bench import corpus, hardware, report
from cdul_bench.plan import full_plan, smoke_plan
from cdul_bench.runner import Run

_logger = logging.getLogger("cdul_bench")

DEFAULT_OUT = corpus.BENCHMARKS_DIR / "RESULTS.md"
DEFAULT_WORK_DIR = corpus.BENCHMARKS_DIR / "output"
DEFAULT_ANALYSIS = corpus.BENCHMARKS_DIR / "analysis.md"
FIGURES = ("a", "b", "c", "d", "e", "f")


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    parser = argparse.ArgumentParser(
        prog="benchmarks/run.py",
        description="Measure cdul's pseudo-labeling and prediction throughput beside the "
        "baselines and the machine's matrix-multiply ceiling, and write a Markdown page.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"results page to write (default {DEFAULT_OUT.relative_to(corpus.REPOSITORY_ROOT)})",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny models and sizes that only check the harness (under a minute; default off)",
    )
    parser.add_argument(
        "--images",
        type=Path,
        default=corpus.DEFAULT_IMAGES,
        help="folder with images/ and classes.json, read in place "
        "(default ../shared/data/coco128 beside the repository)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="folder for exported models, server logs, profiles and results.json; exports found "
        "there are reused (default benchmarks/output, or a temporary folder with --smoke)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=hardware.usable_cores(),
        help="threads of torch, ONNX Runtime and BLAS (default: the usable cores, "
        f"{hardware.usable_cores()} here)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed repeats per figure, each figure being their median (default 3, 2 with --smoke)",
    )
    parser.add_argument(
        "--models",
        default=None,
        help="comma-separated CLIP models: digits-clip or open_clip names exported with random "
        "weights (default ViT-B-32,digits-clip; tiny-clip with --smoke)",
    )
    parser.add_argument(
        "--analysis",
        type=Path,
        default=DEFAULT_ANALYSIS,
        help="Markdown file with the written reading of the numbers, put into the page when it "
        "exists (default benchmarks/analysis.md)",
    )
    parser.add_argument(
        "--render",
        type=Path,
        default=None,
        help="write the page from an earlier results.json instead of measuring (default: measure)",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log every measurement (default: warnings)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; return the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.threads < 1:
        print(f"error: --threads {args.threads} must be at least 1", file=sys.stderr)
        return 2
    if args.repeats is not None and args.repeats < 1:
        print(f"error: --repeats {args.repeats} must be at least 1", file=sys.stderr)
        return 2
    analysis = args.analysis.read_text() if args.analysis and args.analysis.is_file() else ""
    if args.render:
        if not args.render.is_file():
            print(f"error: --render {args.render} not found: give a results.json", file=sys.stderr)
            return 2
        results = json.loads(args.render.read_text())
        _write(args.out, report.render(results, "" if results["mode"] == "smoke" else analysis))
        return 0
    if not (args.images / "classes.json").is_file():
        print(
            f"error: --images {args.images} has no classes.json: give the coco128 folder",
            file=sys.stderr,
        )
        return 2
    plan = smoke_plan(args.threads) if args.smoke else full_plan(args.threads, args.repeats or 3)
    if args.repeats is not None:
        plan.repeats = args.repeats
    if args.models:
        names = [name.strip() for name in args.models.split(",") if name.strip()]
        if not names:
            print(f"error: --models {args.models!r} names no model", file=sys.stderr)
            return 2
        plan.clip_models = names
        for name in names:
            _default_sizes(plan, name)
    command = shlex.join(
        ["python", "benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])]
    )
    with tempfile.TemporaryDirectory(prefix="cdul-bench-") as scratch:
        work_dir = args.work_dir or (Path(scratch) if args.smoke else DEFAULT_WORK_DIR)
        work_dir.mkdir(parents=True, exist_ok=True)
        results = Run(plan, args.images, work_dir, command).execute()
        (work_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        _write(args.out, report.render(results, "" if args.smoke else analysis))
    print(f"wrote {args.out}")
    for item in results["missing"]:
        print(f"missing ({item['figure']}) {item['what']}: {item['why'][:200]}", file=sys.stderr)
    return 0


def _default_sizes(plan: object, name: str) -> None:
    """Give a model named on the command line the sizes of ViT-B-32 unless the plan has some."""
    for table, default in (
        ("encoder_images", 4),
        ("encoder_batch_sizes", [10, 40]),
        ("server_images", {1: 4, 4: 8, 16: 16}),
        ("max_batch_sizes", [32, 10, 64]),
    ):
        getattr(plan, table).setdefault(name, default)
    if name not in ("digits-clip", "tiny-clip"):
        plan.reproduction_model.setdefault(name, name)  # type: ignore[attr-defined]


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
