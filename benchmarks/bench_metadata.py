"""Root metadata per teacher, and the time to open a store and run ``ktc info``, at 10, 100 and 1000 teachers,
store format v1 vs v2 side by side in one run.

Every reader (``ktc info``, ``ktc train``, a remote ``zarr.open_group``) parses the root ``zarr.json``, whose
consolidated metadata holds every teacher's attributes and every array's metadata. The seed is one real
extraction at the design point's widths (timm ``tf_efficientnet_lite0``, random init: D = 1280, 1000
ImageNet classes, top-20 logits, a 2x2 feature map) over the 12 built-in photos with ``classes:
imagenet-1k``. Its v1 twin holds what ktc wrote before v2 (feature statistics as JSON lists in the
attributes, the class list copied into each teacher). ``benchmarks/common.synthetic_store`` copies the
teacher group under new ids and consolidates, as ``ktc extract`` finalizes.

Usage: python benchmarks/bench_metadata.py [--teachers 10,100,1000] [--doc]
Writes benchmarks/results/metadata.json (rendered into docs/benchmarks.md by ``run_all.py --doc-only``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import common  # noqa: E402

RESULTS = HERE / "results" / "metadata.json"
TEACHER = {"id": "lite0", "source": "timm", "model": "tf_efficientnet_lite0", "pretrained": "none",
           "outputs": ["features", "logits", "featmap"], "logits": {"topk": 20}, "featmap": {"grid": 2}}


def seed_store(work: Path) -> Path:
    manifest = common.write_manifest(work / "manifest.yaml", work, [TEACHER], views=2, unit_rows=16,
                                     dataset={"builtin": "skimage", "classes": "imagenet-1k"})
    common.run_extract_inprocess(manifest, work / "v2.zarr", workers=0)
    return work / "v2.zarr"


def as_v1(v2: Path, out: Path) -> Path:
    """The same store as ktc wrote it before v2: statistics as JSON lists, the class list in each teacher."""
    import numpy as np
    import zarr

    from kt_cache.store import StoreReader

    shutil.copytree(v2, out)
    reader = StoreReader(str(v2))
    doc_path = out / "teachers" / "lite0" / "zarr.json"
    doc = json.loads(doc_path.read_text())
    stats = reader.feature_stats("lite0")
    doc["attributes"]["ktc_teacher"]["feature_stats"] = {
        "mean": np.asarray(stats["mean"]).tolist(), "std": np.asarray(stats["std"]).tolist(), "count": stats["count"]}
    doc["attributes"]["ktc_teacher"]["class_names"] = reader.teacher_attrs("lite0")["class_names"]
    doc_path.write_text(json.dumps(doc, indent=2))
    shutil.rmtree(out / "teachers" / "lite0" / "stats")
    root = json.loads((out / "zarr.json").read_text())
    root["attributes"]["ktc"]["version"] = 1
    root.pop("consolidated_metadata", None)
    (out / "zarr.json").write_text(json.dumps(root, indent=2))
    zarr.consolidate_metadata(str(out))
    return out


def measure(store: Path, teachers: int) -> dict:
    from kt_cache.store import StoreReader

    start = time.perf_counter()
    reader = StoreReader(str(store))
    for tid in reader.teacher_ids():
        reader.teacher_attrs(tid)
    open_s = time.perf_counter() - start
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "kt_cache", "info", str(store)], capture_output=True, text=True)
    info_s = time.perf_counter() - start
    assert done.returncode == 0, done.stderr
    root_bytes = (store / "zarr.json").stat().st_size
    return {"teachers": teachers, "root_json_bytes": root_bytes, "bytes_per_teacher": root_bytes / teachers,
            "open_and_attrs_s": open_s, "ktc_info_s": info_s}


def teacher_breakdown(store: Path) -> dict:
    """Bytes of one teacher in the consolidated metadata: its attributes, and its arrays' metadata."""
    doc = json.loads((store / "zarr.json").read_text())["consolidated_metadata"]["metadata"]
    compact = {"separators": (",", ":")}        # as the root document stores them
    attrs = len(json.dumps(doc["teachers/s000"]["attributes"], **compact))
    arrays = sum(len(json.dumps(k)) + 1 + len(json.dumps(v, **compact)) for k, v in doc.items()
                 if k.startswith("teachers/s000/"))
    return {"attrs_bytes": attrs, "arrays_bytes": arrays}


def run(counts: list[int], work: Path) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    seeds = {"v2": seed_store(work / "seed")}
    seeds["v1"] = as_v1(seeds["v2"], work / "seed" / "v1.zarr")
    rows = []
    for version, seed in seeds.items():
        for count in counts:
            store = common.synthetic_store(seed, count, work / f"{version}-{count}.zarr")
            rows.append({"version": version, **measure(store, count), **teacher_breakdown(store)})
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(store)
    return {"date": time.strftime("%Y-%m-%d"), "teacher": TEACHER["model"], "rows": rows,
            "load_average": common.load_average()}


def render(result: dict) -> list[str]:
    """The docs/benchmarks.md section."""
    lines = ["## Root metadata per teacher (store format v1 vs v2)", "",
             f"`python benchmarks/bench_metadata.py --doc` ({result['date']}): copies of one `{result['teacher']}` "
             "teacher (D = 1280, 1000 ImageNet classes, top-20 logits, 2x2 map) in one store; the root `zarr.json` "
             "holds the consolidated metadata every reader parses. `open` = `StoreReader` plus every teacher's "
             "attributes in-process; `ktc info` = the command in a fresh process (under 1 s of it is start-up). Both "
             "formats are read by this ktc's reader, which lists every teacher's nodes in one call; the reader "
             "before it looked each teacher up separately, rescanning the consolidated metadata each time: 18.6 s "
             "to open and 33 s for `ktc info` at 1000 v2 teachers, measured with this script before the change.", "",
             "| format | teachers | root `zarr.json` | per teacher | of which attributes / array metadata | open + attrs | `ktc info` |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        lines.append(f"| {row['version']} | {row['teachers']} | {row['root_json_bytes'] / 1e6:.2f} MB | "
                     f"{row['bytes_per_teacher'] / 1e3:.1f} KB | {row['attrs_bytes'] / 1e3:.1f} KB / "
                     f"{row['arrays_bytes'] / 1e3:.1f} KB | {row['open_and_attrs_s']:.2f} s | {row['ktc_info_s']:.1f} s |")
    return lines + [""]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teachers", default="10,100,1000")
    parser.add_argument("--work", type=Path, default=common.WORK / "metadata")
    parser.add_argument("--doc", action="store_true", help=f"save {RESULTS.relative_to(HERE.parent)}")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    result = run([int(c) for c in args.teachers.split(",")], args.work)
    print("\n".join(render(result)))
    if args.doc:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    shutil.rmtree(args.work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
