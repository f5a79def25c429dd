"""The markdown section of ``benchmarks/gpu.py``: one page section rendered from the JSON record only.

Rendering from the record (never from live objects) keeps the page and ``gpu.json`` in step, and a value
the machine could not measure (``null``) is printed as "n/a", never as a number.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- benchmarks/gpu.py: begin -->", "<!-- benchmarks/gpu.py: end -->"


def num(value: Any, spec: str = ".1f", scale: float = 1.0, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value * scale:{spec}}{suffix}"


def pct(value: Any) -> str:
    return num(value, ".1f", 100.0, " %")


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def head_lines(record: dict[str, Any]) -> list[str]:
    dev = record["machine"]
    name = dev["device_name"] or "CPU"
    peak = num(dev["peak_tflops_16bit"], ".0f", suffix=" TFLOP/s dense 16-bit") if dev["peak_tflops_16bit"] else "n/a"
    return ["## GPU run (`benchmarks/gpu.py`)", "",
            f"Device **{name}** (`{dev['device']}`), peak {peak}; torch {dev['torch']} "
            f"(built for CUDA {dev['torch_cuda_build'] or 'n/a'}), "
            f"{dev['cpu_count']} CPU cores. Profile `{record['profile']}`, finished {record['finished']}, "
            f"{num(record['wall_s'], '.0f')} s in all. Reproduce:", "", "```console",
            f"$ python benchmarks/gpu.py{' --device cpu --tiny' if record['profile'] == 'tiny' else ''}", "```", ""]


def extract_lines(ex: dict[str, Any]) -> list[str]:
    if "error" in ex:
        return ["### Extraction", "", f"Failed: `{ex['error']}`", ""]
    dec = ex["decode"]
    lines = ["### Extraction (`ktc extract`)", "",
             f"{ex['images']} synthetic JPEGs x {ex['views']} views, {len(ex['teachers'])} random-init teachers in "
             f"{ex['waves']} wave(s), autocast {ex['autocast_dtype'] or 'off'}, {ex['workers']} decode workers. "
             "One image = one view through a teacher; the floor is the teacher's own forward on a batch already on "
             "the device, same autocast.", "",
             f"* whole run: **{num(ex['images_per_s'])} images/s** through all teachers (excluding weight loads; "
             f"{num(ex['images_per_s_wall'])} with them), floor {num(ex['floor_images_per_s'])}: "
             f"**{pct(ex['vs_floor'])} of the floor**",
             f"* {num(ex['tflops'])} TFLOP/s achieved ({pct(ex['peak_fraction'])} of peak; floor "
             f"{num(ex['floor_tflops'])} TFLOP/s, {pct(ex['floor_peak_fraction'])}); GPU utilisation "
             f"{num(ex['gpu_util_mean'], '.0f', suffix=' %')}",
             f"* decode {num(dec['decode_ms'], '.2f')} ms + resize {num(dec['resize_ms'], '.2f')} ms per image on one "
             f"core: the decode side can feed {num(dec['decode_bound_images_per_s'], '.0f')} source images/s", ""]
    rows = [(t["id"], "x".join(map(str, t["input_size"][1:])), num(t["gflops_per_image"], ".2f"),
             num(t["ktc_images_per_s"], ".0f"), num(t["floor_images_per_s"], ".0f"), pct(t["vs_floor"]),
             num(t["ktc_tflops"]), pct(t["ktc_peak_fraction"]), num(t["floor_tflops"]), pct(t["floor_peak_fraction"]))
            for t in ex["teachers"]]
    return lines + table(("teacher", "input", "GFLOPs/image", "ktc images/s", "floor images/s", "ktc / floor",
                          "ktc TFLOP/s", "of peak", "floor TFLOP/s", "of peak"), rows) + [""]


def train_lines(tr: dict[str, Any]) -> list[str]:
    if "error" in tr:
        return ["### Training", "", f"Failed: `{tr['error']}`", ""]
    lines = ["### Training (`ktc train` step: `build_run` + `train_step`)", "",
             f"Student {tr['student']} at {tr['img_size']} px, batch {tr['batch_size']}, {tr['dtype']}, "
             f"{tr['workers']} loader workers, {tr['configs'][0]['steps']} timed steps after {tr['warmup']} warm-up. "
             "Loader wait: share of the step spent in `next(loader)`.", ""]
    rows = [(c["name"], num(c["samples_per_s"], ".0f"), num(c["compute_samples_per_s"], ".0f"),
             pct(c["loader_wait_fraction"]), num(c["vs_plain_ce"], ".2f", suffix="x"), num(c["head_params_m"], ".1f"),
             num(c["peak_gpu_mem_gib"], ".1f"), num(c["gpu_util_mean"], ".0f", suffix=" %")) for c in tr["configs"]]
    return lines + table(("configuration", "samples/s", "samples/s without loader wait", "loader wait",
                          "step vs plain CE", "head params (M)", "peak GPU GiB", "GPU util"), rows) + [""]


def tests_lines(ct: dict[str, Any]) -> list[str]:
    if "error" in ct:
        return ["### CUDA-only tests", "", f"Failed to run: `{ct['error']}`", ""]
    return ["### CUDA-only tests", "", f"**{ct['status']}**: {ct['passed']} passed, {ct['failed']} failed, "
            f"{ct['errors']} errors, {ct['skipped']} skipped ({num(ct['wall_s'], '.0f')} s):", "", "```console",
            f"$ {ct['command']}", "```", ""]


def codec_lines(cd: dict[str, Any] | None) -> list[str]:
    if not cd:
        return []
    if "error" in cd:
        return ["### Compact feature maps", "", f"Failed: `{cd['error']}`", ""]
    return ["### Compact feature maps: decoding in the read path (`benchmarks/gpu_codec.py`)", "",
            f"`{cd['codec']}` on synthetic {cd['grid']}x{cd['grid']}x{cd['channels']} maps ({cd['code_bytes']} code "
            f"bytes per map against {cd['fp16_bytes']} in fp16; mean cosine {num(cd['mean_cosine'], '.4f')}; fitted on "
            f"{cd['fit_maps']} maps in {num(cd['fit_s'])} s on the host): decoding {cd['maps']} maps takes "
            f"**{num(cd['decode_ms'], '.2f')} ms** ({num(cd['maps_per_s'], '.0f')} maps/s, "
            f"{num(cd['mflop_per_map'])} MFLOP per map); the plain store's device work for the same maps, an fp16 "
            f"cast, {num(cd['fp16_cast_ms'], '.3f')} ms.", ""]


def render(record: dict[str, Any]) -> str:
    lines = [BEGIN, *head_lines(record), *extract_lines(record["extract"]), *train_lines(record["train"]),
             *codec_lines(record.get("codec")), *tests_lines(record["cuda_tests"]), END]
    return "\n".join(lines) + "\n"


def write_section(doc: Path, record: dict[str, Any]) -> Path:
    """Replace this script's section of ``doc`` (between its markers), append it, or start the page."""
    section = render(record)
    old = doc.read_text(encoding="utf-8") if doc.exists() else "# GPU benchmarks\n\n"
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END) + "\n?", re.S)
    new = pattern.sub(lambda _: section, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + section
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(new, encoding="utf-8")
    return doc
