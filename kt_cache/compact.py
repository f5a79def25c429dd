"""``ktc compact``: a new store whose features and/or featmaps are re-encoded by a codec (``kt_cache.codecs``).

Everything that is not re-encoded (samples, logits, other teachers, ``done`` flags) is copied object by object,
as ``ktc subset`` does. Each re-encoded array is streamed in row blocks of at most ``BLOCK_BYTES`` (decoded
float32), in up to three passes: PCA moments (``pca:K``), the code's range (``int8``), then encoding, which
also measures the reconstruction error over every stored vector and the decoded features' statistics. One unit
of codes is held in memory and written as one object. The measured error, the codec and its widths are
recorded in the teacher's attributes; its parameters are arrays beside the data.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from kt_cache.store import format as fmt
from kt_cache.codecs import MISSING_CODE, PARAM_DIMS, Codec, CodecParams, ErrorMeter, check_width, codec_record
from kt_cache.codecs import CODEC_CHOICES, code_axis, parse_codec, pca_basis, quant_params
from kt_cache.errors import UsageError, did_you_mean
from kt_cache.transform_codec import MISSING_FLAG, TransformParams, fit_transform
from kt_cache.transform_codec import PARAM_DIMS as TRANSFORM_DIMS

BLOCK_BYTES = 64 << 20            # decoded float32 bytes read per step
OUTPUTS = ("features", "featmap")


@dataclass(frozen=True)
class Job:
    """One array to re-encode: ``teachers/<teacher_id>/<output>`` with ``codec``; vectors of ``dim`` values.
    ``bar``: the progress bar its passes over the rows advance (``progress_bar``)."""

    teacher_id: str
    output: str
    codec: Codec
    dim: int
    bar: Any = field(default=None, compare=False)


def progress_bar(job: Job, rows: int) -> Any:
    """A tqdm bar over every pass of ``job`` over the store's rows (a tc fit: two, plus the encode; PCA: one,
    int8: one, plus the encode); shown on a terminal unless ``KTC_NO_PROGRESS=1``."""
    from tqdm import tqdm

    passes = 3 if job.codec.transform else 1 + (job.codec.pca is not None) + job.codec.int8
    return tqdm(total=rows * passes, unit="row", desc=f"{job.teacher_id}/{job.output} -> {job.codec.name}",
                disable=True if os.environ.get("KTC_NO_PROGRESS") == "1" else None, dynamic_ncols=True)


def compact_store(location: str, out: str | Path, features: str | None = None, featmap: str | None = None,
                  teachers: Sequence[str] = ()) -> tuple[Path, list[dict[str, Any]]]:
    """Write ``out``: ``location`` with the chosen teachers' features/featmaps re-encoded.

    Returns the output path and, per re-encoded array, ``{"teacher", "output", **record}``.
    """
    from kt_cache.store.sharing import Part, validate_part, write_store

    codecs = {o: parse_codec(t, f"--{o}") for o, t in (("features", features), ("featmap", featmap)) if t}
    if not codecs:
        raise UsageError("ktc compact: no codec given. Fix: pass --features CODEC and/or --featmap CODEC "
                         f"({CODEC_CHOICES}).")
    reader = fmt.StoreReader(location)
    part = Part(reader, {t: t for t in reader.teacher_ids()})
    validate_part(part)
    jobs = plan_jobs(reader, codecs, teachers)
    records: list[dict[str, Any]] = []
    options = " ".join(f"--{o} {c.name}" for o, c in codecs.items())
    chosen = f" --teachers {','.join(teachers)}" if teachers else ""
    made_by = f"ktc compact {location} --out {out} {options}{chosen}"

    def rewrite(root: Any) -> None:
        for job in jobs:
            with progress_bar(job, reader.meta.n_samples) as bar:
                record = encode_job(reader, root, replace(job, bar=bar))
            records.append({"teacher": job.teacher_id, "output": job.output, **record})

    exclude = tuple(f"teachers/{j.teacher_id}/{j.output}/" for j in jobs)
    path = write_store([part], [0] * reader.meta.n_units, Path(out), made_by, exclude=exclude, rewrite=rewrite)
    return path, records


def plan_jobs(reader: fmt.StoreReader, codecs: dict[str, Codec], teachers: Sequence[str]) -> list[Job]:
    """The arrays to re-encode; a float16 array asked to become fp16 is copied, not re-encoded."""
    wanted = [t.strip() for item in teachers for t in str(item).split(",") if t.strip()]
    for tid in wanted:
        if tid not in reader.teacher_ids():
            raise UsageError(f"--teachers {tid}: the store {reader.where} has no such teacher."
                             f"{did_you_mean(tid, reader.teacher_ids())} Stored: {', '.join(reader.teacher_ids())}.")
    jobs = []
    for tid in wanted or reader.teacher_ids():
        arrays, teacher = reader.teacher_arrays(tid), reader.teacher_record(tid)
        for output, codec in codecs.items():
            if output not in arrays:
                if wanted:
                    raise UsageError(f"--{output} {codec.name}: teacher {tid} of {reader.where} stores no {output} "
                                     f"(it has {', '.join(sorted(arrays))}). Fix: leave it out of --teachers.")
                continue
            jobs += job_for(reader, tid, output, codec, arrays[output], teacher)
    if not jobs:
        raise UsageError(f"ktc compact: nothing to re-encode in {reader.where}: no chosen teacher stores "
                         f"{' or '.join(codecs)} in another form than asked. Fix: pick other teachers or codecs.")
    return jobs


def job_for(reader: fmt.StoreReader, tid: str, output: str, codec: Codec, array: Any,
            teacher: fmt.TeacherRecord) -> list[Job]:
    done = reader.done(tid)
    if not done.all():
        raise UsageError(f"teacher {tid} of {reader.where} is incomplete ({int(done.sum())}/{done.size} units done); "
                         "compacting it would record an error measured on part of its rows. Fix: finish it with "
                         "`ktc extract` (same manifest), or leave it out with --teachers.")
    record = codec_record(teacher, output)
    if record is not None:
        raise UsageError(f"teacher {tid} of {reader.where}: {output} is already compacted ({record.get('name')}); "
                         "re-encoding decoded values would stack two errors. Fix: compact from the original store.")
    dim = int(array.shape[-1])
    codec = codec.for_width(dim)                  # pca:D/4 or tc:D/8: this teacher's own K or B
    check_width(codec, dim, f"--{output}", f"teacher {tid}'s {output}")
    if codec.transform and output != "featmap":
        raise UsageError(f"--{output} {codec.name}: the transform codec codes whole spatial maps (--featmap). "
                         f"Fix: use it with --featmap, and pca:K,int8 for {output} (e.g. pca:{max(1, dim // 4)},int8).")
    if codec == Codec() and np.dtype(array.dtype) == np.float16:
        return []
    return [Job(tid, output, codec, dim)]


def vector_blocks(reader: fmt.StoreReader, job: Job) -> Iterator[tuple[int, slice, np.ndarray]]:
    """(unit, rows, float32 block ``[rows, ..., D]``) over the whole array, a unit split into aligned blocks."""
    array = reader.checked_arrays(job.teacher_id)[job.output]
    n, unit_rows = int(array.shape[0]), reader.meta.unit_rows
    row_bytes = 4 * int(np.prod(array.shape[1:], dtype=np.int64))
    fit = max(1, BLOCK_BYTES // max(1, row_bytes))
    step = min(unit_rows, max(int(array.chunks[0]), 1 << (fit.bit_length() - 1)))
    for unit in range(fmt.n_units(n, unit_rows)):
        span = fmt.unit_slice(unit, n, unit_rows)
        for start in range(span.start, span.stop, step):
            rows = slice(start, min(start + step, span.stop))
            yield unit, rows, reader.read(job.teacher_id, job.output, rows).astype(np.float32)
            if job.bar is not None:
                job.bar.update(rows.stop - rows.start)


def finite_vectors(block: np.ndarray) -> np.ndarray:
    flat = block.reshape(-1, block.shape[-1])
    return flat[np.isfinite(flat).all(axis=1)]


def fit_params(reader: fmt.StoreReader, job: Job) -> tuple[CodecParams, dict[str, Any]]:
    """The codec's parameters from the stored vectors (PCA moments pass, then the int8 range pass)."""
    params, info = CodecParams(job.codec, unit_rows=reader.meta.unit_rows), {}
    if job.codec.pca is not None:
        ref, total, outer, count = None, np.zeros(job.dim), np.zeros((job.dim, job.dim)), 0
        for _, _, block in vector_blocks(reader, job):
            x = finite_vectors(block)
            ref = x.mean(axis=0) if ref is None and len(x) else ref
            if len(x):
                centred = x - ref           # shifted moments: no cancellation when the mean dwarfs the spread
                total += centred.sum(axis=0)
                outer += (centred.T @ centred).astype(np.float64)
                count += len(x)
        pca, kept = pca_basis(total, outer, count, job.codec.pca)
        pca["mean"] = (pca["mean"] + (ref if ref is not None else 0)).astype(np.float32)
        params.arrays.update(pca)
        info["variance_kept"] = round(kept, 6)
    if job.codec.int8:                 # each unit's own range: nothing is clipped, one object per unit
        width, units = job.codec.code_dim(job.dim), reader.meta.n_units
        low, high = np.full((units, width), np.inf, np.float32), np.full((units, width), -np.inf, np.float32)
        for unit, _, block in vector_blocks(reader, job):
            code = params.project(finite_vectors(block))
            if len(code):
                low[unit], high[unit] = np.minimum(low[unit], code.min(axis=0)), np.maximum(high[unit], code.max(axis=0))
        low, high = np.where(np.isfinite(low), low, 0), np.where(np.isfinite(high), high, 0)
        params.arrays.update(quant_params(low, high))
    return params, info


