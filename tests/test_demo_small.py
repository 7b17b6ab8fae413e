"""The main-job demo: its summary math, process handling, a small end-to-end run and Ctrl-C."""

from __future__ import annotations

import json
import math
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cdul_training import demo
from cdul_training.scenes import CLASS_NAMES

SMALL_RUN_TIMEOUT_S = 600


# Summary math -------------------------------------------------------------------------------


def test_seed_statistics_sample_std() -> None:
    stats = demo.seed_statistics([50.0, 52.0, 54.0])
    assert stats["mean"] == pytest.approx(52.0)
    assert stats["std"] == pytest.approx(2.0)


def test_seed_statistics_single_seed_has_no_std() -> None:
    stats = demo.seed_statistics([61.5])
    assert stats["mean"] == pytest.approx(61.5)
    assert stats["std"] is None


def test_select_run_uses_mean_validation() -> None:
    runs = {
        # The single best run is in the control, but gradient alignment has the higher mean.
        "gradient_alignment": [
            {"seed": 0, "best_val_map": 60.0},
            {"seed": 1, "best_val_map": 62.0},
        ],
        "control": [{"seed": 0, "best_val_map": 64.0}, {"seed": 1, "best_val_map": 50.0}],
    }
    assert demo.select_run(runs) == ("gradient_alignment", 1)


def test_select_run_without_runs_raises() -> None:
    with pytest.raises(ValueError, match="no finished runs"):
        demo.select_run({"gradient_alignment": [], "control": []})


@pytest.mark.parametrize(
    ("global_map", "final_map", "test_map", "first", "second"),
    [
        (50.0, 55.0, 56.0, True, True),
        (50.0, 54.9, 54.0, False, False),
        (50.0, 60.0, 59.99, True, False),
        (50.0, 60.0, None, True, False),
    ],
)
def test_check_targets_table(
    global_map: float, final_map: float, test_map: float | None, first: bool, second: bool
) -> None:
    scenes = {
        "pseudo_labels": {"global": global_map, "aggregate": 40.0, "final": final_map},
        "classifier": {"selected": {"test_map": test_map}},
    }
    targets = demo.check_targets(scenes)
    assert targets["final_beats_global"]["holds"] is first
    assert targets["final_beats_global"]["margin"] == pytest.approx(final_map - global_map)
    assert targets["classifier_reaches_final_pseudo_labels"]["holds"] is second


def _write_jsonl(path: Path, objects: list[dict]) -> None:
    path.write_text("".join(json.dumps(obj) + "\n" for obj in objects), encoding="utf-8")


def test_prediction_map_reorders_classes(tmp_path: Path) -> None:
    truth = tmp_path / "truth.json"
    truth.write_text(json.dumps({"classes": ["a", "b"], "labels": {"x": ["a"], "y": ["b"]}}))
    predictions = tmp_path / "predictions.jsonl"
    # The predictions list the classes in the other order, and score every image right.
    _write_jsonl(
        predictions,
        [
            {"type": "header", "classes": ["b", "a"]},
            {"type": "record", "id": "x", "scores": [0.1, 0.9]},
            {"type": "record", "id": "y", "scores": [0.8, 0.2]},
        ],
    )
    result = demo.prediction_map(predictions, truth)
    assert result["n_records"] == 2
    assert result["test_map"] == pytest.approx(100.0)


def test_read_predictions_rejects_short_scores(tmp_path: Path) -> None:
    predictions = tmp_path / "predictions.jsonl"
    _write_jsonl(
        predictions,
        [{"type": "header", "classes": ["a", "b"]}, {"type": "record", "id": "x", "scores": [1]}],
    )
    with pytest.raises(demo.DemoError, match="'x' has no 'scores' list of 2"):
        demo.read_predictions(predictions)


def test_read_predictions_needs_header(tmp_path: Path) -> None:
    predictions = tmp_path / "predictions.jsonl"
    _write_jsonl(predictions, [{"type": "record", "id": "x", "scores": [1.0]}])
    with pytest.raises(demo.DemoError, match="not a header"):
        demo.read_predictions(predictions)


