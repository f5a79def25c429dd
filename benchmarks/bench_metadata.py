"""Metadata per teacher, and the time to open a store and run ``ktc info``, at 10, 100 and 1000 teachers,
store formats v1, v2 and v3 side by side in one run.

v1 and v2 consolidate every node's metadata into the root ``zarr.json``, which every reader parses (``ktc
info``, ``ktc train``, a remote ``zarr.open_group``). v3 lists the teachers in the root and keeps each teacher's
nodes in its own ``zarr.json``: a reader parses the root and the teachers it opens. The seed is one real
extraction at the design point's widths (timm ``tf_efficientnet_lite0``, random init: D = 1280, 1000 ImageNet
classes, top-20 logits, a 2x2 feature map) over the 12 built-in photos with ``classes: imagenet-1k``.
``benchmarks/common.synthetic_store`` copies its teacher group under new ids and finalizes (v3); the v2 twin
is that store consolidated into its root as ktc wrote it before v3, and the v1 twin adds what ktc wrote before
v2 (feature statistics as JSON lists in the attributes, the class list copied into each teacher).

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


def as_v2(store: Path) -> Path:
    """The v3 store as ktc wrote it before v3, in place: every node consolidated into the root (spec defaults
    left out, no indentation), no teacher list, teacher documents without their own consolidated metadata."""
    import zarr

    from kt_cache.finalize import minimal_consolidated, rewrite_document

    for document in (store / "teachers").glob("*/zarr.json"):
        rewrite_document(document, lambda doc: {k: v for k, v in doc.items() if k != "consolidated_metadata"})
    root = json.loads((store / "zarr.json").read_text())
    root["attributes"]["ktc"].pop("teachers")
    root["attributes"]["ktc"]["version"] = 2
    (store / "zarr.json").write_text(json.dumps(root))
    zarr.consolidate_metadata(str(store))
    rewrite_document(store / "zarr.json", minimal_consolidated)
    return store


def as_v1(store: Path) -> Path:
    """The v2 store as ktc wrote it before v2, in place: statistics as JSON lists, the class list in each teacher."""
    import numpy as np
    import zarr

    from kt_cache.finalize import minimal_consolidated, rewrite_document
    from kt_cache.store import StoreReader

    reader = StoreReader(str(store))
    for tid in reader.teacher_ids():
        stats, names = reader.feature_stats(tid), reader.teacher_attrs(tid)["class_names"]
        document = store / "teachers" / tid / "zarr.json"
        doc = json.loads(document.read_text())
        doc["attributes"]["ktc_teacher"]["feature_stats"] = {
            "mean": np.asarray(stats["mean"]).tolist(), "std": np.asarray(stats["std"]).tolist(), "count": stats["count"]}
        doc["attributes"]["ktc_teacher"]["class_names"] = names
        document.write_text(json.dumps(doc, indent=2))
        shutil.rmtree(store / "teachers" / tid / "stats")
    root = json.loads((store / "zarr.json").read_text())
    root["attributes"]["ktc"]["version"] = 1
    root.pop("consolidated_metadata", None)
    (store / "zarr.json").write_text(json.dumps(root))
    zarr.consolidate_metadata(str(store))
    rewrite_document(store / "zarr.json", minimal_consolidated)      # as v2 stores it: compares the attributes alone
    return store


def measure(store: Path, teachers: int, used: int = 10) -> dict:
    """Open + every teacher's attributes, open + the attributes and arrays of ``used`` teachers (a run that
    trains from a few), and ``ktc info`` in a fresh process."""
    from kt_cache.store import StoreReader

    start = time.perf_counter()
    reader = StoreReader(str(store))
    for tid in reader.teacher_ids()[:used]:
        reader.teacher_arrays(tid)
    some_s = time.perf_counter() - start
    start = time.perf_counter()
    reader = StoreReader(str(store))
    reader.open_teachers(reader.teacher_ids())
    for tid in reader.teacher_ids():
        reader.teacher_attrs(tid)
    open_s = time.perf_counter() - start
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "kt_cache", "info", str(store)], capture_output=True, text=True)
    info_s = time.perf_counter() - start
    assert done.returncode == 0, done.stderr
    root_bytes = (store / "zarr.json").stat().st_size
    return {"teachers": teachers, "root_json_bytes": root_bytes, "bytes_per_teacher": root_bytes / teachers,
            "open_used_s": some_s, "used": used, "open_and_attrs_s": open_s, "ktc_info_s": info_s}


def teacher_breakdown(store: Path) -> dict:
    """Bytes of one teacher's metadata, wherever it is kept (v3: its own ``zarr.json``; v1/v2: its share of
    the root's consolidated metadata): its attributes, and its nodes' metadata."""
    compact = {"separators": (",", ":")}        # as finalize stores them
    root = json.loads((store / "zarr.json").read_text())
    if "consolidated_metadata" not in root:
        own = json.loads((store / "teachers/s000/zarr.json").read_text())
        nodes = own["consolidated_metadata"]["metadata"]
        return {"attrs_bytes": len(json.dumps(own["attributes"], **compact)),
                "arrays_bytes": sum(len(json.dumps(k)) + 1 + len(json.dumps(v, **compact)) for k, v in nodes.items()),
                "teacher_json_bytes": (store / "teachers/s000/zarr.json").stat().st_size}
    doc = root["consolidated_metadata"]["metadata"]
    attrs = len(json.dumps(doc["teachers/s000"]["attributes"], **compact))
    arrays = sum(len(json.dumps(k)) + 1 + len(json.dumps(v, **compact)) for k, v in doc.items()
                 if k.startswith("teachers/s000/"))
    return {"attrs_bytes": attrs, "arrays_bytes": arrays, "teacher_json_bytes": None}


def run(counts: list[int], work: Path) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    seed = seed_store(work / "seed")
    rows = []
    for count in counts:
        store = common.synthetic_store(seed, count, work / f"store-{count}.zarr")
        for version, convert in (("v3", None), ("v2", as_v2), ("v1", as_v1)):
            if convert is not None:
                convert(store)
            rows.append({"version": version, **measure(store, count), **teacher_breakdown(store)})
            print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(store)
    rows.sort(key=lambda row: (-int(row["version"][1:]), row["teachers"]))
    return {"date": time.strftime("%Y-%m-%d"), "teacher": TEACHER["model"], "rows": rows,
            "load_average": common.load_average()}


def render(result: dict) -> list[str]:
    """The docs/benchmarks.md section."""
    lines = ["## Metadata per teacher (store format v1, v2, v3)", "",
             f"`python benchmarks/bench_metadata.py --doc` ({result['date']}): copies of one `{result['teacher']}` "
             "teacher (D = 1280, 1000 ImageNet classes, top-20 logits, 2x2 map) in one store, converted in place "
             "from v3 to v2 to v1. Every reader parses the root `zarr.json`: in v1/v2 it consolidates every node of "
             "every teacher; in v3 it lists the teachers, and each teacher's own `zarr.json` holds its nodes "
             "(read only by a reader that opens that teacher). *A teacher's metadata* is its attributes plus its "
             "nodes' metadata, wherever they are kept. *Open + 10* = `StoreReader` and the checked arrays of 10 "
             "teachers, what a run training from 10 of them reads first; *open + all* = every teacher's "
             "attributes; `ktc info` = the command in a fresh process (under 1 s of it is start-up).", "",
             "| format | teachers | root `zarr.json` | root per teacher | a teacher's metadata (attributes / nodes) "
             "| open + 10 | open + all | `ktc info` |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        lines.append(f"| {row['version']} | {row['teachers']} | {row['root_json_bytes'] / 1e6:.3f} MB | "
                     f"{row['bytes_per_teacher'] / 1e3:.2f} KB | {(row['attrs_bytes'] + row['arrays_bytes']) / 1e3:.1f} KB "
                     f"({row['attrs_bytes'] / 1e3:.1f} / {row['arrays_bytes'] / 1e3:.1f}) | "
                     f"{row['open_used_s']:.2f} s | {row['open_and_attrs_s']:.2f} s | {row['ktc_info_s']:.1f} s |")
    v3 = [row for row in result["rows"] if row["version"] == "v3"]
    if v3:
        top = max(v3, key=lambda row: row["teachers"])
        lines += ["", f"Target (root metadata <= 4 KB per teacher): {top['bytes_per_teacher'] / 1e3:.2f} KB per teacher at "
                  f"{top['teachers']} teachers in v3, "
                  f"{'PASS' if top['bytes_per_teacher'] <= 4000 else 'MISS'}. The root holds the dataset's class list "
                  "once and one id per teacher; each teacher's own `zarr.json` "
                  f"({top['teacher_json_bytes'] / 1e3:.1f} KB here) is read only by a reader that opens that teacher. "
                  "`ktc info` and *open + all* read every teacher's document, so they take as long as in v2 (one read "
                  "each, fetched concurrently); a reader of a few teachers no longer pays for the others."]
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