def encode_job(reader: fmt.StoreReader, root: Any, job: Job) -> dict[str, Any]:
    """Re-encode one array into the output ``root``; returns the record stored in the teacher's attributes."""
    params, info = fit_transform_job(reader, job) if job.codec.transform else fit_params(reader, job)
    source = reader.checked_arrays(job.teacher_id)[job.output]
    group, meta = fmt.teacher_group(root, job.teacher_id), reader.meta
    width = params.code_width(job.dim)
    dims = tuple(source.metadata.dimension_names or ())
    target = fmt.create_array(group, code_spec(job, source.shape, dims, width), meta.n_samples, meta.unit_rows,
                              meta.chunk_bytes, per_view=True)
    meter, pending, current = ErrorMeter(job.dim), [], 0
    for unit, rows, block in vector_blocks(reader, job):
        if unit != current and pending:
            write_codes(target, pending)
            pending, current = [], unit
        codes, decoded = params.code_block(unit, block)
        meter.add(block.reshape(-1, job.dim), decoded.reshape(-1, job.dim))
        pending.append((rows, codes))
    write_codes(target, pending)
    write_params(group, job, params.arrays)
    record = {"name": job.codec.name, "dim": job.dim, "code_dim": width, "code_dtype": job.codec.code_dtype,
              "source_dtype": str(source.dtype), "error": meter.error(), **info}
    update_attrs(group, job, record, meter)
    return record