def test_best_validation_picks_max_epoch(tmp_path: Path) -> None:
    _write_jsonl(
        tmp_path / "metrics.jsonl",
        [{"epoch": 0}, {"epoch": 1, "val_map": 40.0}, {"epoch": 2, "val_map": 45.5}],
    )
    assert demo.best_validation(tmp_path) == {"best_val_map": 45.5, "best_epoch": 2}


def test_voc_pseudo_label_maps_match_cache(shared_data: Path) -> None:
    cache = shared_data / "voc2012-rn50x64-cache" / "cache.npz"
    result = demo.voc_pseudo_label_maps(cache)
    # The reproduction's scores at threshold 0 and lambda 0, as docs/pseudo-labels-on-real-clip.md
    # reports them.
    assert result["n_records"] == 5717
    assert result["global"] == pytest.approx(85.91, abs=0.01)
    assert result["aggregate"] == pytest.approx(86.01, abs=0.01)
    assert result["final"] == pytest.approx(89.31, abs=0.01)


def test_evaluate_voc_missing_cache_notes_it(tmp_path: Path) -> None:
    result = demo.evaluate_voc(tmp_path / "missing.npz")
    assert result["pseudo_labels"] is None
    assert "--voc-cache" in result["note"]


def test_default_voc_cache_is_beside_checkout(shared_data: Path) -> None:
    assert (
        demo.default_voc_cache().resolve()
        == (shared_data / "voc2012-rn50x64-cache" / "cache.npz").resolve()
    )


def _summary() -> dict:
    stats = {"mean": 61.25, "std": 1.5}
    runs = {"test_map": stats, "refined_pseudo_label_map": stats, "best_val_map": stats}
    scenes = {
        "pseudo_labels": {"n_records": 10, "global": 50.5, "aggregate": 49.9, "final": 59.6},
        "classifier": {
            "gradient_alignment": runs,
            "control": runs | {"test_map": {"mean": 58.0, "std": None}},
            "selected": {"configuration": "control", "seed": 2, "test_map": 58.75},
        },
    }
    return {
        "settings": demo.asdict(demo.DemoConfig(out="x")),
        "digit_scenes": scenes,
        "voc2012_rn50x64": {
            "pseudo_labels": {"global": 85.91, "aggregate": 86.01, "final": 89.31},
            "note": "scores only",
        },
        "targets": demo.check_targets(scenes),
        "outputs": {"models": "out/models"},
        "wall_time_s": 12.0,
    }


def test_format_summary_shows_table_rows() -> None:
    text = demo.format_summary(_summary())
    lines = text.splitlines()
    row = next(line for line in lines if "final (initial)" in line)
    assert "59.60" in row
    assert "89.31" in row
    row = next(line for line in lines if "test mAP, gradient alignment" in line)
    assert "61.25 ± 1.50" in row
    row = next(line for line in lines if "test mAP, control" in line)
    assert "58.00" in row
    assert "selected classifier test mAP (control" in text
    assert "NOT met (58.75 vs 59.60)" in text
    assert "beat the global scores by >= 5 mAP: met (+9.10)" in text
    assert "models: out/models" in text
    assert "too noisy" not in text


def test_format_summary_notes_small_test_split() -> None:
    summary = _summary()
    summary["settings"] = demo.asdict(demo.DemoConfig(out="x", n_test=20, n_val=20))
    text = demo.format_summary(summary)
    assert "note: with 20 test and 20 validation images the mAPs are too noisy" in text


def test_plot_summary_writes_png(tmp_path: Path) -> None:
    out = demo.plot_summary(_summary(), tmp_path / "plots" / "summary.png")
    assert out.read_bytes().startswith(b"\x89PNG")


# Options and output folder ----------------------------------------------------------------


