"""The results page: Markdown tables of every figure, the targets, profiles and gaps."""

from __future__ import annotations

import re
from typing import Any

TARGET_ENCODER_SHARE = 0.9
TARGET_REPRODUCTION_SPEEDUP = 2.0
TARGET_MAP_DROP = 0.5
TARGET_RELABEL_RATE = 500.0
TARGET_UTILIZATION = 0.6


def _num(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _rate(m: dict[str, Any]) -> str:
    return f"{_num(m['median'])} ({_num(m['low'])}-{_num(m['high'])})"


def _load(m: dict[str, Any]) -> str:
    return f"{m['load_start']:.2f} / {m['load_end']:.2f}"


def _select(results: dict[str, Any], figure: str, **params: Any) -> list[dict[str, Any]]:
    return [
        m
        for m in results["measurements"]
        if m["figure"] == figure and all(m["params"].get(k) == v for k, v in params.items())
    ]


def _best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    return max(rows, key=lambda m: m["median"]) if rows else None


def _ceiling(results: dict[str, Any]) -> float | None:
    rates = [m["median"] for m in results["measurements"] if m["figure"] == "f"]
    return max(rates) if rates else None


def _utilization(results: dict[str, Any], model: str, images_per_s: float) -> float | None:
    flops = results["flops"].get(model, {}).get("onnx")
    ceiling = _ceiling(results)
    if not flops or not ceiling:
        return None
    views_per_image = 1 + results["plan"]["grid_size"] ** 2
    return images_per_s * views_per_image * flops / (ceiling * 1e9)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def _verdict(measured: float | None, required: float, higher_is_better: bool = True) -> str:
    if measured is None:
        return "not measured"
    met = measured >= required if higher_is_better else measured <= required
    if met:
        return "met"
    if higher_is_better:
        return (
            f"missed by {100 * (1 - measured / required):.0f}% ({measured:.3g} of {required:.3g})"
        )
    return f"missed by {measured - required:.2f}"


def _targets(results: dict[str, Any]) -> list[str]:
    model = results["plan"]["clip_models"][0] if results["plan"]["clip_models"] else "?"
    grid = results["plan"]["grid_size"]
    lines = [
        f"Targets, as set for a two-core CPU, apply to {model} with a {grid}x{grid} grid.",
        "",
        "| target | measured | result |",
        "| --- | --- | --- |",
    ]
    for precision in results["plan"]["precisions"]:
        encoder = _best(_select(results, "a", model=model, precision=precision))
        server = _best(_select(results, "b", model=model, precision=precision, concurrency=4))
        ratio = None
        measured = "n/a"
        if encoder and server:
            ratio = server["median"] / encoder["median"]
            measured = (
                f"{ratio:.2f} ({server['median']:.3g} / {encoder['median']:.3g} images/s, "
                f"max batch size {server['params']['max batch size']}, encoder batch "
                f"{encoder['params']['batch size']})"
            )
        lines.append(
            f"| (b) at concurrency 4 >= {TARGET_ENCODER_SHARE} x (a), {precision} | {measured} "
            f"| {_verdict(ratio, TARGET_ENCODER_SHARE)} |"
        )
    best = _best(_select(results, "b", model=model))
    reproduction = _best(_select(results, "c", model=model))
    speedup = None
    measured = "n/a"
    if best and reproduction:
        speedup = best["median"] / reproduction["median"]
        measured = (
            f"{speedup:.2f} ({best['median']:.3g} / {reproduction['median']:.3g} images/s; best "
            f"server setting: {best['params']['precision']}, max batch size "
            f"{best['params']['max batch size']}, concurrency {best['params']['concurrency']})"
        )
    lines.append(
        f"| best server setting >= {TARGET_REPRODUCTION_SPEEDUP} x (c) | {measured} "
        f"| {_verdict(speedup, TARGET_REPRODUCTION_SPEEDUP)} |"
    )
    quality_model = next(iter(results["quality"]), None)
    if best and quality_model:
        quality = results["quality"][quality_model]
        precision = best["params"]["precision"]
        if "fp32" in quality and precision in quality:
            drop = quality["fp32"]["final"] - quality[precision]["final"]
            lines.append(
                f"| ... with pseudo labels within {TARGET_MAP_DROP} mAP of fp32 on digit-scenes "
                f"({quality_model}, {precision}) | fp32 {quality['fp32']['final']:.2f}, "
                f"{precision} {quality[precision]['final']:.2f} mAP: drop {drop:.2f} "
                f"| {_verdict(drop, TARGET_MAP_DROP, higher_is_better=False)} |"
            )
    else:
        lines.append(
            f"| ... with pseudo labels within {TARGET_MAP_DROP} mAP of fp32 on digit-scenes "
            "| n/a | not measured |"
        )
    relabels = _select(results, "d", model=model)
    for relabel in relabels:
        kind = relabel["params"].get("pass", "new vocabulary")
        lines.append(
            f"| (d) >= {TARGET_RELABEL_RATE:.0f} images/s, {kind} "
            f"| {relabel['median']:.0f} images/s ({relabel['params']['images']} images, "
            f"{relabel['params']['precision']} server) "
            f"| {_verdict(relabel['median'], TARGET_RELABEL_RATE)} |"
        )
    if not relabels:
        lines.append(f"| (d) >= {TARGET_RELABEL_RATE:.0f} images/s | n/a | not measured |")
    encoder = _best(_select(results, "a", model=model, precision="fp32"))
    utilization = _utilization(results, model, encoder["median"]) if encoder else None
    lines.append(
        f"| (a) fp32 >= {_percent(TARGET_UTILIZATION)} of the matmul ceiling | "
        f"{_percent(utilization)} | {_verdict(utilization, TARGET_UTILIZATION)} |"
    )
    return lines


def _hardware(results: dict[str, Any]) -> list[str]:
    machine = results["machine"]
    blas = "; ".join(
        f"{b['library']} {b['version'] or ''} in {b['file']} ({b['threads']} threads"
        + (f", {b['architecture']} kernels" if b.get("architecture") else "")
        + ")"
        for b in results["blas"]
    )
    versions = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    images = results["images"]
    sizes = images["sizes"]
    return [
        "| | |",
        "| --- | --- |",
        f"| CPU | {machine['cpu_model']}, {machine.get('cpu_identity', '')} "
        f"({machine['cores']} cores usable, "
        f"{', '.join(machine['cpu_flags'])}) |",
        f"| memory | {machine['memory_gib']} GiB |",
        f"| kernel | {machine['kernel']} {machine['machine']} |",
        f"| BLAS and OpenMP in the benchmark process | {blas or 'unknown'} |",
        f"| threads of every runtime | {results['plan']['threads']} |",
        f"| software | {versions} |",
        f"| images | {images['count']} images of {images['folder']}, {sizes['width_min']}-"
        f"{sizes['width_max']} x {sizes['height_min']}-{sizes['height_max']} px, median "
        f"{sizes['median_pixels'] / 1e6:.2f} MP |",
        f"| repeats | {results['plan']['repeats']} per figure (plus one untimed warm-up run) |",
    ]


def _ceiling_section(results: dict[str, Any]) -> list[str]:
    lines = [
        "| library | matrices | threads | GFLOP/s median (min-max) | load start / end |",
        "| --- | --- | --- | --- | --- |",
    ]
    for m in _select(results, "f"):
        p = m["params"]
        shape = p.get("shape") or f"{p['size']} x {p['size']} square"
        lines.append(f"| {p['library']} | {shape} | {p['threads']} | {_rate(m)} | {_load(m)} |")
    ceiling = _ceiling(results)
    lines += [
        "",
        f"The ceiling used for utilization is the best median of these rows, square or of "
        f"the encoder's own shapes: {ceiling:.1f} GFLOP/s."
        if ceiling
        else "No ceiling was measured.",
        "",
        "FLOPs per view (2 x multiply-accumulates of one encoder pass at batch 1):",
        "",
        "| model | ONNX graph count | torch FlopCounterMode | by operator (ONNX) |",
        "| --- | --- | --- | --- |",
    ]
    for model, entry in results["flops"].items():
        torch_count = f"{entry['torch'] / 1e9:.3f} GFLOP" if entry.get("torch") else "n/a"
        by_op = ", ".join(f"{op} {value / 1e9:.3f}" for op, value in entry["onnx_by_op"].items())
        uncounted = (
            f"; {len(entry['onnx_uncounted'])} nodes with unknown shapes left out"
            if entry["onnx_uncounted"]
            else ""
        )
        lines.append(
            f"| {model} | {entry['onnx'] / 1e9:.3f} GFLOP | {torch_count} | {by_op}{uncounted} |"
        )
    lines += [
        "",
        "Method: the ONNX count sets the batch axis to 1, infers every tensor shape (ONNX shape "
        "inference, then one batch-1 run of ONNX Runtime for the shapes it cannot infer) and adds "
        "2 x M x N x K of every MatMul and Gemm, 2 x output size x (C_in / groups) x kernel area "
        "of every Conv, and both products of any Attention node. Element-wise operations, "
        "softmax and normalization are left out. The torch column is FlopCounterMode on the "
        "open_clip model's image tower with gradients enabled (so attention takes the unfused "
        "path); it counts matrix products and convolutions but not the scaled dot-product "
        "attention kernel, so it is lower by the two attention products.",
    ]
    return lines


def _encoder_section(results: dict[str, Any]) -> list[str]:
    lines = [
        "| model | precision | batch (views) | views/s | images/s median (min-max) | "
        "utilization | load start / end |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in _select(results, "a"):
        p = m["params"]
        views = m["extra"]["views_per_s"]
        views_text = _num(sorted(views)[len(views) // 2])
        lines.append(
            f"| {p['model']} | {p['precision']} | {p['batch size']} | {views_text} | {_rate(m)} "
            f"| {_percent(_utilization(results, p.get('flops model', p['model']), m['median']))} "
            f"| {_load(m)} |"
        )
    first = next(iter(_select(results, "a")), None)
    if first:
        p = first["params"]
        lines += [
            "",
            f"Input {p['image size']} px, grid {p['grid']} (so 1 + n^2 views per image), "
            f"{p['threads']} ONNX Runtime intra-op threads, views cut from the first images of "
            "the corpus with cdul_server.preprocess before timing, encoded with "
            "cdul_server.model_repository.ClipModel.encode_images. Utilization is views/s x "
            "FLOPs per view over the fp32 matmul ceiling; for int8 it is the fp32-equivalent "
            "rate. int8 graphs quantize MatMul and Gemm only, as cdul-export does. A model name "
            "ending in -int8-conv is the same graph quantized by the benchmark with Conv in int8 "
            "too, to show what ONNX Runtime's ConvInteger kernel would cost.",
        ]
    return lines


def _server_section(results: dict[str, Any]) -> list[str]:
    lines = [
        "| model | precision | --max-batch-size | concurrency | images/s median (min-max) | "
        "p50 ms | p95 ms | p99 ms | (b)/(a) | (b)/(c) | utilization | load start / end |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    commands: list[str] = []
    for m in _select(results, "b"):
        p = m["params"]
        encoder = _best(_select(results, "a", model=p["model"], precision=p["precision"]))
        ratio = f"{m['median'] / encoder['median']:.2f}" if encoder else "n/a"
        reproduction = _best(_select(results, "c", model=p["model"]))
        speedup = f"{m['median'] / reproduction['median']:.2f}" if reproduction else "n/a"
        lines.append(
            f"| {p['model']} | {p['precision']} | {p['max batch size']} | {p['concurrency']} "
            f"| {_rate(m)} | {m['extra']['p50_ms']:.0f} | {m['extra']['p95_ms']:.0f} "
            f"| {m['extra']['p99_ms']:.0f} | {ratio} | {speedup} "
            f"| {_percent(_utilization(results, p['model'], m['median']))} | {_load(m)} |"
        )
        if p["server command"] not in commands:
            commands.append(p["server command"])
    lines += [
        "",
        "One image per PseudoLabel request (fresh bytes each time, so no cache hit), each client "
        "thread with its own cdul_client.LabelerClient; images/s is images over the wall time "
        "of a repeat. Latency percentiles pool the requests of all repeats, so with a few dozen "
        "requests p99 is close to the maximum. (b)/(a) divides by the best encoder-alone rate "
        "at the same precision, (b)/(c) by the reproduction's rate on the same model.",
        "",
        "Server commands (model folders in the benchmark's work folder):",
        "",
        *[f"- `{command}`" for command in commands],
    ]
    return lines


def _reproduction_section(results: dict[str, Any]) -> list[str]:
    lines = [
        "| model | images/s median (min-max) | images per repeat | threads | best server "
        "images/s | server / reproduction | load start / end |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in _select(results, "c"):
        p = m["params"]
        best = _best(_select(results, "b", model=p["model"]))
        best_text = f"{best['median']:.3g}" if best else "n/a"
        ratio = f"{best['median'] / m['median']:.2f}" if best else "n/a"
        lines.append(
            f"| {p['model']} | {_rate(m)} | {p['images per repeat']} | {p['threads']} "
            f"| {best_text} | {ratio} | {_load(m)} |"
        )
    lines += [
        "",
        "open_clip with random weights in PyTorch eager mode (fp32, no_grad), per image: PIL "
        "open and convert, the model's transform on the whole image and on each of the 9 "
        "tiles, one encode_image pass on the whole image (batch 1) and one on the 9 tiles "
        "(batch 9), softmax over the classes and the tile maximum. The text embeddings of "
        "the 80 prompts are computed once before timing.",
    ]
    return lines


def _relabel_section(results: dict[str, Any]) -> list[str]:
    lines = [
        "| model | server precision | pass | images | images per request | images/s median "
        "(min-max) | p50 ms | p99 ms | load start / end |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in _select(results, "d"):
        p = m["params"]
        kind = p.get("pass", "new vocabulary")
        lines.append(
            f"| {p['model']} | {p['precision']} | {kind} | {p['images']} "
            f"| {p['images per request']} | {_rate(m)} | {m['extra']['p50_ms']:.1f} "
            f"| {m['extra']['p99_ms']:.1f} | {_load(m)} |"
        )
    lines += [
        "",
        "Every image the server encoded during (b) is sent again by content key with PASCAL "
        "VOC's 20 class names, at client concurrency 4; the benchmark checks that every result "
        "is a cache hit. Each repeat sends the corpus twice: first with a prompt template the "
        "server has not seen, so that pass includes encoding the 20 new prompts, then again "
        "with the text embeddings cached, which is the cost per image of a larger corpus.",
        "",
    ]
    for m in _select(results, "d"):
        p = m["params"]
        if p.get("pass") != "new vocabulary":
            continue
        same = _select(results, "d", model=p["model"], precision=p["precision"])
        cached = [c for c in same if c["params"].get("pass") == "vocabulary cached"]
        if cached:
            extra_s = p["images"] / m["median"] - p["images"] / cached[0]["median"]
            lines.append(
                f"- {p['model']}, {p['precision']} server: a pass with a new vocabulary takes "
                f"{extra_s:.2f} s longer than with the vocabulary cached (medians), the cost of "
                "encoding the 20 prompts once."
            )
    return lines


def _classifier_section(results: dict[str, Any]) -> list[str]:
    rows = _select(results, "e")
    lines = [
        "| runtime | model | image size | batch | images/s median (min-max) | p50 ms | "
        "load start / end |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in rows:
        p = m["params"]
        runtime = p.get("runtime") or f"cdul-server Predict, concurrency {p['concurrency']}"
        batch = p.get("batch size", p.get("images per request"))
        p50 = f"{m['extra']['p50_ms']:.0f}" if "p50_ms" in m["extra"] else ""
        lines.append(
            f"| {runtime} | {p['model']} | {p['image size']} | {batch} | {_rate(m)} | {p50} "
            f"| {_load(m)} |"
        )
    eager = next((m for m in rows if "eager" in m["label"]), None)
    onnx = next((m for m in rows if "ONNX" in m["label"]), None)
    if eager and onnx:
        lines += [
            "",
            f"ONNX Runtime / eager: {onnx['median'] / eager['median']:.2f}. Largest absolute "
            f"logit difference between the two on the first batch: "
            f"{onnx['extra']['max_abs_logit_diff']:.2e}.",
        ]
    return lines


def _quality_section(results: dict[str, Any]) -> list[str]:
    if not results["quality"]:
        return ["Not measured (see the missing figures)."]
    lines = [
        "| model | precision | global mAP | aggregate mAP | final mAP |",
        "| --- | --- | --- | --- | --- |",
    ]
    scenes = ""
    for model, entry in results["quality"].items():
        scenes = entry.get("scenes", scenes)
        for precision, maps in entry.items():
            if precision == "scenes":
                continue
            lines.append(
                f"| {model} | {precision} | {maps['global']:.2f} | {maps['aggregate']:.2f} "
                f"| {maps['final']:.2f} |"
            )
    lines += ["", f"Pseudo labels through the server on {scenes}; mAP in percent."]
    return lines


def _profile_section(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for name, profile in results["profiles"].items():
        if name.startswith("encoder ops"):
            shares = ", ".join(
                f"{op} {100 * share:.0f}%" for op, share in list(profile.items())[:8]
            )
            lines += [f"- ONNX Runtime profiler, {name[len('encoder ops ') :]}: {shares}"]
    for name, profile in results["profiles"].items():
        if not name.startswith("server "):
            continue
        lines += [
            "",
            f"py-spy of the server ({name[len('server ') :]}) under concurrency-4 load "
            f"({profile['samples']} samples of working threads at 50 Hz, "
            f"{profile.get('idle', 0)} waiting samples left out; raw data in the work "
            f"folder as {profile['file']}). Innermost Python frames, so time inside ONNX Runtime "
            "or Pillow counts at the Python call that entered it:",
            "",
            "| frame | share of samples |",
            "| --- | --- |",
            *[f"| `{_cell(frame)}` | {100 * share:.0f}% |" for frame, share in profile["own"]],
            "",
            "cdul_server functions anywhere on the stack:",
            "",
            "| function | share of samples |",
            "| --- | --- |",
            *[f"| `{_cell(frame)}` | {100 * share:.0f}% |" for frame, share in profile["server"]],
        ]
    return lines or ["No profile was taken."]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")[:110]


def render(results: dict[str, Any], analysis: str = "") -> str:
    """Return the results page for ``results`` as Markdown.

    Args:
        results: What :meth:`cdul_bench.runner.Run.execute` returned.
        analysis: Hand-written reading of the numbers, kept between runs.
    """
    smoke = results["mode"] == "smoke"
    lines = [
        "# Benchmark results",
        "",
        "Throughput and latency of cdul's pseudo labeling and prediction, beside what a user "
        "would otherwise run, and against the machine's matrix-multiply rate. Every figure is "
        "the median over repeated runs with the minimum and maximum in brackets; load is the "
        "one-minute load average at the start and end of each measurement.",
        "",
    ]
    if smoke:
        lines += [
            "**Smoke run**: tiny models and sizes that check the harness only; these numbers "
            "say nothing about cdul's speed.",
            "",
        ]
    lines += [
        f"- Command: `{results['command']}`",
        f"- Run: {results['started']} to {results['finished']}, commit {results['git_commit']}, "
        f"load average {results['load_at_start']:.2f} at the start and "
        f"{results['load_at_end']:.2f} at the end",
        "",
        "## Hardware and software",
        "",
        *_hardware(results),
        "",
        "## Targets",
        "",
        *_targets(results),
        "",
    ]
    if analysis:
        lines += ["## Reading of the numbers", "", analysis.strip(), ""]
    lines += [
        "## (f) Machine ceiling and FLOPs per view",
        "",
        *_ceiling_section(results),
        "",
        "## (a) Encoder alone on ONNX Runtime",
        "",
        *_encoder_section(results),
        "",
        "## (b) cdul-server end to end through cdul_client",
        "",
        *_server_section(results),
        "",
        "## (c) The reproduction's way: open_clip in PyTorch, per image",
        "",
        *_reproduction_section(results),
        "",
        "## (d) Relabeling from the cache with a new 20-class vocabulary",
        "",
        *_relabel_section(results),
        "",
        "## (e) Predict: a cdul-train classifier, ONNX Runtime against PyTorch eager",
        "",
        *_classifier_section(results),
        "",
        "## int8 against fp32 pseudo labels on digit-scenes",
        "",
        *_quality_section(results),
        "",
        "## Profiles",
        "",
        *_profile_section(results),
        "",
        "## Missing figures",
        "",
    ]
    if results["missing"]:
        lines += [
            f"- ({item['figure']}) {item['what']}: {_cell(item['why'])}"
            for item in results["missing"]
        ]
    else:
        lines.append("None: every figure of the plan was measured.")
    if results["notes"]:
        lines += ["", "## Notes", "", *[f"- {note}" for note in results["notes"]]]
    lines += [
        "",
        "## Models",
        "",
        *[
            f"- {name}: {info['how']}; int8 graph from {info['int8']}; input "
            f"{info['preprocess']['size']} px, embedding {info['embedding_dim']}"
            for name, info in results["models"].items()
        ],
        "",
    ]
    return _relative_paths("\n".join(lines))


def _relative_paths(page: str) -> str:
    """Write the paths of this checkout relative to the repository root, as a user types them."""
    from .corpus import REPOSITORY_ROOT

    for path, replacement in ((REPOSITORY_ROOT, "."), (REPOSITORY_ROOT.parent, "..")):
        # Only whole path components: a longer folder name that starts the same stays.
        pattern = r"(?<![\w./-])" + re.escape(str(path)) + r"(?=/|[^\w.-]|$)"
        page = re.sub(pattern, replacement, page)
    return page