def code_spec(job: Job, shape: tuple[int, ...], dims: tuple[str, ...], width: int) -> fmt.ArraySpec:
    """The code array: one code per vector (``[N, ..., W]``), or one per map for ``tc`` (``[N, V, W]``)."""
    if job.codec.transform:
        return fmt.ArraySpec(job.output, (shape[1], width), "uint8", MISSING_FLAG,
                             dims[:2] + (code_axis(job.output, True),))
    fill = MISSING_CODE if job.codec.int8 else float("nan")
    return fmt.ArraySpec(job.output, (*shape[1:-1], width), job.codec.code_dtype, fill,
                         dims[:-1] + (code_axis(job.output),))


def fit_transform_job(reader: fmt.StoreReader, job: Job) -> tuple[TransformParams, dict[str, Any]]:
    """A ``tc`` codec fitted on every stored map of the array (two streamed passes, ``fit_transform``)."""
    grid = reader.checked_arrays(job.teacher_id)[job.output].shape[2:4]

    def maps() -> Iterator[np.ndarray]:
        for _, _, block in vector_blocks(reader, job):
            flat = block.reshape(-1, grid[0] * grid[1], job.dim)
            yield flat[np.isfinite(flat).all(axis=(1, 2))]

    fit = fit_transform(maps)
    if fit is None:
        raise UsageError(f"--featmap {job.codec.name}: teacher {job.teacher_id} of {reader.where} holds no map without "
                         "NaN (every stored image failed to decode), so there is nothing to fit the codec on. Fix: "
                         "leave it out with --teachers, or re-extract it from readable images.")
    params = fit.params(job.codec.transform)
    return params, {"grid": [int(g) for g in grid], "components": int(len(params.arrays["basis"])),
                    "coefficients": int(len(params.coef)), "bits_per_map": params.bits}


def write_codes(target: Any, pending: list[tuple[slice, np.ndarray]]) -> None:
    """One unit's codes in one write, so its object is written once."""
    if pending:
        target[pending[0][0].start:pending[-1][0].stop] = np.concatenate([codes for _, codes in pending])


def write_params(group: Any, job: Job, arrays: dict[str, np.ndarray]) -> None:
    from zarr.codecs import ZstdCodec

    axis = "channel" if job.output == "featmap" else "feature"
    for name, values in arrays.items():
        dims = TRANSFORM_DIMS[name] if job.codec.transform else PARAM_DIMS[name]
        names = tuple(axis if d == "dim" else d for d in dims)
        per_unit = name in ("scale", "offset") and not job.codec.transform     # per unit: one object each
        chunks = (1, values.shape[1]) if per_unit else values.shape
        group.create_array(f"codec/{job.output}/{name}", data=np.ascontiguousarray(values, dtype=np.float32),
                           chunks=chunks, compressors=ZstdCodec(level=1), dimension_names=names)


def update_attrs(group: Any, job: Job, record: dict[str, Any], meter: ErrorMeter) -> None:
    teacher = fmt.read_teacher_record(group, job.teacher_id, "output store")
    teacher = teacher.replace(codec={**teacher.codec, job.output: record})
    if job.output == "features":      # methods z-score with the statistics of what they will read
        teacher = teacher.replace(feature_stats=fmt.write_feature_stats(group, meter.decoded_stats()))
    fmt.write_teacher_record(group, teacher)