def test_config_small_then_explicit_options() -> None:
    args = demo.build_parser().parse_args(["--out", "x", "--small", "--n-train", "33"])
    config = demo.config_from_args(args)
    assert config.n_train == 33
    assert config.n_test == demo.SMALL["n_test"]
    assert config.seeds == demo.SMALL["seeds"]


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--seeds", "0,x", "comma-separated integers"),
        ("--seeds", "1,1", "repeats a seed"),
        ("--side", "32", "--side 32"),
        ("--n-test", "0", "--n-test 0"),
        ("--jobs", "0", "--jobs 0"),
        ("--label-lr", "nan", "--label-lr nan"),
        ("--label-lr", "-1", "--label-lr -1.0"),
        ("--models", "no-such-folder", "--models no-such-folder: not a folder"),
        ("--voc-cache", "no-such-cache.npz", "--voc-cache no-such-cache.npz: file not found"),
    ],
)
def test_bad_option_exits_2(
    option: str, value: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = demo.main(["--out", str(tmp_path / "out"), option, value])
    assert status == 2
    assert message in capsys.readouterr().err


def test_prepare_output_rejects_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(demo.DemoError, match="did not write"):
        demo.prepare_output(tmp_path)
    assert (tmp_path / "notes.txt").is_file()


def test_prepare_output_replaces_earlier_run(tmp_path: Path) -> None:
    (tmp_path / demo.MARKER_FILE).write_text("{}")
    (tmp_path / "runs" / "old").mkdir(parents=True)
    (tmp_path / "summary.json").write_text("{}")
    demo.prepare_output(tmp_path)
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "summary.json").exists()


def test_command_builds_flags() -> None:
    argv = demo.command("cdul-train", "fit", out=Path("o"), seed=3, warmup=None, no_progress=True)
    assert Path(argv[0]).name == "cdul-train"
    assert argv[1:] == ["fit", "--out", "o", "--seed", "3", "--no-progress"]


# Process handling ---------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still accepts signal 0, but it runs nothing and its parent reaps it.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().split(") ")[-1].startswith("Z"))


