"""One benchmark run: every figure of the results page, in one process, on the same images."""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import subprocess
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from . import ceiling, corpus, hardware, models
from .measure import Measurement, load_average
from .plan import Plan

_logger = logging.getLogger(__name__)

QUALITY_MODELS = ("digits-clip", "tiny-clip")


class Run:
    """State of one run: the plan, the work folder and everything measured so far."""

    def __init__(self, plan: Plan, images_dir: Path, work_dir: Path, command: str) -> None:
        self.plan = plan
        self.images_dir = images_dir
        self.work_dir = work_dir
        self.repositories = work_dir / "repositories"
        self.command = command
        self.measurements: list[Measurement] = []
        self.missing: list[dict[str, str]] = []
        self.flops: dict[str, dict[str, Any]] = {}
        self.models: dict[str, dict[str, Any]] = {}
        self.profiles: dict[str, Any] = {}
        self.quality: dict[str, Any] = {}
        self.notes: list[str] = []
        self.paths = corpus.image_paths(images_dir)
        self.class_names = corpus.class_names(images_dir)

    def attempt(self, figure: str, what: str, step: Callable[[], None]) -> bool:
        """Run one step; on failure record the figure as missing with the reason.

        A failed profile (figure "profile") is recorded as a note, since it is no figure.
        """
        try:
            step()
        except Exception as err:  # a missing part must not stop the other figures
            reason = f"{type(err).__name__}: {err}".strip()
            _logger.error("%s (%s) failed: %s\n%s", what, figure, reason, traceback.format_exc())
            if figure == "profile":
                self.notes.append(f"No {what}: {reason[:300]}")
            else:
                self.missing.append({"figure": figure, "what": what, "why": reason[:600]})
            return False
        return True

    # -- (f) --------------------------------------------------------------------------------

    def measure_ceiling(self) -> None:
        """(f) fp32 matrix-multiply GFLOP/s of numpy, torch and ONNX Runtime."""
        self.measurements.extend(
            ceiling.measure_ceiling(
                self.plan.matmul_size,
                self.plan.threads,
                self.plan.repeats,
                [tuple(shape) for shape in self.plan.matmul_shapes],  # type: ignore[misc]
            )
        )

    # -- models -----------------------------------------------------------------------------

    def prepare_model(self, name: str) -> None:
        """Make the model folder of ``name`` with an int8 image graph, and count its FLOPs."""
        if name == "tiny-clip":
            folder, how = models.export_tiny_clip_model(self.repositories)
        elif name == "digits-clip":
            from cdul_server.model_repository import DEFAULT_MODEL_REPOSITORY

            shipped = DEFAULT_MODEL_REPOSITORY / "digits-clip"
            if not (shipped / "config.json").is_file():
                raise FileNotFoundError(
                    f"the embedded digits-clip is not in {shipped} yet: export it with "
                    "cdul-train train-clip and cdul-export"
                )
            # A fresh copy each run, so a retrained digits-clip is never measured stale.
            folder = self.repositories / "digits-clip" / "digits-clip"
            if folder.exists():
                shutil.rmtree(folder)
            shutil.copytree(shipped, folder)
            how = "the embedded digits-clip of the cdul_server package"
        else:
            folder, how = models.export_random_clip(name, self.repositories, self.plan.threads)
        added_int8 = models.ensure_int8(folder)
        config = json.loads((folder / "config.json").read_text())
        self.models[name] = {
            "folder": folder,
            "how": how,
            "int8": "added by the benchmark with cdul_export.quantize" if added_int8 else "export",
            "preprocess": config["preprocess"],
            "embedding_dim": config["embedding_dim"],
            "random_init": config.get("source", {}).get("random_init"),
        }
        self.attempt("f", f"FLOPs of {name}", lambda: self.count_flops(name, folder))

    def count_flops(self, name: str, folder: Path) -> None:
        """(f) FLOPs per view of ``name`` from the ONNX graph, and from torch where possible."""
        from .flops import count_onnx_flops, count_torch_flops

        counted = count_onnx_flops(folder / "image.onnx")
        entry: dict[str, Any] = {
            "onnx": counted.flops,
            "onnx_by_op": counted.by_op,
            "onnx_uncounted": counted.uncounted,
        }
        torch_name = self.plan.reproduction_model.get(name)
        if torch_name:
            import open_clip
            import torch

            torch_name = _open_clip_name(torch_name)
            model = open_clip.create_model(torch_name, pretrained=None).eval()
            size = int(self.models[name]["preprocess"]["size"])
            entry["torch"] = count_torch_flops(model.visual, torch.zeros(2, 3, size, size))
        self.flops[name] = entry

    def flops_per_view(self, name: str) -> float | None:
        """Return the ONNX-graph FLOPs of one view of ``name``."""
        entry = self.flops.get(name)
        return entry["onnx"] if entry else None

    # -- (a) --------------------------------------------------------------------------------

    def measure_encoders(self, name: str) -> None:
        """(a) the encoder alone at each precision and batch size."""
        from cdul_server.preprocess import PreprocessConfig

        from .encoder import profile_encoder_ops

        folder = self.models[name]["folder"]
        preprocess = PreprocessConfig.from_dict(self.models[name]["preprocess"])
        count = self.plan.encoder_images[name]
        views = corpus.view_batch(self.paths[:count], preprocess, self.plan.grid_size)
        for precision in self.plan.precisions:
            for batch_size in self.plan.encoder_batch_sizes[name]:
                self.attempt(
                    "a",
                    f"encoder {name} {precision} batch {batch_size}",
                    partial(self.measure_encoder, folder, views, precision, batch_size),
                )
            biggest = max(self.plan.encoder_batch_sizes[name])

            def profile(p: str = precision, b: int = biggest) -> None:
                self.profiles[f"encoder ops {name} {p} batch {b}"] = profile_encoder_ops(
                    folder, views, precision=p, batch_size=b, threads=self.plan.threads
                )

            self.attempt("profile", f"ONNX Runtime op profile of {name} {precision}", profile)
        if name in self.plan.int8_conv_variant:
            self.attempt(
                "a",
                f"encoder {name} int8 with Conv quantized too",
                partial(self.measure_conv_int8, name, views),
            )

    def measure_conv_int8(self, name: str, views: np.ndarray) -> None:
        """(a) an int8 variant that quantizes Conv as well as MatMul and Gemm.

        The export quantizes MatMul and Gemm only, because ONNX Runtime's ConvInteger kernel
        is slower than its fp32 Conv; this variant measures that choice. The benchmark writes
        it in its work folder.
        """
        from cdul_export.quantize import quantize_int8

        source = self.models[name]["folder"]
        variant = self.repositories / "int8-variants" / f"{name}-int8-conv"
        if not (variant / "config.json").is_file():
            variant.mkdir(parents=True, exist_ok=True)
            for item in source.iterdir():
                if item.name not in ("config.json", "image.int8.onnx"):
                    (variant / item.name).symlink_to(item.resolve())
            quantize_int8(
                source / "image.onnx",
                variant / "image.int8.onnx",
                op_types=("Conv", "MatMul", "Gemm"),
            )
            config = json.loads((source / "config.json").read_text())
            config["files"]["image_int8"] = "image.int8.onnx"
            (variant / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        self.measure_encoder(variant, views, "int8", max(self.plan.encoder_batch_sizes[name]))
        self.measurements[-1].params["model"] = variant.name
        self.measurements[-1].params["flops model"] = name
        self.measurements[-1].params["quantization"] = (
            "quantize_dynamic(weight_type=QInt8, op_types_to_quantize=['Conv', 'MatMul', 'Gemm'])"
        )

    def measure_encoder(
        self, folder: Path, views: np.ndarray, precision: str, batch_size: int
    ) -> None:
        """(a) one precision and batch size."""
        from .encoder import measure_encoder

        self.measurements.append(
            measure_encoder(
                folder,
                views,
                precision=precision,
                batch_size=batch_size,
                threads=self.plan.threads,
                grid_size=self.plan.grid_size,
                repeats=self.plan.repeats,
            )
        )

    # -- (c) --------------------------------------------------------------------------------

    def measure_reproduction(self, name: str) -> None:
        """(c) the per-image open_clip loop of the public reproduction."""
        from .reproduction import measure_reproduction

        torch_name = self.plan.reproduction_model.get(name)
        if not torch_name:
            self.notes.append(
                f"(c) is measured for the open_clip models only; {name} has no open_clip "
                "checkpoint in the model repository to run in PyTorch."
            )
            return
        measurement = measure_reproduction(
            _open_clip_name(torch_name),
            self.paths[: self.plan.reproduction_images],
            self.class_names,
            grid_size=self.plan.grid_size,
            threads=self.plan.threads,
            repeats=self.plan.repeats,
        )
        measurement.params["model"] = name
        self.measurements.append(measurement)

    # -- (b), (d), quality -------------------------------------------------------------------

    def measure_server(self, name: str) -> None:
        """(b) end to end at each concurrency, (d) relabeling, the sweep and the int8 check."""
        from .server_bench import server_help

        help_text = server_help()
        sweep = self.plan.max_batch_sizes[name]
        for precision in self.plan.precisions:
            self.attempt(
                "b",
                f"server {name} {precision} max-batch-size {sweep[0]}",
                partial(self.serve_and_measure, name, precision, sweep[0], help_text, True),
            )
            for max_batch in sweep[1:]:
                self.attempt(
                    "b",
                    f"server {name} {precision} max-batch-size {max_batch}",
                    partial(self.serve_and_measure, name, precision, max_batch, help_text, False),
                )

    def server_flags(self, help_text: str, precision: str, max_batch: int) -> dict[str, Any]:
        """Return the cdul-server flags of one configuration, limited to those its --help lists."""
        wanted: dict[str, Any] = {
            "--precision": precision,
            "--max-batch-size": max_batch,
            "--threads": self.plan.threads,
            "--inter-op-threads": 1,
            "--metrics-port": 0,
        }
        listed = set(re.findall(r"--[a-z0-9][a-z0-9-]*", help_text))
        flags = {flag: value for flag, value in wanted.items() if flag in listed}
        for flag in ("--precision", "--max-batch-size"):
            if flag not in flags:
                raise RuntimeError(f"cdul-server --help lists no {flag}: the sweep needs it")
        return flags

    def serve_and_measure(
        self, name: str, precision: str, max_batch: int, help_text: str, full: bool
    ) -> None:
        """Start one server configuration and measure it; ``full`` adds (d), profile, quality."""
        from cdul_client import PseudoLabelOptions

        from .server_bench import run_load, start_server, summarize_load

        folder = self.models[name]["folder"]
        flags = self.server_flags(help_text, precision, max_batch)
        server = start_server(folder.parent, self.work_dir / "servers", flags)
        options = PseudoLabelOptions(grid_size=self.plan.grid_size)
        data = [path.read_bytes() for path in self.paths]
        seen_keys: list[str] = []
        # Requests walk through the corpus, so (b) covers every image size and (d) relabels as
        # many different images as (b) encoded.
        next_image = 0
        try:
            concurrencies = self.plan.concurrencies if full else [4]
            # Warm-up: the first call encodes the vocabulary and touches every code path.
            run_load(
                server.target,
                [[corpus.unique_bytes(data[0])]],
                concurrency=1,
                call="pseudo_label",
                class_names=self.class_names,
                options=options,
                model=name,
            )
            for concurrency in concurrencies:
                count = self.plan.server_images[name][concurrency]
                runs = []
                load_start = load_average()
                for _ in range(self.plan.repeats):
                    indices = [(next_image + i) % len(data) for i in range(count)]
                    next_image += count
                    requests = [
                        [(self.paths[i].name, corpus.unique_bytes(data[i]))] for i in indices
                    ]
                    result = run_load(
                        server.target,
                        requests,
                        concurrency=concurrency,
                        call="pseudo_label",
                        class_names=self.class_names,
                        options=options,
                        model=name,
                    )
                    if result.cache_hits:
                        raise RuntimeError(
                            f"{result.cache_hits} of {result.images} fresh images were cache "
                            "hits: the measurement would skip the encoder"
                        )
                    seen_keys.extend(result.content_keys)
                    runs.append(result)
                params = {
                    "model": name,
                    "precision": precision,
                    "max batch size": max_batch,
                    "concurrency": concurrency,
                    "grid": f"{self.plan.grid_size}x{self.plan.grid_size}",
                    "images per request": 1,
                    "images per repeat": count,
                    "classes": len(self.class_names),
                    "threads": self.plan.threads,
                    "server command": server.command_line,
                }
                self.measurements.append(
                    summarize_load(
                        "b",
                        f"server {name} {precision} mbs {max_batch} c{concurrency}",
                        runs,
                        params,
                        load_start,
                    )
                )
            if full:
                self.attempt(
                    "d",
                    f"relabel {name} {precision}",
                    lambda: self.measure_relabel(name, precision, server.target, seen_keys),
                )
                if name in QUALITY_MODELS:
                    self.attempt(
                        "q",
                        f"digit-scenes mAP {name} {precision}",
                        lambda: self.measure_quality(name, precision, server.target),
                    )
                if precision == "fp32" or name not in QUALITY_MODELS:
                    self.attempt(
                        "profile",
                        f"py-spy profile of the server {name} {precision}",
                        lambda: self.profile_server(name, precision, server, data, options),
                    )
                if precision == "fp32" and name == self.plan.clip_models[0]:
                    self.attempt(
                        "profile",
                        f"py-spy profile of relabeling {name}",
                        lambda: self.profile_relabel(name, server, seen_keys),
                    )
        finally:
            server.stop()

    def measure_relabel(self, name: str, precision: str, target: str, keys: list[str]) -> None:
        """(d) relabel every image the server has encoded with a new 20-class vocabulary.

        Each repeat sends the corpus twice: first with a vocabulary the server has not seen, so
        the pass includes encoding the 20 prompts, then again with the same vocabulary, whose
        text embeddings are then cached.
        """
        from cdul_client import ContentKey, PseudoLabelOptions

        from .server_bench import run_load, summarize_load

        unique = sorted(set(keys))
        batch = self.plan.relabel_batch
        passes: dict[str, list[Any]] = {"new vocabulary": [], "vocabulary cached": []}
        load_start = load_average()
        requests = [
            [(f"key-{i}", ContentKey(key)) for i, key in enumerate(unique[s : s + batch])]
            for s in range(0, len(unique), batch)
        ]
        for repeat in range(self.plan.repeats):
            # A template this server has not seen makes a new vocabulary of the same classes.
            options = PseudoLabelOptions(
                grid_size=self.plan.grid_size, templates=[f"a photo of a {{}}, take {repeat}."]
            )
            for kind, runs in passes.items():
                result = run_load(
                    target,
                    requests,
                    concurrency=4,
                    call="pseudo_label",
                    class_names=corpus.RELABEL_VOCABULARY,
                    options=options,
                    model=name,
                )
                if result.cache_hits != result.images:
                    raise RuntimeError(
                        f"only {result.cache_hits} of {result.images} relabeled images were "
                        f"cache hits ({kind})"
                    )
                runs.append(result)
        for kind, runs in passes.items():
            params = {
                "model": name,
                "precision": precision,
                "pass": kind,
                "images": len(unique),
                "images per request": batch,
                "concurrency": 4,
                "classes": len(corpus.RELABEL_VOCABULARY),
                "grid": f"{self.plan.grid_size}x{self.plan.grid_size}",
            }
            self.measurements.append(
                summarize_load("d", f"relabel {name} {precision}, {kind}", runs, params, load_start)
            )

    def measure_quality(self, name: str, precision: str, target: str) -> None:
        """Pseudo-label mAP on digit-scenes test canvases through the server."""
        from PIL import Image

        from cdul_client import LabelerClient, PseudoLabelOptions
        from cdul_training.metrics import mean_average_precision
        from cdul_training.scenes import CLASS_NAMES, generate_split

        images, label_sets = generate_split("test", self.plan.quality_scenes, 96, seed=0)
        encoded = []
        for image in images:
            buffer = io.BytesIO()
            Image.fromarray(image, mode="L").save(buffer, format="PNG")
            encoded.append(buffer.getvalue())
        options = PseudoLabelOptions(grid_size=self.plan.grid_size)
        scores: dict[str, list[np.ndarray]] = {"global": [], "aggregate": [], "final": []}
        with LabelerClient(target, timeout_s=600) as client:
            for start in range(0, len(encoded), 32):
                chunk = [
                    (f"s{start + i}", data) for i, data in enumerate(encoded[start : start + 32])
                ]
                response = client.pseudo_label(
                    chunk, list(CLASS_NAMES), options=options, model=name
                )
                for result in response.results:
                    result.raise_for_status()
                    scores["global"].append(np.asarray(result.global_scores))
                    scores["aggregate"].append(np.asarray(result.aggregate_scores))
                    scores["final"].append(np.asarray(result.final_scores))
        labels = np.zeros((len(label_sets), len(CLASS_NAMES)), dtype=np.uint8)
        for row, label_set in enumerate(label_sets):
            for label in label_set:
                labels[row, CLASS_NAMES.index(label)] = 1
        self.quality.setdefault(name, {})[precision] = {
            kind: mean_average_precision(np.stack(values), labels).map
            for kind, values in scores.items()
        }
        self.quality[name]["scenes"] = (
            f"{len(encoded)} digit-scenes test canvases, side 96, seed 0 "
            "(cdul_training.scenes.generate_split)"
        )

    def profile_server(
        self, name: str, precision: str, server: Any, data: list[bytes], options: Any
    ) -> None:
        """py-spy samples of the server while concurrency-4 clients keep it busy."""
        from .server_bench import profile_server, run_load

        seconds = self.plan.profile_seconds

        def load() -> None:
            deadline = time.monotonic() + seconds - 1.5
            while time.monotonic() < deadline:
                # One request per client thread, so the load stops soon after the deadline.
                requests = [[(f"p{i}", corpus.unique_bytes(data[i % len(data)]))] for i in range(4)]
                run_load(
                    server.target,
                    requests,
                    concurrency=4,
                    call="pseudo_label",
                    class_names=self.class_names,
                    options=options,
                    model=name,
                )

        out = self.work_dir / f"py-spy-{name}-{precision}.txt"
        summary = profile_server(server, out, seconds, load)
        if summary is None:
            raise RuntimeError("py-spy did not produce a profile (see the log)")
        summary["file"] = out.name
        self.profiles[f"server {name} {precision}"] = summary

    def profile_relabel(self, name: str, server: Any, keys: list[str]) -> None:
        """py-spy samples of the server while it relabels from the cache, vocabulary cached."""
        from cdul_client import ContentKey, PseudoLabelOptions

        from .server_bench import profile_server, run_load

        seconds = max(2, self.plan.profile_seconds // 2)
        batch = self.plan.relabel_batch
        unique = sorted(set(keys))
        requests = [
            [(f"key-{i}", ContentKey(key)) for i, key in enumerate(unique[s : s + batch])]
            for s in range(0, len(unique), batch)
        ]
        # The template of the first relabeling repeat, whose text embeddings are cached.
        options = PseudoLabelOptions(
            grid_size=self.plan.grid_size, templates=["a photo of a {}, take 0."]
        )

        def load() -> None:
            deadline = time.monotonic() + seconds - 1.5
            while time.monotonic() < deadline:
                run_load(
                    server.target,
                    requests,
                    concurrency=4,
                    call="pseudo_label",
                    class_names=corpus.RELABEL_VOCABULARY,
                    options=options,
                    model=name,
                )

        out = self.work_dir / f"py-spy-{name}-relabel.txt"
        summary = profile_server(server, out, seconds, load)
        if summary is None:
            raise RuntimeError("py-spy did not produce a profile (see the log)")
        summary["file"] = out.name
        self.profiles[f"server {name} relabeling"] = summary

    # -- (e) --------------------------------------------------------------------------------

    def measure_classifier(self) -> None:
        """(e) the classifier eager and in ONNX Runtime on the same pixels, then Predict."""
        from cdul_server.preprocess import PreprocessConfig, preprocess_batch

        from .classifier import build_classifier, export_classifier, measure_classifier

        arch = self.plan.classifier_arch
        name = f"{arch}-random"
        module = build_classifier(arch, len(self.class_names))
        folder = self.repositories / name / name
        # The weights come from a fixed seed, so an earlier export of the same architecture
        # and size is the same model; the logit difference measured below checks it.
        exported = folder / "config.json"
        if exported.is_file() and (
            json.loads(exported.read_text())["preprocess"]["size"] != self.plan.classifier_size
        ):
            shutil.rmtree(folder)
        command = export_classifier(
            module,
            folder,
            self.class_names,
            arch=arch,
            size=self.plan.classifier_size,
            threads=self.plan.threads,
            reuse=exported.is_file(),
        )
        self.models[name] = {
            "folder": folder,
            "how": f"cdul-export {command}",
            "int8": "none (fp32 only)",
            "preprocess": json.loads((folder / "config.json").read_text())["preprocess"],
            "embedding_dim": "n/a",
        }
        config = json.loads((folder / "config.json").read_text())
        preprocess = PreprocessConfig.from_dict(config["preprocess"])
        paths = self.paths[: self.plan.classifier_images]
        pixels = preprocess_batch([corpus.load_rgb(p) for p in paths], preprocess, "squash")
        self.measurements.extend(
            measure_classifier(
                module,
                folder,
                pixels,
                arch=arch,
                batch_size=self.plan.classifier_batch,
                threads=self.plan.threads,
                repeats=self.plan.repeats,
            )
        )
        self.attempt(
            "e",
            f"Predict {name} through the server",
            lambda: self.measure_predict(name, folder, paths),
        )

    def measure_predict(self, name: str, folder: Path, paths: list[Path]) -> None:
        """(e) Predict through cdul-server and cdul_client at concurrency 1 and 4."""
        from .server_bench import run_load, server_help, start_server, summarize_load

        help_text = server_help()
        flags = self.server_flags(help_text, "fp32", self.plan.classifier_batch * 4)
        server = start_server(folder.parent, self.work_dir / "servers", flags)
        data = [p.read_bytes() for p in paths]
        batch = self.plan.classifier_batch
        try:
            warmup = [[corpus.unique_bytes(data[0])]]
            run_load(server.target, warmup, concurrency=1, call="predict", model=name)
            for concurrency in (1, 4):
                runs = []
                load_start = load_average()
                for _ in range(self.plan.repeats):
                    # Fresh bytes: the server caches predictions by content key.
                    requests = [
                        [
                            (f"i{s + i}", corpus.unique_bytes(d))
                            for i, d in enumerate(data[s : s + batch])
                        ]
                        for s in range(0, len(data), batch)
                    ]
                    runs.append(
                        run_load(
                            server.target,
                            requests,
                            concurrency=concurrency,
                            call="predict",
                            model=name,
                        )
                    )
                params = {
                    "model": f"{self.plan.classifier_arch} (random init)",
                    "image size": f"{self.plan.classifier_size}x{self.plan.classifier_size}",
                    "images per request": batch,
                    "concurrency": concurrency,
                    "precision": "fp32",
                    "threads": self.plan.threads,
                    "server command": server.command_line,
                }
                self.measurements.append(
                    summarize_load(
                        "e",
                        f"{self.plan.classifier_arch} Predict c{concurrency}",
                        runs,
                        params,
                        load_start,
                    )
                )
        finally:
            server.stop()

    # -- all --------------------------------------------------------------------------------

    def execute(self) -> dict[str, Any]:
        """Measure every figure of the plan and return the results as plain data."""
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        load_at_start = load_average()
        self.attempt("f", "matrix-multiply ceiling", self.measure_ceiling)
        for name in self.plan.clip_models:
            if not self.attempt("a", f"model {name}", partial(self.prepare_model, name)):
                continue
            self.attempt("a", f"encoder {name}", partial(self.measure_encoders, name))
            self.attempt("c", f"reproduction {name}", partial(self.measure_reproduction, name))
            self.attempt("b", f"server {name}", partial(self.measure_server, name))
        self.attempt("e", "classifier", self.measure_classifier)
        return {
            "command": self.command,
            "mode": "smoke" if self.plan.smoke else "full",
            "started": started,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "load_at_start": load_at_start,
            "load_at_end": load_average(),
            "git_commit": _git_commit(),
            "images": {
                "folder": self.images_dir.name,
                "count": len(self.paths),
                "sizes": _image_sizes(self.paths),
            },
            "machine": hardware.machine_facts(),
            "versions": hardware.versions(),
            "blas": hardware.blas_info(),
            "plan": self.plan.to_dict(),
            "models": {k: {**v, "folder": str(v["folder"].name)} for k, v in self.models.items()},
            "measurements": [m.to_dict() for m in self.measurements],
            "flops": self.flops,
            "profiles": self.profiles,
            "quality": self.quality,
            "missing": self.missing,
            "notes": self.notes,
        }


def _open_clip_name(name: str) -> str:
    """Register the config of a model that open_clip does not ship and return its name.

    "smoke" is the tiny model of the smoke mode; "digits-clip" is the embedded default, whose
    config lives in cdul_training. Other names are open_clip's own.
    """
    if name == "smoke":
        from .reproduction import register_smoke_model

        return register_smoke_model()
    if name == "digits-clip":
        from cdul_training.digits_clip import register_model_config

        return register_model_config()
    return name


def _git_commit() -> str:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=corpus.REPOSITORY_ROOT,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    dirty = subprocess.run(
        ["git", "status", "--porcelain"], capture_output=True, text=True, cwd=corpus.REPOSITORY_ROOT
    ).stdout.strip()
    return done.stdout.strip() + (" with uncommitted changes" if dirty else "")


def _image_sizes(paths: list[Path]) -> dict[str, Any]:
    from PIL import Image

    widths, heights = [], []
    for path in paths:
        with Image.open(path) as image:
            widths.append(image.width)
            heights.append(image.height)
    return {
        "width_min": min(widths),
        "width_max": max(widths),
        "height_min": min(heights),
        "height_max": max(heights),
        "median_pixels": float(np.median(np.array(widths) * np.array(heights))),
    }
