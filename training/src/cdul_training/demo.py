"""The main job end to end on the embedded default: label, train, serve and evaluate.

`python -m cdul_training.demo --out demo-output` (what `make demo` runs) drives the command line
tools that a user runs, each as a child process:

1. `cdul-train scenes` writes the digit-scenes corpus (train and test splits from disjoint digit
   scans) and a separate validation corpus for model selection;
2. `cdul-server` starts with the packaged digits-clip on free ports, and `cdul-label pseudo`
   labels the training split;
3. `cdul-train fit` trains the classifier with gradient alignment and the control without label
   updates (`--update-every 0`), each for several seeds;
4. `cdul-export classifier` exports every run's best checkpoint, a second `cdul-server` serves
   them (the configuration with the higher mean validation mAP is its default classifier), and
   `cdul-label predict` scores the test split;
5. the mAPs are printed as a table and written to `<out>/summary.json`, next to the same
   pseudo-label table for the real CLIP RN50x64 scores of PASCAL VOC 2012.

Every child runs in its own process group and is stopped when the demo ends, also on Ctrl-C
(SIGINT), SIGTERM or SIGHUP, so no process outlives the demo.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from cdul_training.metrics import mean_average_precision
from cdul_training.records import (
    RecordError,
    ground_truth_matrix,
    read_ground_truth,
    read_pseudo_labels,
)

_logger = logging.getLogger(__name__)

SUMMARY_FORMAT = "cdul-demo-summary"
SUMMARY_VERSION = 1
# The repository root when this file runs from a source checkout (training/src/cdul_training).
_REPO_ROOT = Path(__file__).resolve().parents[3]
VOC_CACHE_RELATIVE = Path("..") / "shared" / "data" / "voc2012-rn50x64-cache" / "cache.npz"
# The two training configurations: the `--update-every` value passed to cdul-train fit, None
# for fit's default schedule of label updates.
CONFIGURATIONS = {"gradient_alignment": None, "control": 0}
# Classifier architectures the demo trains. clip-windows embeds the scenes with the labeling CLIP
# model; clip-linear would need embeddings in the pseudo-label records.
DEMO_ARCHS = ("clip-windows", "small-cnn", "resnet50", "resnet101")
# Per arch: default epochs and input side in pixels (None: the side that cdul-train fit takes).
DEMO_EPOCHS = {"clip-windows": 12, "small-cnn": 12, "resnet50": 12, "resnet101": 12}
# Per arch: warm-up epochs before the first label update (None: cdul-train fit's default, 5).
# The clip-windows head reaches its best validation mAP in about 5 epochs, so its labels start
# moving after 2. With a longer warm-up the best epoch of both configurations falls in it, and
# there the two runs of a seed are the same run.
DEMO_WARMUP: dict[str, int | None] = {"clip-windows": 2}
DEMO_IMAGE_SIZE: dict[str, int | None] = {
    "clip-windows": None,
    "small-cnn": 48,
    "resnet50": None,
    "resnet101": None,
}
CONFIGURATION_TITLES = {
    "gradient_alignment": "gradient alignment",
    "control": "control (no label updates)",
}
# Targets that the demo checks on digit-scenes, in mAP points.
FINAL_OVER_GLOBAL_MARGIN = 5.0
# Below this many test or validation images the table carries a note that its mAPs are noisy.
MIN_TEST_IMAGES = 100
# Folders under --out that the demo writes; a rerun replaces them.
OUTPUT_FOLDERS = (
    "scenes",
    "scenes-val",
    "labels",
    "runs",
    "models",
    "predictions",
    "plots",
    "logs",
)
MARKER_FILE = "demo.json"
STOP_GRACE_S = 10.0
_PR_SET_PDEATHSIG = 1


class DemoError(RuntimeError):
    """A stage of the demo failed; the message names the stage, the log file and the cause."""


class DemoInterrupted(BaseException):
    """SIGTERM or SIGHUP arrived; unwinds the demo like KeyboardInterrupt does."""


@dataclass
class DemoConfig:
    """Settings of one demo run; written to `<out>/demo.json` and into the summary."""

    out: str
    n_train: int = 2000
    n_test: int = 500
    n_val: int = 500
    side: int = 96
    scenes_seed: int = 0
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    arch: str = "clip-windows"
    loss: str = "bce"
    image_size: int | None = None  # None: DEMO_IMAGE_SIZE of the arch
    epochs: int | None = None  # None: DEMO_EPOCHS of the arch
    warmup: int | None = None
    label_lr: float | None = None
    batch_size: int = 32
    jobs: int = 2
    threads: int = 1
    server_threads: int = 2
    voc_cache: str | None = None
    models: str | None = None
    server_timeout_s: float = 180.0
    small: bool = False

    def validate(self) -> None:
        """Check every value, naming the bad one and the fix.

        Raises:
            ValueError: the first invalid setting.
        """
        if self.arch not in DEMO_ARCHS:
            raise ValueError(f"--arch {self.arch!r}: use one of {', '.join(DEMO_ARCHS)}")
        if self.epochs is None:
            self.epochs = DEMO_EPOCHS[self.arch]
        if self.warmup is None:
            self.warmup = DEMO_WARMUP.get(self.arch)
        if self.image_size is None:
            self.image_size = DEMO_IMAGE_SIZE[self.arch]
        elif self.arch == "clip-windows":
            raise ValueError(
                "--image-size: clip-windows takes 3 times the CLIP input side; leave it out"
            )
        for name, low in (("n_train", 1), ("n_test", 1), ("n_val", 1), ("epochs", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"--{_flag(name)} {getattr(self, name)}: use {low} or more")
        for name in ("jobs", "threads", "server_threads", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{_flag(name)} {getattr(self, name)}: use 1 or more")
        if self.side < 64:
            raise ValueError(f"--side {self.side}: use 64 or more pixels (digits-clip needs it)")
        if self.image_size is not None and self.image_size < 16:
            raise ValueError(f"--image-size {self.image_size}: use 16 or more pixels")
        if not self.seeds:
            raise ValueError("--seeds is empty: give at least one seed, such as 0,1,2")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds {self.seeds} repeats a seed: give distinct seeds")
        if self.label_lr is not None and not (math.isfinite(self.label_lr) and self.label_lr >= 0):
            raise ValueError(f"--label-lr {self.label_lr}: use a finite step of 0 or more")
        if self.models is not None and not Path(self.models).is_dir():
            raise ValueError(
                f"--models {self.models}: not a folder; pass a model repository folder"
            )
        if self.warmup is not None and self.warmup < 0:
            raise ValueError(f"--warmup {self.warmup}: use 0 or more epochs")
        if not self.server_timeout_s > 0:
            raise ValueError(f"--server-timeout-s {self.server_timeout_s}: use a positive time")


def _flag(name: str) -> str:
    return name.replace("_", "-")


# Progress and child processes -----------------------------------------------------------------


class Progress:
    """Prints one line a step, prefixed with the seconds since the demo started."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.started = time.monotonic()
        self.stream = stream if stream is not None else sys.stdout
        self.stages: list[dict[str, Any]] = []
        self._stage_started: float | None = None

    def elapsed_s(self) -> float:
        """Return the seconds since the demo started."""
        return time.monotonic() - self.started

    def line(self, message: str) -> None:
        """Print one progress line."""
        print(f"[{self.elapsed_s():7.1f} s] {message}", file=self.stream, flush=True)

    def stage(self, name: str, message: str) -> None:
        """Close the current stage, start stage `name` and print its first line."""
        self.finish_stage()
        self.stages.append({"name": name, "started_s": round(self.elapsed_s(), 2)})
        self._stage_started = time.monotonic()
        self.line(f"{name}: {message}")

    def finish_stage(self) -> None:
        """Record the duration of the current stage, if one is open."""
        if self._stage_started is not None and self.stages:
            self.stages[-1]["duration_s"] = round(time.monotonic() - self._stage_started, 2)
        self._stage_started = None