def _wait_gone(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def test_supervisor_stops_grandchildren(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(60)\n"
    )
    supervisor = demo.Supervisor(grace_s=5.0)
    child = supervisor.start("sleeper", [sys.executable, "-c", script], tmp_path / "log.txt")
    deadline = time.monotonic() + 30
    while not pid_file.is_file() or not pid_file.read_text():
        assert time.monotonic() < deadline, child.log_tail()
        time.sleep(0.1)
    grandchild = int(pid_file.read_text())
    stopped = supervisor.stop_all()
    assert stopped == ["sleeper"]
    assert _wait_gone(child.process.pid)
    assert _wait_gone(grandchild)
    assert supervisor.children == []


def test_supervisor_run_reports_failure(tmp_path: Path) -> None:
    supervisor = demo.Supervisor()
    argv = [sys.executable, "-c", "import sys; print('bad input'); sys.exit(3)"]
    with pytest.raises(demo.DemoError, match="exit status 3") as info:
        supervisor.run("failing tool", argv, tmp_path / "log.txt")
    assert "bad input" in str(info.value)


def test_signal_lost_during_start_still_interrupts(tmp_path: Path) -> None:
    supervisor = demo.Supervisor(grace_s=5.0)
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    with demo.termination_signals():
        # A handler's exception raised inside an at-fork callback is dropped by Python; the
        # record of the signal remains, so starting a child raises it afterwards.
        demo._RECEIVED_SIGNALS.append("SIGINT")
        with pytest.raises(KeyboardInterrupt):
            supervisor.start("sleeper", sleeper, tmp_path / "log.txt")
        assert [child.name for child in supervisor.children] == ["sleeper"]
        assert supervisor.stop_all() == ["sleeper"]
    with demo.termination_signals():
        assert demo._RECEIVED_SIGNALS == []
        demo._RECEIVED_SIGNALS.append("SIGTERM")
        with pytest.raises(demo.DemoInterrupted, match="SIGTERM"):
            demo.raise_if_interrupted()
    demo._RECEIVED_SIGNALS.clear()


# The small pipeline, end to end --------------------------------------------------------------


def _processes_mentioning(text: str) -> list[str]:
    """Return the command lines of live processes whose arguments contain `text`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline and _alive(int(proc.name)):
            found.append(cmdline)
    return found


def _demo_argv(out: Path) -> list[str]:
    return [sys.executable, "-m", "cdul_training.demo", "--out", str(out), "--small"]


def _occupy_port(port: int) -> socket.socket | None:
    """Listen on 127.0.0.1:`port` if it is free; None when another process has it already."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        return None
    sock.listen()
    return sock


def test_demo_small_writes_summary(tmp_path: Path) -> None:
    out = tmp_path / "demo-output"
    # The default gRPC and metrics ports are busy, so the servers must pick free ones.
    busy = [_occupy_port(port) for port in (50051, 9464)]
    try:
        result = subprocess.run(
            _demo_argv(out),
            capture_output=True,
            text=True,
            timeout=SMALL_RUN_TIMEOUT_S,
            check=False,
        )
    finally:
        for sock in busy:
            if sock is not None:
                sock.close()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| pseudo labels, train split: global scores" in result.stdout
    assert _processes_mentioning(str(out)) == []

    summary = json.loads((out / "summary.json").read_text())
    settings = summary["settings"]
    scenes = summary["digit_scenes"]
    pseudo = scenes["pseudo_labels"]
    assert pseudo["n_records"] == settings["n_train"]
    for key in ("global", "aggregate", "final"):
        assert 0.0 <= pseudo[key] <= 100.0, key
    classifier = scenes["classifier"]
    for name in ("gradient_alignment", "control"):
        runs = classifier[name]["runs"]
        assert [run["seed"] for run in runs] == settings["seeds"]
        for run in runs:
            assert run["n_predictions"] == settings["n_test"]
            for key in ("test_map", "best_val_map", "refined_pseudo_label_map"):
                assert 0.0 <= run[key] <= 100.0, (name, key)
        stats = classifier[name]["test_map"]
        assert stats["mean"] == pytest.approx(np.mean([run["test_map"] for run in runs]))
        assert stats["std"] >= 0.0
    selected = classifier["selected"]
    assert (Path(selected["model_dir"]) / "model.onnx").is_file()
    assert 0.0 <= selected["test_map"] <= 100.0

    voc = summary["voc2012_rn50x64"]["pseudo_labels"]
    assert voc["n_records"] == 5717
    assert voc["final"] == pytest.approx(89.31, abs=0.01)
    targets = summary["targets"]
    assert isinstance(targets["final_beats_global"]["holds"], bool)
    assert targets["final_beats_global"]["margin"] == pytest.approx(
        pseudo["final"] - pseudo["global"]
    )
    assert isinstance(targets["classifier_reaches_final_pseudo_labels"]["holds"], bool)
    assert [stage["name"] for stage in summary["stages"]] == [
        "scenes",
        "server",
        "pseudo",
        "fit",
        "export",
        "predict",
        "voc",
    ]
    assert math.isfinite(summary["wall_time_s"])
    assert (out / "plots" / "summary.png").is_file()
    assert (out / "plots" / "runs.png").is_file()
    header = json.loads((out / "labels" / "train.jsonl").open().readline())
    assert header["classes"] == list(CLASS_NAMES)


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_demo_sigint_leaves_no_process(tmp_path: Path) -> None:
    out = tmp_path / "demo-output"
    process = subprocess.Popen(
        _demo_argv(out),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # A process started in the background may inherit an ignored SIGINT, which Python
        # keeps; a demo started from a terminal has the default disposition.
        preexec_fn=_default_sigint,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True).start()
    server_pid = None
    try:
        deadline = time.monotonic() + 300
        while server_pid is None and time.monotonic() < deadline:
            line = lines.get(timeout=300)
            assert line is not None, process.stderr.read()[-3000:]
            if "server: SERVING on" in line:
                server_pid = int(line.split("(pid ")[1].split(",")[0])
        assert server_pid is not None
        assert _alive(server_pid)
        # Ctrl-C in a terminal sends SIGINT to the demo; its children run in their own groups.
        process.send_signal(signal.SIGINT)
        returncode = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    stderr = process.stderr.read()
    assert returncode == 130, stderr[-3000:]
    assert "interrupted" in stderr
    assert _wait_gone(server_pid)
    assert _processes_mentioning(str(out)) == []
    assert not (out / "summary.json").exists()
