"""Read only what a step uses: view-separable chunks, one view per block and epoch, bytes read per sample.

New stores chunk teacher arrays ``[N, V, ...]`` one view per inner chunk (inside a shard of the whole unit);
the trainer gives every row of a block the same view in an epoch (``kt_train.sampler.block_views``), so a
streamed block reads only that view's chunks. Stores of the older layout (every view in a chunk) train to the
same student, reading V times the bytes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

import kt_cache.store.format as fmt
from extract_helpers import cnn_teacher, make_image_folder, vit_teacher, write_manifest
from kt_cache.cli import cli
from kt_cache.store import StoreReader
from kt_train.data import CachedTeachers, StudentViews, make_loader

COMMON = ["--student", "resnet10t", "--img-size", "32", "--batch-size", "4", "--workers", "0", "--no-progress"]
VIEWS = 3


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def extract_project(root, view_chunks: bool):
    """33 labelled images, 3 views, units of 4 rows, a top-k CNN and a full-logit ViT teacher with maps;
    ``view_chunks=False`` writes the layout of ktc before view-separable chunks."""
    make_image_folder(root / "images", per_class=11)
    manifest = write_manifest(root / "teachers.yaml", [cnn_teacher(), vit_teacher(role="predictive")], views=VIEWS)
    saved, fmt.VIEW_CHUNKS = fmt.VIEW_CHUNKS, view_chunks
    try:
        result = invoke("extract", "--manifest", manifest, "--workers", "0", "--no-progress")
    finally:
        fmt.VIEW_CHUNKS = saved
    assert result.exit_code == 0, result.output
    return root / "out.zarr"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return extract_project(tmp_path_factory.mktemp("views_new"), view_chunks=True)


@pytest.fixture(scope="module")
def old_store(tmp_path_factory):
    return extract_project(tmp_path_factory.mktemp("views_old"), view_chunks=False)


def per_view_arrays(store):
    root = zarr.open_group(str(store), mode="r")
    for tid, group in root["teachers"].groups():
        for name, array in group.arrays():
            yield tid, name, array
        if "logits_topk" in group:
            yield from ((tid, f"logits_topk/{n}", a) for n, a in group["logits_topk"].arrays())


def test_new_stores_have_one_view_chunks_and_old_ones_still_verify(store, old_store):
    for tid, name, array in per_view_arrays(store):
        if array.ndim > 2:      # vectors: one view per inner chunk, one shard per unit
            assert array.chunks[1] == 1 and tuple(array.shards) == (4, *array.shape[1:]), (tid, name)
        elif name != "done":    # per-view scalars (LSE, label logit): one plain chunk per unit, every view
            assert array.shards is None and tuple(array.chunks) == (4, VIEWS), (tid, name)
    for tid, name, array in per_view_arrays(old_store):
        if name != "done":
            assert array.chunks[1:] == array.shape[1:], (tid, name)
    root = zarr.open_group(str(store), mode="r")
    assert root["samples/views"].chunks[1] == VIEWS, "sample arrays keep whole views (they are read whole)"
    new, old = zarr.open_group(str(store), mode="r"), zarr.open_group(str(old_store), mode="r")
    for tid, name, array in per_view_arrays(store):
        np.testing.assert_array_equal(array[:], old[f"teachers/{tid}/{name}"][:])   # same outputs, other chunks
    assert new.attrs["ktc"]["n_views"] == VIEWS
    for path in (store, old_store):
        result = invoke("verify", path)
        assert result.exit_code == 0, result.output


def test_streamed_batches_equal_the_in_ram_ones_and_each_sample_comes_once(store):
    reader = StoreReader(store)
    ram = CachedTeachers(reader, reader.teacher_ids())
    streamed = CachedTeachers(reader, reader.teacher_ids(), ram_budget_bytes=1, window_blocks=2, block_rows=4)
    assert not any(streamed.tables.values()) and streamed.block_rows == ram.block_rows == 4
    data = StudentViews(reader, (16, 16), (0.5,) * 3, (0.25,) * 3, seed=11)
    loader = make_loader(data, batch_size=5, block_rows=4, window_blocks=2, seed=11, drop_last=False)
    ok = np.flatnonzero(reader.sample("ok"))
    caches = list(streamed.group_caches.values())
    block_bytes = {id(c): c.block_rows * int(np.prod(c.array.shape[2:])) * c.array.dtype.itemsize for c in caches}
    plan = streamed.memory_plan()["stream_buffer_bytes"]
    assert plan == sum(2 * 2 * block_bytes[id(c)] for c in caches), "two windows of 2 blocks per streamed array"
    for epoch in range(2):
        loader.set_epoch(epoch)
        rows, reads = [], sum(c.reads for c in caches)
        streamed.plan_epoch(loader.sampler.windows(), loader.block_views())
        for batch in loader:
            rows += batch["row"].tolist()
            in_ram = sum((len(c.blocks) + len(c.pending)) * block_bytes[id(c)] for c in caches)
            assert in_ram <= plan, "the block in use and the window read ahead: never a third window"
            a, b = streamed.gather(batch["row"].numpy(), batch["view"].numpy()), ram.gather(batch["row"].numpy(),
                                                                                            batch["view"].numpy())
            assert a.stacks.keys() == b.stacks.keys()
            for key in a.stacks:
                np.testing.assert_array_equal(a.stacks[key], b.stacks[key])
        assert sorted(rows) == ok.tolist(), "every sample exactly once per epoch"
        blocks = len({r // 4 for r in rows})
        assert sum(c.reads for c in caches) - reads == blocks * len(caches), "each block read once per epoch"
        assert streamed.read_counts()["read_bytes_per_sample_teacher"] > 0


def test_over_v_epochs_each_block_sees_each_view_once(store):
    reader = StoreReader(store)
    data = StudentViews(reader, (16, 16), (0.5,) * 3, (0.25,) * 3, seed=4)
    loader = make_loader(data, batch_size=4, block_rows=4, window_blocks=2, seed=4, drop_last=False)
    seen = {}                                      # block -> views, one entry per epoch
    for epoch in range(2 * VIEWS):
        loader.set_epoch(epoch)
        per_block = {}
        for batch in loader:
            for row, view in zip(batch["row"].tolist(), batch["view"].tolist()):
                per_block.setdefault(row // 4, set()).add(view)
        assert all(len(v) == 1 for v in per_block.values()), "one view per block in an epoch"
        assert per_block == {b: {int(v)} for b, v in enumerate(loader.block_views()) if b in per_block}
        for b, v in per_block.items():
            seen.setdefault(b, []).extend(v)
    for views in seen.values():
        assert sorted(views[:VIEWS]) == sorted(views[VIEWS:]) == list(range(VIEWS))
    center = StudentViews(reader, (16, 16), (0.5,) * 3, (0.25,) * 3, views_mode="center")
    assert {center.view_for(r, e) for r in range(33) for e in range(4)} == {0}, "evaluation keeps view 0"


def train(store, out, *extra):
    result = invoke("train", "--cache", store, "--out", out, "--method", "uniform", "--window-blocks", "1", *COMMON,
                    *extra)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_old_layout_trains_the_same_student_reading_v_times_the_bytes(store, old_store, tmp_path):
    """A budget of 85 % of the teacher arrays streams the largest (cnn32 features) in 4-row blocks (the unit,
    as in RAM): the student is the same bit for bit in RAM, streamed, and streamed from the old layout, and
    the old layout reads V times the bytes per sample and teacher."""
    import torch
    from safetensors.torch import load_file

    reader = StoreReader(store)
    held = CachedTeachers(reader, reader.teacher_ids(), needs={"features", "logits"}, window_blocks=1)
    budget = repr(0.85 * sum(a.nbytes for table in held.tables.values() for a in table.values()) / (1 << 30))
    runs, reads = {}, {}
    for name, path, gib in (("ram", store, "4"), ("new", store, budget), ("old", old_store, budget)):
        records = train(path, tmp_path / name, "--epochs", "2", "--ram-budget-gb", gib)
        runs[name] = load_file(str(tmp_path / name / "student.safetensors"))
        reads[name] = [r["read_bytes_per_sample_teacher"] for r in records if r["kind"] == "epoch"]
    assert all(torch.equal(runs["ram"][k], runs[n][k]) for n in ("new", "old") for k in runs["ram"])
    assert reads["ram"] == [0, 0] and all(r > 0 for r in reads["new"])
    for new, old in zip(reads["new"], reads["old"]):
        assert old / new == pytest.approx(VIEWS, rel=0.05), (new, old)


def test_compact_merge_and_pack_take_either_layout(store, old_store, tmp_path):
    """``compact`` of an old-layout store writes one-view chunks; ``merge`` keeps each input's chunks (a store
    holding both layouts), which ``verify`` passes and ``pack`` ships."""
    small = tmp_path / "small.zarr"
    result = invoke("compact", old_store, "--out", small, "--features", "int8")
    assert result.exit_code == 0, result.output
    codes = zarr.open_group(str(small), mode="r")["teachers/cnn32/features"]
    assert codes.chunks[1] == 1 and zarr.open_group(str(small), mode="r")["teachers/cnn32/featmap"].chunks[1] == VIEWS
    merged = tmp_path / "merged.zarr"
    result = invoke("merge", store, old_store, "--out", merged, "--rename", "2:cnn32=cnn_old", "--rename",
                    "2:vit48=vit_old")
    assert result.exit_code == 0, result.output
    root = zarr.open_group(str(merged), mode="r")
    assert root["teachers/cnn32/features"].chunks[1] == 1 and root["teachers/cnn_old/features"].chunks[1] == VIEWS
    for path in (small, merged):
        result = invoke("verify", path)
        assert result.exit_code == 0, result.output
    packed = tmp_path / "merged.zip"
    assert invoke("pack", merged, packed).exit_code == 0
    result = invoke("verify", f"zip://{packed}")
    assert result.exit_code == 0, result.output
    reader = StoreReader(merged)
    ram = CachedTeachers(reader, ["cnn32", "cnn_old"], needs={"features"})
    rows, views = np.arange(33), np.arange(33) % VIEWS
    got = ram.gather(rows, views)
    np.testing.assert_array_equal(got["cnn32"]["features"], got["cnn_old"]["features"])
