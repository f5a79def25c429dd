"""Listing a big image folder or its tar shards, reading one image back, and what the content digest costs.

Builds a synthetic ImageNet-shaped tree (``--files`` tiny files in ``--classes`` wnid-like folders; a listing
reads names and sizes, never pixels, so content does not matter), then times, side by side in one run:
``list_dataset`` (walk + sort + sha256 fingerprint of names and sizes) cold and warm, a bare ``os.walk``
of the same tree (the floor), the same files packed into ``--shards`` WebDataset tar shards listed with no
index yet (a scan of every header) and with the cached index, the time to read one image back by row
(random rows) from the folder and from the shards, and, on a real JPEG, decode vs. the blake2b-128 digest
the decode pass adds. Writes ``benchmarks/results/listing.json`` and ``docs/listing.md``.

Usage: python benchmarks/listing.py [--files 100000] [--classes 1000] [--shards 12] [--work /tmp/ktc-listing]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from kt_cache import shards as shard_index  # noqa: E402
from kt_cache.datasets import DatasetSpec, list_dataset  # noqa: E402
from kt_cache.image_source import open_images  # noqa: E402
from kt_cache.images import decode_image  # noqa: E402

RESULTS, DOC = HERE / "results" / "listing.json", HERE.parent / "docs" / "listing.md"


def build_tree(root: Path, files: int, classes: int) -> None:
    """``classes`` folders ``n00000000…`` of ``files`` files in all, 16 bytes each."""
    for index in range(files):
        folder = root / f"n{index % classes:08d}"
        if index < classes:
            folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img_{index:08d}.JPEG").write_bytes(b"0123456789abcdef")


def build_shards(root: Path, out: Path, count: int) -> None:
    """The tree's files, in listing order, as ``count`` tar shards with a ``.cls`` label member each."""
    import tarfile

    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.JPEG"))
    out.mkdir(parents=True)
    per_shard = -(-len(files) // count)
    for number in range(count):
        with tarfile.open(out / f"train-{number:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for rel in files[number * per_shard:(number + 1) * per_shard]:
                tar.add(root / rel, arcname=rel)
                label = rel.split("/", 1)[0].encode()
                info = tarfile.TarInfo(rel.rsplit(".", 1)[0] + ".cls")
                info.size = len(label)
                tar.addfile(info, io.BytesIO(label))


def read_ms(listing, reads: int) -> float:
    """Milliseconds to read one image's bytes back by row, over ``reads`` random rows (as training does)."""
    import numpy as np

    images = open_images(listing.description, listing.ids)
    rows = np.random.default_rng(0).integers(0, len(listing.ids), reads)
    seconds, _ = timed(lambda: [images.read(int(r)) for r in rows])
    return seconds / reads * 1e3


def shard_listing(root: Path, work: Path, count: int, reads: int) -> dict:
    before = os.environ.get("KTC_DATA_DIR")
    os.environ["KTC_DATA_DIR"] = str(work / "ktc-data")        # an empty index cache: the first listing scans
    try:
        build_s, _ = timed(lambda: build_shards(root, work / "shards", count))
        spec = DatasetSpec(shards=(str(work / "shards" / f"train-{{000000..{count - 1:06d}}}.tar"),))
        cold_s, listing = timed(lambda: list_dataset(spec))
        shard_index.clear_memo()                       # a new process: indexes come from the cache folder
        warm_s, _ = timed(lambda: list_dataset(spec))
        folder = list_dataset(DatasetSpec(root=root))
        return {"shards": count, "samples": len(listing.ids), "build_s": build_s, "list_cold_s": cold_s,
                "list_warm_s": warm_s, "reads": reads, "read_folder_ms": read_ms(folder, reads),
                "read_shards_ms": read_ms(listing, reads)}
    finally:
        shard_index.clear_memo()
        if before is None:
            os.environ.pop("KTC_DATA_DIR", None)
        else:
            os.environ["KTC_DATA_DIR"] = before


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def walk_floor(root: Path) -> int:
    return sum(len(names) for _, _, names in os.walk(root))


def digest_cost(repeats: int = 50) -> dict[str, float]:
    """Decode vs. blake2b-128 of the same bytes, on a real photo (scikit-image's chelsea as a JPEG)."""
    from PIL import Image
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buffer, format="JPEG", quality=90)
    raw = buffer.getvalue()
    decode_s = min(timed(lambda: decode_image(Path("chelsea.jpg"), raw))[0] for _ in range(repeats))
    hash_s = min(timed(lambda: hashlib.blake2b(raw, digest_size=16).digest())[0] for _ in range(repeats))
    return {"jpeg_bytes": len(raw), "decode_ms": decode_s * 1e3, "digest_ms": hash_s * 1e3,
            "digest_fraction_of_decode": hash_s / decode_s}


def render(result: dict) -> str:
    lst, dig, tar = result["listing"], result["digest"], result["shards"]
    per_million = lst["list_warm_s"] / lst["files"] * 1e6
    tar_cold, tar_warm = (tar[k] / tar["samples"] * 1.28e6 for k in ("list_cold_s", "list_warm_s"))
    return "\n".join([
        "# Listing a large dataset, and the cost of content digests",
        "",
        f"Generated by `python benchmarks/listing.py` (2-core CPU machine, local disk, {result['date']}).",
        "",
        "| measure | value |", "|---|---:|",
        f"| files in the synthetic tree ({lst['classes']} class folders) | {lst['files']:,} |",
        f"| bare `os.walk` of the tree (the floor) | {lst['walk_s']:.2f} s |",
        f"| `list_dataset` (walk, sort, fingerprint of names + sizes), first call after the tree is written | {lst['list_cold_s']:.2f} s |",
        f"| `list_dataset`, second call | {lst['list_warm_s']:.2f} s |",
        f"| `list_dataset` / `os.walk` | {lst['list_warm_s'] / lst['walk_s']:.1f}x |",
        f"| projected for 1.28 M files (linear) | {per_million * 1.28:.0f} s |",
        f"| the same files as {tar['shards']} tar shards: first listing (scans every header, writes the index) | {tar['list_cold_s']:.2f} s |",
        f"| the shards listed again from the cached index (a new process) | {tar['list_warm_s']:.2f} s |",
        f"| projected for 1.28 M images in shards: first listing / from the index | {tar_cold:.0f} s / {tar_warm:.0f} s |",
        f"| one image read back by row ({tar['reads']:,} random rows): folder (open, read, close) | {tar['read_folder_ms']:.3f} ms |",
        f"| one image read back by row: shards (one `pread` at the indexed offset) | {tar['read_shards_ms']:.3f} ms |",
        f"| decode of a {dig['jpeg_bytes'] // 1024} KB JPEG (451x300) | {dig['decode_ms']:.2f} ms |",
        f"| blake2b-128 content digest of the same bytes | {dig['digest_ms']:.3f} ms "
        f"({dig['digest_fraction_of_decode'] * 100:.1f} % of the decode) |",
        "",
        "The listing reads names and sizes only; the per-sample content digest (`samples/digest`) is computed",
        "by the decode pass from the bytes it reads anyway, so it adds no I/O, only the hash time above.",
        "A shard's first listing reads only its tar headers (seeking over member data); the index it writes",
        "(`$KTC_DATA_DIR/shard-index/`) makes every later listing and every image read a lookup and one seek.",
        "",
    ])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--shards", type=int, default=12)
    parser.add_argument("--reads", type=int, default=5000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ktc-listing"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--doc", type=Path, default=DOC)
    args = parser.parse_args(argv)
    shutil.rmtree(args.work, ignore_errors=True)
    shutil.rmtree(args.work.parent / f"{args.work.name}-shards", ignore_errors=True)
    build_tree(args.work / "warmup", 1, 1)
    list_dataset(DatasetSpec(root=args.work / "warmup"))      # imports and first-call costs out of the timing
    shutil.rmtree(args.work / "warmup")
    build_s, _ = timed(lambda: build_tree(args.work, args.files, args.classes))
    cold_s, listing = timed(lambda: list_dataset(DatasetSpec(root=args.work)))
    warm_s, _ = timed(lambda: list_dataset(DatasetSpec(root=args.work)))
    walk_s, walked = timed(lambda: walk_floor(args.work))
    assert len(listing.ids) == walked == args.files
    shards = shard_listing(args.work, args.work.parent / f"{args.work.name}-shards", args.shards, args.reads)
    assert shards["samples"] == args.files
    result = {"date": time.strftime("%Y-%m-%d"), "digest": digest_cost(), "shards": shards,
              "listing": {"files": args.files, "classes": args.classes, "build_s": build_s, "list_cold_s": cold_s,
                          "list_warm_s": warm_s, "walk_s": walk_s}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    args.doc.write_text(render(result), encoding="utf-8")
    print(render(result))
    shutil.rmtree(args.work, ignore_errors=True)
    shutil.rmtree(args.work.parent / f"{args.work.name}-shards", ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