def _set_parent_death_signal() -> None:
    """In the child, ask Linux to send SIGTERM when the demo process dies (even by SIGKILL)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@dataclass
class Child:
    """A child process of the demo, the leader of its own process group."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 20) -> str:
        """Return the last lines of the child's log."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Supervisor:
    """Starts child processes, each in a new process group, and stops them all at the end.

    Stopping sends SIGTERM to each child's whole process group, waits up to `grace_s` and then
    sends SIGKILL, so helper processes that a child started go too. A child that exits by
    itself has the rest of its group killed the same way.
    """

    def __init__(self, env: Mapping[str, str] | None = None, grace_s: float = STOP_GRACE_S) -> None:
        self.env = dict(os.environ if env is None else env)
        self.grace_s = grace_s
        self.children: list[Child] = []

    def start(self, name: str, argv: Sequence[str], log_path: Path) -> Child:
        """Start `argv` with stdout and stderr going to `log_path`."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        _logger.debug("starting %s: %s", name, " ".join(argv))
        with log_path.open("ab") as log:
            log.write(f"$ {' '.join(argv)}\n".encode())
            log.flush()
            process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
                preexec_fn=_set_parent_death_signal if sys.platform == "linux" else None,
            )
        child = Child(name, process, log_path)
        self.children.append(child)
        raise_if_interrupted()
        return child

    def run(self, name: str, argv: Sequence[str], log_path: Path) -> Child:
        """Start `argv`, wait for it and raise DemoError when it fails."""
        child = self.start(name, argv, log_path)
        self.wait(child)
        return child

    def wait(self, child: Child) -> None:
        """Wait for `child` to exit; raise DemoError for a non-zero exit status."""
        returncode = child.process.wait()
        self.stop(child)
        if returncode != 0:
            raise DemoError(_failure_message(child, returncode))

    def run_parallel(
        self,
        jobs: Sequence[tuple[str, Sequence[str], Path]],
        max_parallel: int,
        on_done: Callable[[str], None] | None = None,
    ) -> None:
        """Run the jobs `(name, argv, log)` with at most `max_parallel` at once.

        Raises:
            DemoError: the first job that fails; the others are stopped.
        """
        pending = list(jobs)
        running: list[Child] = []
        while pending or running:
            while pending and len(running) < max_parallel:
                name, argv, log_path = pending.pop(0)
                running.append(self.start(name, argv, log_path))
            time.sleep(0.2)
            raise_if_interrupted()
            for child in list(running):
                returncode = child.process.poll()
                if returncode is None:
                    continue
                running.remove(child)
                self.stop(child)
                if returncode != 0:
                    self.stop_all()
                    raise DemoError(_failure_message(child, returncode))
                if on_done is not None:
                    on_done(child.name)

    def stop(self, child: Child, grace_s: float | None = None) -> int | None:
        """Stop one child's process group: SIGTERM, then SIGKILL after the grace period."""
        grace = self.grace_s if grace_s is None else grace_s
        process = child.process
        if process.poll() is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _logger.warning("%s did not stop within %.0f s; killing it", child.name, grace)
        # The leader may be gone while members of its group remain.
        _signal_group(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
        self._forget(child)
        return process.returncode

    def stop_all(self) -> list[str]:
        """Stop every child still known; return the names of those that were still running."""
        stopped = []
        for child in list(reversed(self.children)):
            if child.process.poll() is None:
                stopped.append(child.name)
            self.stop(child)
        return stopped

    def _forget(self, child: Child) -> None:
        if child in self.children:
            self.children.remove(child)


def _signal_group(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)


def _failure_message(child: Child, returncode: int) -> str:
    tail = child.log_tail(8)
    return f"{child.name} failed with exit status {returncode}; its log is {child.log_path}" + (
        f":\n{tail}" if tail else ""
    )


# Names of the signals that arrived while `termination_signals` was active.
_RECEIVED_SIGNALS: list[str] = []


def _raise_for_signal(name: str) -> None:
    if name == "SIGINT":
        raise KeyboardInterrupt
    raise DemoInterrupted(name)


def raise_if_interrupted() -> None:
    """Raise for a signal whose exception was lost, such as one that arrived during a fork.

    Python ignores an exception raised by a signal handler inside an at-fork callback (logging
    registers one), so a Ctrl-C while a child starts would otherwise be dropped.
    """
    if _RECEIVED_SIGNALS:
        _raise_for_signal(_RECEIVED_SIGNALS[0])


@contextlib.contextmanager
def termination_signals() -> Iterator[None]:
    """Turn SIGINT, SIGTERM and SIGHUP into exceptions while the block runs (main thread only).

    SIGINT raises KeyboardInterrupt (unless it was ignored when the block started), the others
    DemoInterrupted. Each signal is also recorded for :func:`raise_if_interrupted`.
    """

    def handler(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        _RECEIVED_SIGNALS.append(name)
        _raise_for_signal(name)

    _RECEIVED_SIGNALS.clear()
    signums = [signal.SIGTERM, signal.SIGHUP]
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signums.append(signal.SIGINT)
    previous = {signum: signal.signal(signum, handler) for signum in signums}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


# Commands ----------------------------------------------------------------------------------


def tool_command(name: str) -> list[str]:
    """Return the argv prefix of a console script: the one beside this Python, else on PATH.

    Raises:
        DemoError: the tool is not installed.
    """
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which(name)
    if found:
        return [found]
    raise DemoError(
        f"the command {name} is not installed: run `make install` (or pip install -e the "
        "five distributions) first"
    )


def default_voc_cache() -> Path:
    """Return the VOC score cache beside the checkout: `../shared/data/...` from the root.

    The repository root is found from this file in a source checkout, else the current folder.
    """
    for root in (_REPO_ROOT, Path.cwd()):
        candidate = root / VOC_CACHE_RELATIVE
        if candidate.is_file():
            return candidate
    return Path.cwd() / VOC_CACHE_RELATIVE


@dataclass(frozen=True)
class Layout:
    """The paths of one demo run under `--out`."""

    out: Path

    @property
    def scenes(self) -> Path:
        return self.out / "scenes"

    @property
    def scenes_val(self) -> Path:
        return self.out / "scenes-val"

    @property
    def labels(self) -> Path:
        return self.out / "labels"

    @property
    def train_labels(self) -> Path:
        return self.labels / "train.jsonl"

    @property
    def runs(self) -> Path:
        return self.out / "runs"

    @property
    def models(self) -> Path:
        return self.out / "models"

    @property
    def predictions(self) -> Path:
        return self.out / "predictions"

    @property
    def plots(self) -> Path:
        return self.out / "plots"

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    @property
    def summary(self) -> Path:
        return self.out / "summary.json"

    def run_dir(self, configuration: str, seed: int) -> Path:
        return self.runs / f"{configuration}-seed{seed}"

    def model_name(self, configuration: str, seed: int) -> str:
        return f"digit-scenes-{configuration.replace('_', '-')}-seed{seed}"


def prepare_output(out: Path) -> None:
    """Create `out`, replacing the folders of an earlier demo run there.

    Raises:
        DemoError: `out` is a file, or a non-empty folder that the demo did not write.
    """
    if out.exists() and not out.is_dir():
        raise DemoError(f"--out {out} is a file: give a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER_FILE).is_file():
        raise DemoError(
            f"--out {out} is a non-empty folder that the demo did not write: give a new or "
            "empty folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUT_FOLDERS:
        shutil.rmtree(out / name, ignore_errors=True)
    (out / "summary.json").unlink(missing_ok=True)


# Evaluation -------------------------------------------------------------------------------


def _truth_for(classes: Sequence[str], ids: Sequence[str], ground_truth: Path) -> np.ndarray:
    gt_classes, gt_labels = read_ground_truth(ground_truth)
    return ground_truth_matrix(classes, ids, gt_classes, gt_labels, str(ground_truth))


def pseudo_label_maps(label_file: Path, ground_truth: Path) -> dict[str, Any]:
    """Return the mAP (percent) of the global, aggregate and final scores of a label file."""
    pseudo = read_pseudo_labels(label_file)
    truth = _truth_for(pseudo.classes, pseudo.ids, ground_truth)
    result: dict[str, Any] = {"n_records": len(pseudo.ids)}
    for key in ("global", "aggregate", "final"):
        result[key] = mean_average_precision(pseudo.labels(key), truth).map
    return result


def refined_label_map(label_file: Path, ground_truth: Path) -> float:
    """Return the mAP (percent) of the `final` labels of a refined pseudo-label file."""
    pseudo = read_pseudo_labels(label_file)
    truth = _truth_for(pseudo.classes, pseudo.ids, ground_truth)
    return mean_average_precision(pseudo.labels("final"), truth).map


def read_predictions(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """Read a `cdul-label predict` output: (class names, image ids, scores (N, C)).

    Raises:
        DemoError: the file is missing, has no header with `classes`, or a record has no
            `scores` of the header's length.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise DemoError(f"cannot read the predictions {path}: {err}") from err
    objects = [json.loads(line) for line in lines if line.strip()]
    if not objects or objects[0].get("type") != "header" or "classes" not in objects[0]:
        raise DemoError(f"{path}: the first line is not a header with 'classes'")
    classes = [str(name) for name in objects[0]["classes"]]
    ids, rows = [], []
    for record in objects[1:]:
        scores = record.get("scores")
        if not isinstance(scores, list) or len(scores) != len(classes):
            raise DemoError(
                f"{path}: record {record.get('id')!r} has no 'scores' list of {len(classes)} values"
            )
        ids.append(str(record["id"]))
        rows.append(scores)
    return classes, ids, np.asarray(rows, dtype=np.float64).reshape(len(ids), len(classes))


def prediction_map(path: Path, ground_truth: Path) -> dict[str, Any]:
    """Return the test mAP (percent) and record count of a predictions file."""
    classes, ids, scores = read_predictions(path)
    truth = _truth_for(classes, ids, ground_truth)
    return {"n_records": len(ids), "test_map": mean_average_precision(scores, truth).map}


def best_validation(run_dir: Path) -> dict[str, Any]:
    """Return the best validation mAP of a `cdul-train fit` run and its epoch.

    Raises:
        DemoError: the run has no metrics.jsonl or no validation mAP in it.
    """
    path = run_dir / "metrics.jsonl"
    try:
        history = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except OSError as err:
        raise DemoError(f"cannot read the metrics of the run {run_dir}: {err}") from err
    scored = [e for e in history if isinstance(e.get("val_map"), int | float)]
    if not scored:
        raise DemoError(f"{path}: no epoch has a val_map; the run needs --val-images")
    best = max(scored, key=lambda entry: entry["val_map"])
    return {"best_val_map": float(best["val_map"]), "best_epoch": int(best["epoch"])}


def seed_statistics(values: Sequence[float]) -> dict[str, float | None]:
    """Return the mean and the sample standard deviation (n - 1) of per-seed values.

    The standard deviation is None for a single seed.
    """
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return {"mean": None, "std": None}
    std = float(array.std(ddof=1)) if array.size > 1 else None
    return {"mean": float(array.mean()), "std": std}


def select_run(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> tuple[str, int]:
    """Pick the configuration with the higher mean best validation mAP, then its best seed.

    Args:
        runs: per configuration, one mapping per seed with `seed` and `best_val_map`.

    Returns:
        (configuration, seed). Ties go to the first configuration and the first seed listed.
    """
    means = {
        name: float(np.mean([r["best_val_map"] for r in entries]))
        for name, entries in runs.items()
        if entries
    }
    if not means:
        raise ValueError("no finished runs to choose from")
    configuration = max(means, key=lambda name: means[name])
    best = max(runs[configuration], key=lambda r: r["best_val_map"])
    return configuration, int(best["seed"])


def voc_pseudo_label_maps(cache_path: Path) -> dict[str, Any]:
    """Return the pseudo-label mAP of the VOC score cache at threshold 0 and lambda 0.

    Raises:
        DemoError: the cache cannot be read.
    """
    from cdul_training.cache_eval import evaluate, load_cache
    from cdul_training.cli import UsageError

    try:
        cache = load_cache(cache_path)
    except UsageError as err:
        raise DemoError(str(err)) from err
    report = evaluate(cache, [0.0], [0.0])
    return {
        "n_records": report["n_images"],
        "global": report["global"],
        "aggregate": report["aggregate"]["0"],
        "final": report["final"]["0"],
    }


def check_targets(digit_scenes: Mapping[str, Any]) -> dict[str, Any]:
    """Evaluate the two targets on digit-scenes; a target with a missing number does not hold."""
    pseudo = digit_scenes["pseudo_labels"]
    selected = digit_scenes["classifier"].get("selected") or {}
    margin = pseudo["final"] - pseudo["global"]
    best_test = selected.get("test_map")
    return {
        "final_beats_global": {
            "holds": bool(margin >= FINAL_OVER_GLOBAL_MARGIN),
            "required_margin": FINAL_OVER_GLOBAL_MARGIN,
            "margin": margin,
            "final": pseudo["final"],
            "global": pseudo["global"],
        },
        "classifier_reaches_final_pseudo_labels": {
            "holds": bool(best_test is not None and best_test >= pseudo["final"]),
            "best_test_map": best_test,
            "final_train_map": pseudo["final"],
        },
    }


# Table -------------------------------------------------------------------------------------


def _number(value: float | None) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else (f"{value:.2f}")
    )


def _mean_std(stats: Mapping[str, Any] | None) -> str:
    if not stats or stats.get("mean") is None:
        return "n/a"
    if stats.get("std") is None:
        return f"{stats['mean']:.2f}"
    return f"{stats['mean']:.2f} ± {stats['std']:.2f}"


def table_rows(summary: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """Return the rows (quantity, digit-scenes, VOC 2012) of the results table."""
    scenes = summary["digit_scenes"]
    voc = summary.get("voc2012_rn50x64") or {}
    voc_pseudo = voc.get("pseudo_labels") or {}
    n_seeds = len(summary["settings"]["seeds"])
    seeds = f"{n_seeds} seed" + ("" if n_seeds == 1 else "s")
    rows = [
        ("pseudo labels, train split: global scores", "global"),
        ("pseudo labels, train split: aggregate", "aggregate"),
        ("pseudo labels, train split: final (initial)", "final"),
    ]
    out = [
        (title, _number(scenes["pseudo_labels"][key]), _number(voc_pseudo.get(key)))
        for title, key in rows
    ]
    classifier = scenes["classifier"]
    for name in CONFIGURATIONS:
        out.append(
            (
                f"classifier test mAP, {CONFIGURATION_TITLES[name]} ({seeds})",
                _mean_std(classifier[name]["test_map"]),
                "n/a",
            )
        )
    for name in CONFIGURATIONS:
        out.append(
            (
                f"pseudo labels after refinement, {CONFIGURATION_TITLES[name]}",
                _mean_std(classifier[name]["refined_pseudo_label_map"]),
                "n/a",
            )
        )
    selected = classifier.get("selected") or {}
    if selected:
        out.append(
            (
                f"selected classifier test mAP ({CONFIGURATION_TITLES[selected['configuration']]}"
                f", seed {selected['seed']})",
                _number(selected.get("test_map")),
                "n/a",
            )
        )
    return out


def _image_size_text(settings: Mapping[str, Any]) -> str:
    if settings["arch"] == "clip-windows":
        return " (35 windows of each image embedded by the labeling CLIP)"
    return f" at {settings['image_size']} px" if settings.get("image_size") else ""


def format_summary(summary: Mapping[str, Any]) -> str:
    """Lay the summary out as the demo's closing report: table, targets and outputs."""
    settings = summary["settings"]
    rows = table_rows(summary)
    header = ("mAP (%)", "digit-scenes", "VOC 2012 train, RN50x64")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    lines = [
        f"digit-scenes: {settings['n_train']} train, {settings['n_test']} test and "
        f"{settings['n_val']} validation images of side {settings['side']} px, labeled by "
        f"digits-clip; classifier {settings['arch']}{_image_size_text(settings)}, "
        f"{settings['epochs']} epochs",
        "",
        line(header),
        "| " + " | ".join("-" * w for w in widths) + " |",
        *(line(row) for row in rows),
        "",
    ]
    voc = summary.get("voc2012_rn50x64") or {}
    if voc.get("note"):
        lines.append(f"VOC 2012: {voc['note']}")
    targets = summary["targets"]
    first = targets["final_beats_global"]
    second = targets["classifier_reaches_final_pseudo_labels"]
    lines += [
        f"target: final pseudo labels beat the global scores by >= {first['required_margin']:g} "
        f"mAP: {'met' if first['holds'] else 'NOT met'} ({first['margin']:+.2f})",
        f"target: best classifier test mAP >= final pseudo labels' train mAP: "
        f"{'met' if second['holds'] else 'NOT met'} ({_number(second['best_test_map'])} vs "
        f"{_number(second['final_train_map'])})",
        "",
    ]
    if settings["n_test"] < MIN_TEST_IMAGES or settings["n_val"] < MIN_TEST_IMAGES:
        lines += [
            f"note: with {settings['n_test']} test and {settings['n_val']} validation images the "
            f"mAPs are too noisy to judge the targets; use {MIN_TEST_IMAGES} or more of each",
            "",
        ]
    lines += [f"{name}: {path}" for name, path in summary["outputs"].items()]
    lines.append(f"wall time: {summary['wall_time_s']:.1f} s")
    return "\n".join(lines)


def plot_summary(summary: Mapping[str, Any], out: Path) -> Path:
    """Draw the digit-scenes mAPs as a bar chart (error bars: std over seeds) at `out`.

    Bars: the pseudo labels on the train split, then per configuration ("alignment" for
    gradient alignment) the classifier's test mAP and the refined pseudo labels.
    """
    from cdul_training.plots import plt

    scenes = summary["digit_scenes"]
    pseudo = scenes["pseudo_labels"]
    classifier = scenes["classifier"]
    names = ["global", "aggregate", "final"]
    values = [pseudo[key] for key in names]
    errors = [0.0, 0.0, 0.0]
    for name in CONFIGURATIONS:
        for key, label in (("test_map", "test"), ("refined_pseudo_label_map", "refined")):
            stats = classifier[name][key]
            names.append(f"{label}\n{name.split('_')[-1]}")
            values.append(stats["mean"] if stats["mean"] is not None else math.nan)
            errors.append(stats["std"] or 0.0)
    figure, axes = plt.subplots(figsize=(9, 4))
    colors = ["#8da0cb"] * 3 + ["#66c2a5", "#fc8d62"] * len(CONFIGURATIONS)
    bars = axes.bar(range(len(names)), values, yerr=errors, color=colors, capsize=4)
    axes.bar_label(bars, fmt="%.1f", padding=2, fontsize="small")
    axes.set_xticks(range(len(names)), names, fontsize="small")
    axes.set_ylabel("mAP (%)")
    axes.set_ylim(0, 100)
    axes.set_title("digit-scenes: pseudo labels (train) and classifiers (test)")
    axes.grid(True, axis="y", alpha=0.3)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


# Pipeline ----------------------------------------------------------------------------------


@dataclass
class ServerHandle:
    """A running `cdul-server` child and its bound ports."""

    child: Child
    port: int
    metrics_port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


def _read_port(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def wait_serving(target: str, deadline: float, child: Child | None = None) -> None:
    """Poll the gRPC health service of `target` until it reports SERVING.

    Raises:
        DemoError: the deadline (a `time.monotonic` value) passed, or `child` exited.
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    serving = health_pb2.HealthCheckResponse.SERVING
    status = None
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if child is not None and child.process.poll() is not None:
                raise DemoError(_failure_message(child, child.process.returncode))
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0).status
            except grpc.RpcError:
                status = None
            if status == serving:
                return
            time.sleep(0.2)
    raise DemoError(f"the server at {target} did not report SERVING in time (last: {status})")


def command(tool: str, *arguments: str, **options: object) -> list[str]:
    """Build an argv: the tool, its positional arguments, then `--name value` per option.

    Option names take dashes for underscores; None leaves an option out and True gives a bare
    flag.
    """
    argv = [*tool_command(tool), *arguments]
    for name, value in options.items():
        if value is None or value is False:
            continue
        argv.append(f"--{_flag(name)}")
        if value is not True:
            argv.append(str(value))
    return argv


def start_server(
    supervisor: Supervisor,
    layout: Layout,
    name: str,
    config: DemoConfig,
    **options: object,
) -> ServerHandle:
    """Start `cdul-server` on free ports (port 0) and wait until health reports SERVING.

    Args:
        supervisor: starts the server process.
        layout: where the log and the port files go.
        name: the server's name in logs and messages.
        config: the demo settings (threads, timeout).
        options: further `cdul-server` options, such as `models` and `classifier`.

    Raises:
        DemoError: the server exited or did not report SERVING within the timeout.
    """
    port_file = layout.logs / f"{name}.port"
    metrics_file = layout.logs / f"{name}.metrics-port"
    for path in (port_file, metrics_file):
        path.unlink(missing_ok=True)
    argv = command(
        "cdul-server",
        host="127.0.0.1",
        port=0,
        port_file=port_file,
        metrics_port=0,
        metrics_port_file=metrics_file,
        threads=config.server_threads,
        grace_s=5,
        **options,
    )
    child = supervisor.start(name, argv, layout.logs / f"{name}.log")
    deadline = time.monotonic() + config.server_timeout_s
    try:
        port = _wait_for_port(child, port_file, deadline)
        wait_serving(f"127.0.0.1:{port}", deadline, child)
    except DemoError:
        supervisor.stop(child)
        raise
    return ServerHandle(child, port, _read_port(metrics_file) or 0)


def _wait_for_port(child: Child, port_file: Path, deadline: float) -> int:
    while time.monotonic() < deadline:
        if child.process.poll() is not None:
            raise DemoError(_failure_message(child, child.process.returncode))
        port = _read_port(port_file)
        if port is not None:
            return port
        time.sleep(0.2)
    raise DemoError(f"{child.name} wrote no port file in time; its log is {child.log_path}")


def stop_server(supervisor: Supervisor, server: ServerHandle) -> None:
    """Stop a server with SIGTERM, on which it drains its calls and exits 0."""
    returncode = supervisor.stop(server.child)
    if returncode != 0:
        _logger.warning(
            "%s exited with status %s on SIGTERM; see %s",
            server.child.name,
            returncode,
            server.child.log_path,
        )


def write_scenes(config: DemoConfig, layout: Layout, supervisor: Supervisor) -> None:
    """Write the train and test splits and the validation corpus with `cdul-train scenes`."""
    # NOTE: the validation corpus is a second draw from the training scans (seed + 1), so the
    # test split stays the only data from held-out scans.
    jobs = [
        (
            "cdul-train scenes",
            command(
                "cdul-train",
                "scenes",
                out=layout.scenes,
                n_train=config.n_train,
                n_test=config.n_test,
                side=config.side,
                seed=config.scenes_seed,
            ),
            layout.logs / "scenes.log",
        ),
        (
            "cdul-train scenes (validation)",
            command(
                "cdul-train",
                "scenes",
                out=layout.scenes_val,
                n_train=config.n_val,
                n_test=0,
                side=config.side,
                seed=config.scenes_seed + 1,
            ),
            layout.logs / "scenes-val.log",
        ),
    ]
    supervisor.run_parallel(jobs, config.jobs)


def label_training_split(
    config: DemoConfig,
    layout: Layout,
    supervisor: Supervisor,
    progress: Progress,
    models: Path | None,
) -> None:
    """Serve digits-clip and write the pseudo labels of the training split with cdul-label."""
    from cdul_training.scenes import CLASS_NAMES

    progress.stage("server", "starting cdul-server with the embedded digits-clip on a free port")
    server = start_server(supervisor, layout, "cdul-server-labeling", config, models=models)
    progress.line(
        f"server: SERVING on {server.target} (pid {server.child.process.pid}, metrics port "
        f"{server.metrics_port})"
    )
    try:
        progress.stage("pseudo", f"labeling {config.n_train} training images with cdul-label")
        layout.labels.mkdir(parents=True, exist_ok=True)
        classes_file = layout.labels / "classes.json"
        classes_file.write_text(json.dumps(list(CLASS_NAMES)) + "\n")
        argv = command(
            "cdul-label",
            "pseudo",
            str(layout.scenes / "train"),
            server=server.target,
            classes=classes_file,
            out=layout.train_labels,
            no_progress=True,
        )
        supervisor.run("cdul-label pseudo", argv, layout.logs / "label-pseudo.log")
    finally:
        stop_server(supervisor, server)
        progress.line(f"server: stopped (exit status {server.child.process.returncode})")


def labeling_clip_folder(config: DemoConfig, layout: Layout) -> Path:
    """Return the folder of the CLIP model that labeled the training split.

    Its name is the `model` of the pseudo-label header, in the labeling server's repository.
    """
    from cdul_server.model_repository import DEFAULT_MODEL_REPOSITORY

    header = read_pseudo_labels(layout.train_labels).header
    name = str(header.get("model") or "")
    repository = Path(config.models) if config.models else DEFAULT_MODEL_REPOSITORY
    folder = repository / name
    if not name or not (folder / "config.json").is_file():
        raise DemoError(
            f"{layout.train_labels} names the CLIP model {name!r}, which is not a folder of "
            f"{repository}: pass the labeling repository with --models"
        )
    return folder.resolve()


def fit_command(
    config: DemoConfig,
    layout: Layout,
    configuration: str,
    seed: int,
    clip_model: Path | None = None,
) -> list[str]:
    """Return the `cdul-train fit` argv of one configuration and seed.

    `clip_model` is the CLIP folder that clip-windows embeds the images with.
    """
    return command(
        "cdul-train",
        "fit",
        images=layout.scenes / "train",
        pseudo_labels=layout.train_labels,
        out=layout.run_dir(configuration, seed),
        train_labels=layout.scenes / "train-labels.json",
        val_images=layout.scenes_val / "train",
        val_labels=layout.scenes_val / "train-labels.json",
        arch=config.arch,
        loss=config.loss,
        image_size=config.image_size,
        clip_model=clip_model,
        epochs=config.epochs,
        batch_size=config.batch_size,
        seed=seed,
        threads=config.threads,
        update_every=CONFIGURATIONS[configuration],
        warmup=config.warmup,
        label_lr=config.label_lr,
    )


def train_classifiers(
    config: DemoConfig, layout: Layout, supervisor: Supervisor, progress: Progress
) -> dict[str, list[dict[str, Any]]]:
    """Train every configuration and seed; return per configuration one entry a seed."""
    runs = [(name, seed) for seed in config.seeds for name in CONFIGURATIONS]
    progress.stage(
        "fit",
        f"training {len(runs)} classifiers ({config.arch}, {config.epochs} epochs; gradient "
        f"alignment and control, seeds {config.seeds}), {config.jobs} at a time",
    )
    clip_model = labeling_clip_folder(config, layout) if config.arch == "clip-windows" else None
    jobs = [
        (
            f"cdul-train fit {name} seed {seed}",
            fit_command(config, layout, name, seed, clip_model),
            layout.logs / f"fit-{name}-seed{seed}.log",
        )
        for name, seed in runs
    ]
    supervisor.run_parallel(jobs, config.jobs, lambda name: progress.line(f"fit: {name} done"))

    train_truth = layout.scenes / "train-labels.json"
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIGURATIONS}
    for name, seed in runs:
        run_dir = layout.run_dir(name, seed)
        entry: dict[str, Any] = {"seed": seed, "run_dir": str(run_dir)}
        entry |= best_validation(run_dir)
        entry["refined_pseudo_label_map"] = refined_label_map(
            run_dir / "pseudo_labels.refined.jsonl", train_truth
        )
        entry["model"] = layout.model_name(name, seed)
        results[name].append(entry)
    supervisor.run(
        "cdul-train compare",
        command(
            "cdul-train",
            "compare",
            *(str(layout.run_dir(name, seed)) for name, seed in runs),
            out=layout.plots / "runs.png",
        ),
        layout.logs / "compare.log",
    )
    return results


def export_and_predict(
    config: DemoConfig,
    layout: Layout,
    supervisor: Supervisor,
    progress: Progress,
    results: dict[str, list[dict[str, Any]]],
    selected_model: str,
) -> None:
    """Export every run, serve the classifiers and score the test split with cdul-label.

    Adds `test_map` and `n_predictions` to each entry of `results`.
    """
    entries = [entry for runs in results.values() for entry in runs]
    progress.stage("export", f"exporting {len(entries)} classifiers with cdul-export")
    jobs = [
        (
            f"cdul-export classifier {entry['model']}",
            command(
                "cdul-export",
                "classifier",
                checkpoint=Path(entry["run_dir"]) / "best.pt",
                out=layout.models / entry["model"],
                threads=config.threads,
            ),
            layout.logs / f"export-{entry['model']}.log",
        )
        for entry in entries
    ]
    supervisor.run_parallel(jobs, config.jobs)

    progress.stage("predict", f"serving the classifiers; the default is {selected_model}")
    server = start_server(
        supervisor,
        layout,
        "cdul-server-predict",
        config,
        models=layout.models,
        classifier=selected_model,
    )
    progress.line(f"predict: SERVING on {server.target} (pid {server.child.process.pid})")
    layout.predictions.mkdir(parents=True, exist_ok=True)
    try:
        for entry in entries:
            model = entry["model"]
            # The selected classifier is the server's default, so it is scored without --model.
            argv = command(
                "cdul-label",
                "predict",
                str(layout.scenes / "test"),
                server=server.target,
                model=None if model == selected_model else model,
                out=layout.predictions / f"{model}.jsonl",
                no_progress=True,
            )
            supervisor.run(f"cdul-label predict {model}", argv, layout.logs / "predict.log")
    finally:
        stop_server(supervisor, server)
        progress.line(f"predict: server stopped (exit status {server.child.process.returncode})")

    test_truth = layout.scenes / "test-labels.json"
    for entry in entries:
        scored = prediction_map(layout.predictions / f"{entry['model']}.jsonl", test_truth)
        entry["test_map"] = scored["test_map"]
        entry["n_predictions"] = scored["n_records"]


def summarize_classifiers(
    results: dict[str, list[dict[str, Any]]], selected: tuple[str, int], layout: Layout
) -> dict[str, Any]:
    """Return the classifier part of the summary: per configuration, mean and std over seeds."""
    classifier: dict[str, Any] = {}
    for name, entries in results.items():
        classifier[name] = {
            "runs": entries,
            **{
                key: seed_statistics([entry[key] for entry in entries])
                for key in ("test_map", "best_val_map", "refined_pseudo_label_map")
            },
        }
    name, seed = selected
    chosen = next(entry for entry in results[name] if entry["seed"] == seed)
    classifier["selected"] = {
        "configuration": name,
        "seed": seed,
        "model": chosen["model"],
        "model_dir": str(layout.models / chosen["model"]),
        "best_val_map": chosen["best_val_map"],
        "test_map": chosen["test_map"],
    }
    return classifier


def run_pipeline(config: DemoConfig, supervisor: Supervisor, progress: Progress) -> dict[str, Any]:
    """Run every stage and return the summary; see the module docstring.

    Args:
        config: the demo's settings.
        supervisor: starts and, at the end, stops the child processes.
        progress: prints the progress lines and records the stage times.

    Raises:
        DemoError: a stage failed.
    """
    layout = Layout(Path(config.out))
    prepare_output(layout.out)
    (layout.out / MARKER_FILE).write_text(json.dumps(asdict(config), indent=2) + "\n")
    layout.logs.mkdir(parents=True, exist_ok=True)

    progress.stage(
        "scenes",
        f"writing {config.n_train} train, {config.n_test} test and {config.n_val} validation "
        f"images of side {config.side} to {layout.scenes}",
    )
    write_scenes(config, layout, supervisor)

    models = Path(config.models) if config.models else None
    label_training_split(config, layout, supervisor, progress, models)
    pseudo = pseudo_label_maps(layout.train_labels, layout.scenes / "train-labels.json")
    progress.line(
        f"pseudo: {pseudo['n_records']} records; train mAP global {pseudo['global']:.2f}, "
        f"aggregate {pseudo['aggregate']:.2f}, final {pseudo['final']:.2f}"
    )

    results = train_classifiers(config, layout, supervisor, progress)
    selected = select_run(results)
    selected_model = layout.model_name(*selected)
    progress.line(
        f"fit: {CONFIGURATION_TITLES[selected[0]]} has the higher mean validation mAP; its "
        f"best seed is {selected[1]}"
    )
    export_and_predict(config, layout, supervisor, progress, results, selected_model)
    classifier = summarize_classifiers(results, selected, layout)
    for name in CONFIGURATIONS:
        progress.line(
            f"predict: {CONFIGURATION_TITLES[name]} test mAP "
            f"{_mean_std(classifier[name]['test_map'])}"
        )

    progress.stage("voc", "pseudo-label mAP of the real CLIP RN50x64 scores of VOC 2012")
    voc = evaluate_voc(Path(config.voc_cache) if config.voc_cache else default_voc_cache())
    progress.finish_stage()

    digit_scenes = {
        "n_train": config.n_train,
        "n_test": config.n_test,
        "n_val": config.n_val,
        "side": config.side,
        "pseudo_labels": pseudo,
        "classifier": classifier,
    }
    summary: dict[str, Any] = {
        "format": SUMMARY_FORMAT,
        "version": SUMMARY_VERSION,
        "settings": asdict(config),
        "digit_scenes": digit_scenes,
        "voc2012_rn50x64": voc,
        "targets": check_targets(digit_scenes),
        "outputs": {
            "scenes": str(layout.scenes),
            "validation scenes": str(layout.scenes_val),
            "pseudo labels": str(layout.train_labels),
            "training runs": str(layout.runs),
            "models": str(layout.models),
            "selected model": classifier["selected"]["model_dir"],
            "predictions": str(layout.predictions),
            "plots": str(layout.plots),
            "logs": str(layout.logs),
            "summary": str(layout.summary),
        },
        "stages": progress.stages,
    }
    plot_summary(summary, layout.plots / "summary.png")
    summary["wall_time_s"] = round(progress.elapsed_s(), 2)
    return summary


def evaluate_voc(cache_path: Path) -> dict[str, Any]:
    """Return the VOC part of the summary; a missing cache gives nulls and a note."""
    result: dict[str, Any] = {"cache": str(cache_path), "classifier": None}
    if not cache_path.is_file():
        result["pseudo_labels"] = None
        result["note"] = (
            f"score cache not found at {cache_path}: pass --voc-cache; the VOC column is empty"
        )
        return result
    result["pseudo_labels"] = voc_pseudo_label_maps(cache_path)
    result["note"] = (
        "the cache holds CLIP scores only (no images or embeddings), so no classifier is "
        "trained on it; scores as the public reproduction computed them (threshold 0, lambda 0)"
    )
    return result


# Command line ------------------------------------------------------------------------------

SMALL = {
    "n_train": 40,
    "n_test": 20,
    "n_val": 20,
    "side": 64,
    "seeds": [0, 1],
    "epochs": 2,
    "warmup": 0,
    "batch_size": 16,
}


def build_parser() -> argparse.ArgumentParser:
    """Build the parser of `python -m cdul_training.demo`."""
    d = DemoConfig(out="")
    parser = argparse.ArgumentParser(
        prog="python -m cdul_training.demo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="output folder (required); a folder that an earlier demo wrote is replaced",
    )
    small = ", ".join(f"{key}={value}" for key, value in SMALL.items())
    parser.add_argument(
        "--small",
        action="store_true",
        help=f"tiny sizes for a quick check of the pipeline ({small}); explicit options win",
    )

    corpus = parser.add_argument_group("corpus")
    corpus.add_argument(
        "--n-train", type=int, metavar="N", help=f"training images (default {d.n_train})"
    )
    corpus.add_argument("--n-test", type=int, metavar="N", help=f"test images (default {d.n_test})")
    corpus.add_argument(
        "--n-val",
        type=int,
        metavar="N",
        help=f"validation images, for choosing the exported classifier (default {d.n_val})",
    )
    corpus.add_argument(
        "--side", type=int, metavar="PIXELS", help=f"canvas side in pixels (default {d.side})"
    )
    corpus.add_argument(
        "--scenes-seed",
        type=int,
        default=d.scenes_seed,
        metavar="SEED",
        help=f"seed of the corpus; the validation corpus uses SEED + 1 (default {d.scenes_seed})",
    )

    training = parser.add_argument_group("training")
    training.add_argument(
        "--seeds",
        metavar="LIST",
        help=f"comma-separated training seeds, one run per configuration and seed (default "
        f"{','.join(map(str, d.seeds))})",
    )
    training.add_argument(
        "--arch",
        default=d.arch,
        choices=DEMO_ARCHS,
        help=f"classifier architecture of cdul-train fit (default {d.arch}: a head on the "
        "frozen labeling CLIP's embeddings of image windows; small-cnn trains from pixels)",
    )
    training.add_argument(
        "--loss",
        default=d.loss,
        choices=("bce", "kl"),
        help=f"loss of cdul-train fit: bce (sigmoid outputs) or kl (softmax) (default {d.loss})",
    )
    training.add_argument(
        "--image-size",
        type=int,
        metavar="PIXELS",
        help="classifier input side in pixels (default 48 for small-cnn, cdul-train fit's "
        "default for ResNets; clip-windows takes 3 times the CLIP input side)",
    )
    epochs = ", ".join(f"{arch} {n}" for arch, n in DEMO_EPOCHS.items())
    training.add_argument("--epochs", type=int, help=f"training epochs (default: {epochs})")
    training.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        help=f"images per training step (default {d.batch_size})",
    )
    training.add_argument(
        "--warmup",
        type=int,
        metavar="EPOCHS",
        help="epochs before the first label update (default 2 for clip-windows, cdul-train "
        "fit's default of 5 otherwise)",
    )
    training.add_argument(
        "--label-lr",
        type=float,
        metavar="STEP",
        help="label step size of gradient alignment (default: cdul-train fit's default)",
    )

    runtime = parser.add_argument_group("runtime")
    runtime.add_argument(
        "--jobs",
        type=int,
        default=d.jobs,
        metavar="N",
        help=f"training and export processes run at once (default {d.jobs})",
    )
    runtime.add_argument(
        "--threads",
        type=int,
        default=d.threads,
        metavar="N",
        help=f"torch threads of each training and export process (default {d.threads})",
    )
    runtime.add_argument(
        "--server-threads",
        type=int,
        default=d.server_threads,
        metavar="N",
        help=f"ONNX Runtime threads of the servers (default {d.server_threads})",
    )
    runtime.add_argument(
        "--server-timeout-s",
        type=float,
        default=d.server_timeout_s,
        metavar="S",
        help=f"seconds a server may take to report SERVING (default {d.server_timeout_s:g})",
    )
    runtime.add_argument(
        "--models",
        metavar="DIR",
        help="model repository of the labeling server (default: the one packaged with "
        "cdul-server, which contains digits-clip)",
    )

    parser.add_argument(
        "--voc-cache",
        default=str(VOC_CACHE_RELATIVE),
        metavar="FILE",
        help="score cache of the real CLIP RN50x64 outputs for VOC 2012; a relative path is "
        "looked up from the repository root, then the current folder (default %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        default="WARNING",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="logging level of the demo itself (default WARNING)",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """Build the settings: defaults, then `--small`, then explicit options.

    Raises:
        ValueError: an invalid value.
    """
    values: dict[str, Any] = {"out": args.out, "small": args.small}
    if args.small:
        values |= SMALL
    optional = ("n_train", "n_test", "n_val", "side", "image_size", "epochs", "batch_size")
    for name in (*optional, "warmup", "label_lr"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.seeds is not None:
        try:
            values["seeds"] = [int(item) for item in args.seeds.split(",")]
        except ValueError:
            raise ValueError(
                f"--seeds {args.seeds!r}: give comma-separated integers, such as 0,1,2"
            ) from None
    runtime = ("jobs", "threads", "server_threads", "server_timeout_s")
    for name in ("scenes_seed", "arch", "loss", *runtime):
        values[name] = getattr(args, name)
    voc_cache = _resolve_voc_cache(args.voc_cache)
    if args.voc_cache != str(VOC_CACHE_RELATIVE) and not voc_cache.is_file():
        raise ValueError(
            f"--voc-cache {args.voc_cache}: file not found; pass the cache.npz of "
            "voc2012-rn50x64-cache or leave the option out"
        )
    values["voc_cache"] = str(voc_cache)
    values["models"] = args.models
    config = DemoConfig(**values)
    config.validate()
    return config


def _resolve_voc_cache(text: str) -> Path:
    path = Path(text)
    if path.is_absolute() or path.is_file():
        return path
    if path == VOC_CACHE_RELATIVE:
        return default_voc_cache()
    return _REPO_ROOT / path if (_REPO_ROOT / path).is_file() else path


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo and return its exit status.

    The status is 0 when the demo finished, whether the targets were met or not, 1 when a stage
    failed, 2 for a bad option and 130 when a signal interrupted it.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = config_from_args(args)
    except ValueError as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 2

    progress = Progress()
    supervisor = Supervisor(
        env=os.environ | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(config.threads)}
    )
    try:
        with termination_signals():
            summary = run_pipeline(config, supervisor, progress)
    except (KeyboardInterrupt, DemoInterrupted):
        stopped = supervisor.stop_all()
        print(
            f"demo: interrupted; stopped {len(stopped)} running process(es)"
            + (f": {', '.join(stopped)}" if stopped else ""),
            file=sys.stderr,
        )
        return 130
    except (DemoError, RecordError) as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 1
    finally:
        supervisor.stop_all()

    layout = Layout(Path(config.out))
    layout.summary.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print()
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
