"""`cdul-label` against the fake servicer: outputs, resume, bad input and SIGKILL."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import grpc
import pytest

from cdul_client.cli import main
from cdul_client.labelfile import errors_path, journal_path

COCO_IMAGES = 128


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _records(path: Path) -> list[dict]:
    objects = _lines(path)
    assert objects[0]["type"] == "header"
    return objects[1:]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([*argv, "--no-progress"] if argv[0] not in ("search",) else list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def coco(shared_data: Path) -> tuple[Path, Path]:
    """The coco128 image folder and its class list."""
    return shared_data / "coco128" / "images", shared_data / "coco128" / "classes.json"


def test_pseudo_writes_one_record_per_image(fake_server, coco, tmp_path, capsys) -> None:
    images, classes = coco
    out = tmp_path / "labels.jsonl"
    code, stdout, _ = _run(
        capsys, "pseudo", str(images), "--classes", str(classes),
        "--server", fake_server.target, "--out", str(out), "--batch-size", "10",
    )  # fmt: skip
    assert code == 0
    assert "labeled 128, failed 0, skipped 0" in stdout
    objects = _lines(out)
    header, records = objects[0], objects[1:]
    assert header == {
        "type": "header",
        "format": "cdul-pseudo-labels",
        "version": 1,
        "classes": json.loads(classes.read_text()),
        "model": "fake-clip",
        "options": {
            "grid_size": 3,
            "threshold": 0.0,
            "lambda_weight": 0.0,
            "temperature": None,
            "global_view": "center_crop",
            "templates": ["a photo of a {}."],
        },
        "optional_keys": [],
        "created_by": "cdul-label 0.1.0",
    }
    assert len(records) == COCO_IMAGES
    assert sorted(r["id"] for r in records) == sorted(p.name for p in images.iterdir())
    first = records[0]
    assert set(first) == {"type", "id", "path", "content_key", "global", "aggregate", "final"}
    image_file = out.parent / first["path"]
    assert image_file.is_file()
    assert first["content_key"] == hashlib.sha256(image_file.read_bytes()).hexdigest()
    assert len(first["final"]) == 80
    assert not errors_path(out).exists() or errors_path(out).read_text() == ""


def test_pseudo_reads_lists_tars_and_files(fake_server, coco, tmp_path, capsys) -> None:
    images, classes = coco
    names = sorted(p.name for p in images.iterdir())[:6]
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two images\n{images / names[0]}\n\n{images / names[1]}\n")
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as archive:
        for name in names[2:4]:
            archive.add(images / name, arcname=f"sample/{name}")
        info = tarfile.TarInfo("sample/readme.txt")
        archive.addfile(info)
    nested = tmp_path / "tree" / "a" / "b"
    nested.mkdir(parents=True)
    (nested / "x.PNG").write_bytes((images / names[4]).read_bytes())
    (nested / "notes.md").write_text("not an image")
    out = tmp_path / "out" / "labels.jsonl"
    out.parent.mkdir()
    code, _, _ = _run(
        capsys, "pseudo", str(listing), str(shard), str(tmp_path / "tree"),
        str(images / names[5]), "--classes", str(classes),
        "--server", fake_server.target, "--out", str(out), "--tiles", "--embeddings",
        "--grid", "2",
    )  # fmt: skip
    assert code == 0
    records = {r["id"]: r for r in _records(out)}
    assert set(records) == {
        str(images / names[0]),
        str(images / names[1]),
        f"sample/{names[2]}",
        f"sample/{names[3]}",
        "a/b/x.PNG",
        names[5],
    }
    member = records[f"sample/{names[2]}"]
    assert member["member"] == f"sample/{names[2]}"
    assert (out.parent / member["path"]).resolve() == shard.resolve()
    assert member["content_key"] == hashlib.sha256((images / names[2]).read_bytes()).hexdigest()
    assert len(member["tiles"]) == 4
    assert len(member["tiles"][0]) == 80
    assert len(member["embedding"]) == 4
    assert len(member["tile_embeddings"]) == 4


def test_failed_images_go_to_error_file(fake_server, coco, tmp_path, capsys) -> None:
    images, classes = coco
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "good.jpg").write_bytes((images / "000000000009.jpg").read_bytes())
    (corpus / "bad.jpg").write_bytes(b"BAD not an image")
    (corpus / "unreadable.jpg").write_bytes(b"x")
    (corpus / "unreadable.jpg").chmod(0)
    out = tmp_path / "labels.jsonl"
    try:
        code, stdout, _ = _run(
            capsys, "pseudo", str(corpus), "--classes", str(classes),
            "--server", fake_server.target, "--out", str(out),
        )  # fmt: skip
    finally:
        (corpus / "unreadable.jpg").chmod(0o644)
    readable_by_root = os.geteuid() == 0
    failed = 1 if readable_by_root else 2
    assert code == 3
    assert f"failed {failed}" in stdout
    assert [r["id"] for r in _records(out)] == ["good.jpg"] + (
        ["unreadable.jpg"] if readable_by_root else []
    )
    errors = {e["id"]: e for e in _lines(errors_path(out))}
    assert errors["bad.jpg"]["code"] == "INVALID_ARGUMENT"
    assert errors["bad.jpg"]["reason"] == "decode_failed"
    assert errors["bad.jpg"]["message"]
    assert (out.parent / errors["bad.jpg"]["path"]).is_file()
    if not readable_by_root:
        assert errors["unreadable.jpg"]["reason"] == "read_failed"


def test_resume_skips_labeled_and_repairs_torn_line(fake_server, coco, tmp_path, capsys) -> None:
    images, classes = coco
    some = tmp_path / "some.txt"
    some.write_text("\n".join(str(p) for p in sorted(images.iterdir())[:20]))
    every = tmp_path / "every.txt"
    every.write_text("\n".join(str(p) for p in sorted(images.iterdir())))
    out = tmp_path / "labels.jsonl"
    base = ["--classes", str(classes), "--server", fake_server.target, "--out", str(out)]
    assert _run(capsys, "pseudo", str(some), *base)[0] == 0
    with out.open("ab") as stream:
        stream.write(b'{"type": "record", "id": "torn", "glo')
    code, stdout, _ = _run(capsys, "pseudo", str(every), *base, "--resume")
    assert code == 0
    assert "labeled 108, failed 0, skipped 20" in stdout
    ids = [r["id"] for r in _records(out)]
    assert len(ids) == len(set(ids)) == COCO_IMAGES
    code, stdout, _ = _run(capsys, "pseudo", str(every), *base, "--resume")
    assert "labeled 0, failed 0, skipped 128" in stdout
    assert len(_records(out)) == COCO_IMAGES


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--classes", "OTHER"], "another vocabulary"),
        (["--grid", "2"], "options"),
        ([], "already exists"),
    ],
)
def test_resume_rejects_other_settings(fake_server, coco, tmp_path, capsys, extra, message) -> None:
    images, classes = coco
    out = tmp_path / "labels.jsonl"
    other = tmp_path / "other.txt"
    other.write_text("cat\ndog\n")
    first = next(iter(sorted(images.iterdir())))
    base = ["--server", fake_server.target, "--out", str(out)]
    assert _run(capsys, "pseudo", str(first), "--classes", str(classes), *base)[0] == 0
    before = out.read_bytes()
    argv = ["pseudo", str(images), *base]
    if extra[:1] == ["--classes"]:
        argv += ["--classes", str(other), "--resume"]
    else:
        argv += ["--classes", str(classes), *extra] + (["--resume"] if extra else [])
    code, _, stderr = _run(capsys, *argv)
    assert code == 2
    assert message in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert out.read_bytes() == before


def test_class_file_byte_order_mark_dropped(tmp_path: Path) -> None:
    from cdul_client.cli import read_class_names

    classes = tmp_path / "classes.txt"
    classes.write_bytes(b"\xef\xbb\xbfone\ntwo\n")
    assert read_class_names(classes) == ["one", "two"]
    classes.write_bytes(b'\xef\xbb\xbf["one", "two"]')
    assert read_class_names(classes) == ["one", "two"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("cat\ndog\ncat\n", "twice"),
        ("cat\n\ndog\n", "blank line 2"),
        ('["cat", "dog", "dog"]', "twice"),
        ("", "empty"),
    ],
)
def test_bad_class_file_is_rejected(fake_server, coco, tmp_path, capsys, content, message) -> None:
    images, _ = coco
    classes = tmp_path / "classes.txt"
    classes.write_text(content)
    out = tmp_path / "labels.jsonl"
    code, _, stderr = _run(
        capsys, "pseudo", str(images), "--classes", str(classes),
        "--server", fake_server.target, "--out", str(out),
    )  # fmt: skip
    assert code == 2
    assert message in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not out.exists()
    assert fake_server.servicer.calls == 0


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--threshold", "nan"),
        ("--threshold", "-1"),
        ("--threshold", "1.5"),
        ("--lambda", "inf"),
        ("--lambda", "-0.5"),
        ("--temperature", "0"),
        ("--temperature", "nan"),
        ("--temperature", "inf"),
        ("--timeout", "nan"),
    ],
)
def test_out_of_range_option_writes_nothing(
    fake_server, coco, tmp_path, capsys, option, value
) -> None:
    images, classes = coco
    out = tmp_path / "labels.jsonl"
    code, _, stderr = _run(
        capsys, "pseudo", str(images), "--classes", str(classes),
        "--server", fake_server.target, "--out", str(out), option, value,
    )  # fmt: skip
    assert code == 2
    assert option in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not out.exists()
    assert fake_server.servicer.calls == 0


def test_predict_threshold_out_of_range(fake_server, coco, tmp_path, capsys) -> None:
    images, _ = coco
    out = tmp_path / "predictions.jsonl"
    code, _, stderr = _run(
        capsys, "predict", str(images), "--server", fake_server.target, "--out", str(out),
        "--threshold", "nan",
    )  # fmt: skip
    assert code == 2
    assert "--threshold" in stderr
    assert not out.exists()


def test_empty_output_from_crash_is_replaced(fake_server, coco, tmp_path, capsys) -> None:
    images, classes = coco
    first = sorted(images.iterdir())[0]
    out = tmp_path / "labels.jsonl"
    out.write_bytes(b"")
    code, stdout, stderr = _run(
        capsys, "pseudo", str(first), "--classes", str(classes),
        "--server", fake_server.target, "--out", str(out),
    )  # fmt: skip
    assert code == 0, stderr
    assert "labeled 1, failed 0" in stdout
    assert len(_records(out)) == 1


def test_out_in_missing_folder_is_rejected(fake_server, coco, tmp_path, capsys) -> None:
    images, classes = coco
    missing = tmp_path / "missing"
    code, _, stderr = _run(
        capsys, "pseudo", str(images), "--classes", str(classes),
        "--server", fake_server.target, "--out", str(missing / "labels.jsonl"),
    )  # fmt: skip
    assert code == 2
    assert f"{missing} of --out" in stderr
    assert "create it first" in stderr
    assert not missing.exists()


@pytest.mark.parametrize(
    ("argv", "prog"),
    [
        (["pseudo", "x.png", "--classes", "c.json", "--out", "o.jsonl", "--grid", "abc"],
         "cdul-label pseudo"),
        (["pseudo", "x.png", "--classes", "c.json"], "cdul-label pseudo"),
        (["predict", "x.png", "--out", "o.jsonl", "--top-k", "x"], "cdul-label predict"),
        (["predict", "x.png", "--out", "o.jsonl", "--bogus"], "cdul-label"),
        (["search"], "cdul-label search"),
        (["frobnicate"], "cdul-label"),
        ([], "cdul-label"),
    ],
)  # fmt: skip
def test_argument_errors_are_one_line(capsys, argv, prog) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    stderr = capsys.readouterr().err
    assert caught.value.code == 2
    assert len(stderr.strip().splitlines()) == 1
    assert stderr.startswith(f"{prog}: error: ")
    assert stderr.strip().endswith(f"; see {prog} --help")


def test_unreachable_server_and_wrong_token(fake_server, coco, tmp_path, capsys) -> None:
    images, classes = coco
    out = tmp_path / "labels.jsonl"
    code, _, stderr = _run(
        capsys, "pseudo", str(images), "--classes", str(classes),
        "--server", "127.0.0.1:1", "--out", str(out), "--attempts", "2", "--timeout", "5",
    )  # fmt: skip
    assert code == 1
    assert "cannot reach the server at 127.0.0.1:1" in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not out.exists()
    fake_server.servicer.required_token = "right"
    code, _, stderr = _run(
        capsys, "pseudo", str(images), "--classes", str(classes),
        "--server", fake_server.target, "--out", str(out), "--token", "wrong",
    )  # fmt: skip
    assert code == 1
    assert "--token" in stderr
    assert "UNAUTHENTICATED" in stderr
    assert not out.exists()


def test_rejected_first_batch_leaves_no_output(fake_server, coco, tmp_path, capsys) -> None:
    images, classes = coco
    out = tmp_path / "labels.jsonl"
    # The preflight call succeeds, then the server rejects every batch as invalid.
    fake_server.servicer.fail_next = [None] + [grpc.StatusCode.INVALID_ARGUMENT] * 50
    fake_server.servicer.fail_message = "prompt 'x x x' has 80 tokens"
    code, _, stderr = _run(
        capsys, "pseudo", str(images), "--classes", str(classes),
        "--server", fake_server.target, "--out", str(out), "--batch-size", "8",
    )  # fmt: skip
    assert code == 2
    assert "80 tokens" in stderr
    assert "nothing was written" in stderr
    assert "--resume" not in stderr
    assert not out.exists()
    assert not errors_path(out).exists()
    # After the fix a plain rerun works, with no --overwrite.
    fake_server.servicer.fail_next = []
    code, _, _ = _run(
        capsys, "pseudo", str(images), "--classes", str(classes),
        "--server", fake_server.target, "--out", str(out),
    )  # fmt: skip
    assert code == 0
    assert out.is_file()


def test_server_loss_mid_run_keeps_written_records(fake_server, coco, tmp_path, capsys) -> None:
    images, classes = coco
    out = tmp_path / "labels.jsonl"
    # The preflight call and two batches succeed, then the server is gone for good.
    fake_server.servicer.fail_next = [None, None, None] + [grpc.StatusCode.UNAVAILABLE] * 50
    code, _, stderr = _run(
        capsys, "pseudo", str(images), "--classes", str(classes),
        "--server", fake_server.target, "--out", str(out), "--attempts", "2",
        "--batch-size", "8", "--concurrency", "1",
    )  # fmt: skip
    assert code == 1
    assert "rerun with --resume" in stderr
    assert len(_records(out)) == 16
    fake_server.servicer.fail_next = []
    code, stdout, _ = _run(
        capsys, "pseudo", str(images), "--classes", str(classes),
        "--server", fake_server.target, "--out", str(out), "--resume",
    )  # fmt: skip
    assert code == 0
    assert "labeled 112, failed 0, skipped 16" in stdout


def test_parquet_output_and_resume(fake_server, coco, tmp_path, capsys) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    images, classes = coco
    out = tmp_path / "labels.parquet"
    some = [str(p) for p in sorted(images.iterdir())[:10]]
    base = ["--classes", str(classes), "--server", fake_server.target, "--out", str(out)]
    assert _run(capsys, "pseudo", *some, *base)[0] == 0
    assert not journal_path(out).exists()
    assert pq.read_table(out).num_rows == 10
    code, stdout, _ = _run(capsys, "pseudo", str(images), *base, "--resume", "--tiles")
    assert code == 2
    code, stdout, _ = _run(capsys, "pseudo", str(images), *base, "--resume")
    assert code == 0
    assert "skipped 10" in stdout
    table = pq.read_table(out)
    assert table.num_rows == COCO_IMAGES
    assert len(set(table.column("id").to_pylist())) == COCO_IMAGES
    assert {"id", "path", "content_key", "global", "aggregate", "final"} <= set(table.column_names)
    header = json.loads(table.schema.metadata[b"cdul"])
    assert header["format"] == "cdul-pseudo-labels"
    assert len(header["classes"]) == 80


def test_relabel_uses_cache_then_files(fake_server, coco, tmp_path, capsys) -> None:
    images, classes = coco
    source = tmp_path / "labels.jsonl"
    new_classes = tmp_path / "new.txt"
    new_classes.write_text("animal\nvehicle\nfood\n")
    assert _run(
        capsys, "pseudo", str(images), "--classes", str(classes),
        "--server", fake_server.target, "--out", str(source), "--grid", "2",
    )[0] == 0  # fmt: skip
    sent_bytes_before = len(fake_server.servicer.seen)
    out = tmp_path / "relabeled.jsonl"
    code, stdout, _ = _run(
        capsys, "relabel", "--from", str(source), "--classes", str(new_classes),
        "--server", fake_server.target, "--out", str(out),
    )  # fmt: skip
    assert code == 0
    assert "labeled 128" in stdout
    header = _lines(out)[0]
    assert header["classes"] == ["animal", "vehicle", "food"]
    assert header["options"]["grid_size"] == 2
    records = _records(out)
    assert len(records) == COCO_IMAGES
    assert all(len(r["final"]) == 3 for r in records)
    assert len(fake_server.servicer.seen) == sent_bytes_before
    fake_server.servicer.forget_content_keys = True
    out2 = tmp_path / "relabeled-from-files.jsonl"
    code, stdout, _ = _run(
        capsys, "relabel", "--from", str(source), "--classes", str(new_classes),
        "--server", fake_server.target, "--out", str(out2),
    )  # fmt: skip
    assert code == 0
    assert "labeled 128, failed 0" in stdout
    by_id = {r["id"]: r for r in _records(out2)}
    for record in records:
        assert by_id[record["id"]]["final"] == record["final"]
        assert by_id[record["id"]]["content_key"] == record["content_key"]


def test_predict_and_search(fake_server, coco, tmp_path, capsys) -> None:
    images, _ = coco
    out = tmp_path / "predictions.jsonl"
    code, stdout, _ = _run(
        capsys, "predict", str(images), "--server", fake_server.target, "--out", str(out),
        "--top-k", "2",
    )  # fmt: skip
    assert code == 0
    header, *records = _lines(out)
    assert header["format"] == "cdul-predictions"
    assert header["classes"] == ["cat", "dog", "car"]
    assert len(records) == COCO_IMAGES
    assert len(records[0]["scores"]) == 3
    assert [label["index"] for label in records[0]["labels"]] == sorted(
        range(3), key=lambda j: -records[0]["scores"][j]
    )[:2]
    code, stdout, _ = _run(
        capsys, "search", "a dog", "-k", "3", "--server", fake_server.target, "--json"
    )
    assert code == 0
    hits = [json.loads(line) for line in stdout.splitlines()]
    assert [hit["rank"] for hit in hits] == [1, 2, 3]
    assert hits[0]["box"] == [21, 16, 42, 32]


@pytest.mark.parametrize("command", ["pseudo", "relabel", "predict", "search"])
def test_help_gives_every_default(command, capsys) -> None:
    with pytest.raises(SystemExit) as caught:
        main([command, "--help"])
    assert caught.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--server", "--timeout", "--attempts", "--token"):
        assert option in text
    assert text.count("default") >= 8


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_sigkill_and_resume_write_each_image_once(fake_server, coco, tmp_path, suffix) -> None:
    images, classes = coco
    out = tmp_path / f"labels{suffix}"
    written = journal_path(out) if suffix == ".parquet" else out
    fake_server.servicer.delay_s = 0.03
    argv = [
        sys.executable, "-m", "cdul_client.cli", "pseudo", str(images),
        "--classes", str(classes), "--server", fake_server.target, "--out", str(out),
        "--batch-size", "4", "--concurrency", "2", "--no-progress", "--resume",
    ]  # fmt: skip
    rng = random.Random(5)
    kills = 0
    for _ in range(4):
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # Wait until this run has written something, then kill it at a random moment.
        start_size = written.stat().st_size if written.exists() else 0
        deadline = time.monotonic() + 30
        while process.poll() is None and time.monotonic() < deadline:
            if written.exists() and written.stat().st_size > start_size:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait()
    assert kills >= 2
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    if suffix == ".parquet":
        pq = pytest.importorskip("pyarrow.parquet")
        assert not written.exists()
        table = pq.read_table(out)
        ids = table.column("id").to_pylist()
        finals = table.column("final").to_pylist()
    else:
        assert out.read_bytes().endswith(b"\n")
        records = _records(out)
        ids = [r["id"] for r in records]
        finals = [r["final"] for r in records]
    assert len(ids) == len(set(ids))
    assert sorted(ids) == sorted(p.name for p in images.iterdir())
    assert all(len(final) == 80 for final in finals)


def test_client_imports_no_torch_or_onnxruntime() -> None:
    code = (
        "import sys, cdul_client, cdul_client.cli, cdul_client.aio; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnxruntime')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--attempts", "0", "--attempts must be at least 1, got 0"),
        ("--batch-size", "0", "--batch-size must be at least 1, got 0"),
        ("--concurrency", "0", "--concurrency must be at least 1, got 0"),
        ("--timeout", "nan", "--timeout must be a finite number"),
    ],
)
def test_run_option_ranges_exit_2(
    fake_server, coco, tmp_path, capsys, option: str, value: str, message: str
) -> None:
    images, classes = coco
    out = tmp_path / "labels.jsonl"
    code, _, stderr = _run(
        capsys, "pseudo", str(images), "--classes", str(classes),
        "--server", fake_server.target, "--out", str(out), option, value,
    )  # fmt: skip
    assert code == 2
    assert message in stderr
    assert not out.exists()
    assert fake_server.servicer.calls == 0
