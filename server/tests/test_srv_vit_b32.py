"""End to end on a real architecture: ViT-B-32 (random weights) over the 128 coco128 photos.

Slow (several minutes on two CPU cores): run with ``pytest -m slow server/tests``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

from cdul_proto.v1 import labeler_pb2 as pb
from cdul_proto.v1 import labeler_pb2_grpc as pb_grpc
from cdul_server.app import ServerConfig, create_server


@pytest.mark.slow
def test_vit_b32_coco128_relabel_from_cache(
    tmp_path: Path, shared_data: Path, srv: SimpleNamespace
) -> None:
    models = tmp_path / "models"
    export = subprocess.run(
        [
            sys.executable, "-m", "cdul_export.cli", "clip", "--model", "ViT-B-32",
            "--pretrained", "none", "--out", str(models / "ViT-B-32"), "--threads", "2",
        ],
        capture_output=True, text=True, timeout=1800, check=False,
    )  # fmt: skip
    assert export.returncode == 0, export.stderr[-3000:]
    classes = json.loads((shared_data / "coco128" / "classes.json").read_text(encoding="utf-8"))
    server = create_server(
        ServerConfig(models=models, clip="ViT-B-32", port=0, metrics_port=0, threads=2)
    )
    try:
        channel = grpc.insecure_channel(
            f"127.0.0.1:{server.port}", options=[("grpc.max_send_message_length", 64 << 20)]
        )
        stub = pb_grpc.LabelerStub(channel)
        paths = sorted((shared_data / "coco128" / "images").glob("*.jpg"))
        assert len(paths) == 128
        first = stub.PseudoLabel(
            pb.PseudoLabelRequest(
                images=[pb.Image(id=p.name, data=p.read_bytes()) for p in paths],
                vocabulary=pb.Vocabulary(class_names=classes),
            ),
            timeout=1800,
        )
        assert [r.status.code for r in first.results] == [0] * 128
        assert all(len(r.final_scores) == 80 for r in first.results)
        encoded = srv.metric_value(srv.scrape(server), "cdul_views_encoded_total", model="ViT-B-32")
        assert encoded == 128 * 10
        second = stub.PseudoLabel(
            pb.PseudoLabelRequest(
                images=[pb.Image(id=r.id, content_key=r.content_key) for r in first.results],
                vocabulary=pb.Vocabulary(class_names=["a vehicle", "an animal", "food"]),
            ),
            timeout=600,
        )
        assert all(r.status.code == 0 and r.cache_hit for r in second.results)
        after = srv.scrape(server)
        assert srv.metric_value(after, "cdul_views_encoded_total", model="ViT-B-32") == encoded
        assert srv.metric_value(after, "cdul_cache_hits_total", kind="image_view") == 2 * 128
    finally:
        server.stop(0.0)
