"""Sizes of a benchmark run: the full run of the results page and the smoke run of the tests."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Plan:
    """What one run measures and how often.

    Attributes:
        smoke: Tiny models and sizes that only check that the harness works.
        threads: Threads of every runtime (torch, ONNX Runtime, BLAS), normally the core count.
        repeats: Timed repeats of every figure; figures are medians over them.
        grid_size: Tiles per side of pseudo labeling.
        matmul_size: Side of the square matrices of the ceiling.
        matmul_shapes: (M, K, N) products of the encoder measured beside the ceiling.
        clip_models: CLIP models to measure; "digits-clip" is the shipped default, others are
            open_clip names exported with random weights.
        precisions: Image encoder precisions.
        encoder_images: Images whose views form the pre-made batches of (a), per model.
        encoder_batch_sizes: Views per encoder call in (a), per model.
        int8_conv_variant: Models whose (a) also measures an int8 graph with Conv quantized
            too, beside the default int8 graph of MatMul and Gemm only.
        server_images: Images per timed repeat of (b) at each client concurrency, per model.
        concurrencies: Client concurrencies of (b).
        max_batch_sizes: ``--max-batch-size`` values of the sweep at concurrency 4, per model;
            the first is the one used at every concurrency.
        reproduction_model: open_clip model of (c); None skips it for that CLIP model.
        reproduction_images: Images per repeat of (c).
        relabel_batch: Content keys per relabeling request in (d).
        classifier_arch: Architecture of (e), one of cdul_training.classifiers.ARCHS.
        classifier_size: Input side of (e) in pixels.
        classifier_images: Images per repeat of (e).
        classifier_batch: Images per forward pass and per Predict request in (e).
        quality_scenes: digit-scenes test canvases of the int8 quality check.
        profile_seconds: Duration of the py-spy profile of the server under load.
    """

    smoke: bool
    threads: int
    repeats: int
    grid_size: int = 3
    matmul_size: int = 2048
    matmul_shapes: list[tuple[int, int, int]] = field(default_factory=list)
    clip_models: list[str] = field(default_factory=list)
    precisions: list[str] = field(default_factory=lambda: ["fp32", "int8"])
    encoder_images: dict[str, int] = field(default_factory=dict)
    encoder_batch_sizes: dict[str, list[int]] = field(default_factory=dict)
    int8_conv_variant: list[str] = field(default_factory=list)
    server_images: dict[str, dict[int, int]] = field(default_factory=dict)
    concurrencies: list[int] = field(default_factory=lambda: [1, 4, 16])
    max_batch_sizes: dict[str, list[int]] = field(default_factory=dict)
    reproduction_model: dict[str, str | None] = field(default_factory=dict)
    reproduction_images: int = 4
    relabel_batch: int = 32
    classifier_arch: str = "resnet50"
    classifier_size: int = 224
    classifier_images: int = 16
    classifier_batch: int = 8
    quality_scenes: int = 400
    profile_seconds: int = 12

    def to_dict(self) -> dict[str, Any]:
        """Return the plan as plain data."""
        return asdict(self)


def full_plan(threads: int, repeats: int) -> Plan:
    """Return the plan of the results page: ViT-B-32 and digits-clip, about 15 minutes."""
    return Plan(
        smoke=False,
        threads=threads,
        repeats=repeats,
        clip_models=["ViT-B-32", "digits-clip"],
        # ViT-B-32's MLP products at a batch of 10 views (50 tokens each): the shapes that
        # dominate its encoder.
        matmul_shapes=[(500, 768, 3072), (500, 3072, 768)],
        encoder_images={"ViT-B-32": 4, "digits-clip": 128},
        encoder_batch_sizes={"ViT-B-32": [10, 40], "digits-clip": [10, 80, 320]},
        int8_conv_variant=["ViT-B-32", "digits-clip"],
        # Over 3 repeats the requests of (b) walk through all 128 images of coco128 once, so
        # (d) relabels the whole corpus.
        server_images={
            "ViT-B-32": {1: 8, 4: 12, 16: 24},
            "digits-clip": {1: 64, 4: 128, 16: 128},
        },
        max_batch_sizes={"ViT-B-32": [32, 10, 64], "digits-clip": [64, 16, 256]},
        reproduction_model={"ViT-B-32": "ViT-B-32", "digits-clip": "digits-clip"},
    )


def smoke_plan(threads: int) -> Plan:
    """Return the plan of the smoke test: the tiny CLIP of cdul_export.testing, seconds."""
    return Plan(
        smoke=True,
        threads=threads,
        repeats=2,
        matmul_size=128,
        matmul_shapes=[(20, 64, 256)],
        clip_models=["tiny-clip"],
        encoder_images={"tiny-clip": 2},
        encoder_batch_sizes={"tiny-clip": [10]},
        int8_conv_variant=["tiny-clip"],
        server_images={"tiny-clip": {1: 2, 4: 4, 16: 4}},
        max_batch_sizes={"tiny-clip": [16, 8]},
        reproduction_model={"tiny-clip": "smoke"},
        reproduction_images=2,
        relabel_batch=4,
        classifier_arch="small-cnn",
        classifier_size=64,
        classifier_images=4,
        classifier_batch=2,
        quality_scenes=8,
        profile_seconds=2,
    )
