"""kt_train's read path: teacher selection, RAM tables, label-space scatter, student views, the sampler."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from extract_helpers import cnn_teacher, make_image_folder, vit_teacher, write_manifest
from kt_cache.cli import cli
from kt_cache.errors import UsageError
from kt_cache.finalize import write_object_manifest
from kt_cache.images import decode_image
from kt_cache.store import StoreReader
from kt_cache.views import view_pixels
from kt_train.data import CachedTeachers, StudentViews, make_loader, select_teachers
from kt_train.labels import covered_mask, label_map_for
from kt_train.sampler import BlockShuffleSampler, block_views

ALL_IDS = ["cnn32", "desc", "extra4", "sub2", "vit48"]
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def small_cnn(tid: str, classes: list[str] | None, outputs: list[str], topk: int | None = None, **extra) -> dict:
    teacher = cnn_teacher(id=tid, outputs=outputs, **extra)
    teacher.pop("logits"), teacher.pop("featmap")
    if classes is not None:
        teacher["model_args"], teacher["classes"] = {"num_classes": len(classes)}, classes
    if topk:
        teacher["logits"] = {"topk": topk}
    return teacher


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """13 rows (one undecodable), 3 views, 4-row units; top-k, full, subset-class, extra-class, descriptive."""
    tmp = tmp_path_factory.mktemp("train_store")
    make_image_folder(tmp / "images", per_class=4)
    (tmp / "images" / "cat" / "broken.jpg").write_text("not an image")
    teachers = [cnn_teacher(), vit_teacher(),
                small_cnn("sub2", ["ant", "cat"], ["features", "logits"]),
                small_cnn("extra4", ["ant", "bee", "cat", "dog"], ["logits"], topk=3),
                small_cnn("desc", None, ["features"], role="descriptive")]
    manifest = write_manifest(tmp / "teachers.yaml", teachers)
    result = CliRunner().invoke(cli, ["extract", "--manifest", str(manifest), "--workers", "0", "--no-progress"])
    assert result.exit_code == 0, result.output
    return tmp / "out.zarr"


@pytest.fixture(scope="module")
def arrays(store):
    root = zarr.open_group(str(store), mode="r")
    return lambda path: np.asarray(root[path][:])


@pytest.fixture(scope="module")
def cached(store):
    return CachedTeachers(StoreReader(store), ALL_IDS)


def good_rows(store) -> np.ndarray:
    return np.flatnonzero(StoreReader(store).samples()["ok"])


# ---------------------------------------------------------------- selection

def test_select_teachers_by_id_role_and_all(store):
    reader = StoreReader(store)
    assert select_teachers(reader, ["all"]) == ALL_IDS == select_teachers(reader, [])
    assert select_teachers(reader, ["predictive"]) == ["cnn32", "extra4", "sub2", "vit48"]
    assert select_teachers(reader, ["vit48", "descriptive", "vit48"]) == ["vit48", "desc"]
    assert select_teachers(reader, ["sub2,cnn32"]) == ["sub2", "cnn32"]


def test_select_unknown_teacher_suggests_and_lists(store):
    reader = StoreReader(store)
    with pytest.raises(UsageError) as err:
        select_teachers(reader, ["vit49"])
    assert 'Did you mean "vit48"' in str(err.value) and "desc (descriptive)" in str(err.value)
    with pytest.raises(UsageError, match="no sentinel teacher"):
        select_teachers(reader, ["sentinel"])


def test_select_incomplete_teacher_names_units_and_fix(store, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    zarr.open_group(str(copy), mode="r+", use_consolidated=False)["teachers/cnn32/done"][1] = False
    write_object_manifest(copy)   # as finalized by a run whose unit 1 failed
    reader = StoreReader(copy)
    assert select_teachers(reader, ["vit48"]) == ["vit48"]
    with pytest.raises(UsageError) as err:
        select_teachers(reader, ["all"])
    text = str(err.value)
    assert "'cnn32'" in text and "3/4 units" in text and "ktc extract" in text and "--teachers desc," in text


# ---------------------------------------------------------------- label maps

def test_label_maps_for_subset_and_extra_classes():
    target = ["ant", "bee", "cat"]
    assert label_map_for(target, ["ant", "cat"]).tolist() == [0, 2]
    assert label_map_for(target, ["cat", "dog", "ant", "bee"]).tolist() == [2, -1, 0, 1]
    assert label_map_for(target, None, 5).tolist() == [-1] * 5
    assert covered_mask(np.array([0, 2]), 3).tolist() == [True, False, True]
    assert covered_mask(np.array([2, -1, 0, 1]), 3).all()


# ---------------------------------------------------------------- cached teachers

def test_gathered_rows_equal_store_arrays(store, arrays, cached):
    rng = np.random.default_rng(0)
    rows, views = rng.integers(0, 13, 20), rng.integers(0, 3, 20)
    got = cached.gather(rows, views)
    topk = {"logits_topk/index", "logits_topk/values"}
    assert set(got["cnn32"]) == {"features", "featmap", "label_logit", "logits_lse", *topk}
    assert set(got["desc"]) == {"features"} and set(got["vit48"]) >= {"logits", "featmap"}
    for tid, fields in got.items():
        for path, value in fields.items():
            np.testing.assert_array_equal(value, arrays(f"teachers/{tid}/{path}")[rows, views], err_msg=f"{tid}/{path}")


def test_full_logits_scatter_into_target_space(store, arrays, cached):
    rows = good_rows(store)
    views = np.arange(rows.size) % 3
    tb = cached.to_teacher_batch(cached.gather(rows, views), None, "cpu")
    stored = arrays("teachers/vit48/logits")[rows, views].astype(np.float32)
    np.testing.assert_array_equal(tb.logits["vit48"].numpy(), stored)
    sub = arrays("teachers/sub2/logits")[rows, views].astype(np.float32)
    assert tb.covered["sub2"].tolist() == [True, False, True]
    np.testing.assert_array_equal(tb.logits["sub2"][:, [0, 2]].numpy(), sub)
    assert torch.isneginf(tb.logits["sub2"][:, 1]).all()
    np.testing.assert_allclose(tb.logit_mean["vit48"].numpy(), stored.mean(1), rtol=1e-6)
    np.testing.assert_allclose(tb.logit_std["vit48"].numpy(), stored.std(1, ddof=1), rtol=1e-5)


def test_topk_scatter_is_exact_for_stored_classes(store, arrays, cached):
    rows = good_rows(store)
    views = (np.arange(rows.size) + 1) % 3
    tb = cached.to_teacher_batch(cached.gather(rows, views), None, "cpu")
    values = arrays("teachers/cnn32/logits_topk/values")[rows, views].astype(np.float64)
    index = arrays("teachers/cnn32/logits_topk/index")[rows, views].astype(np.int64)
    lse = arrays("teachers/cnn32/logits_lse")[rows, views].astype(np.float64)
    logp = torch.log_softmax(tb.logits["cnn32"].double(), 1).numpy()
    np.testing.assert_allclose(np.take_along_axis(logp, index, 1), values - lse[:, None], atol=1e-5)
    np.testing.assert_allclose(torch.logsumexp(tb.logits["cnn32"].double(), 1).numpy(), lse, atol=1e-5)
    assert cached.label_maps["extra4"].tolist() == [0, 1, 2, -1] and tb.covered["extra4"].all()
    ev = arrays("teachers/extra4/logits_topk/values")[rows, views].astype(np.float32)
    ei = arrays("teachers/extra4/logits_topk/index")[rows, views].astype(np.int64)
    for b in range(rows.size):
        for v, i in zip(ev[b], ei[b]):
            if i < 3:                               # "dog" (3) is outside the target space: dropped
                assert tb.logits["extra4"][b, i].item() == v


def test_teacher_batch_fields_valid_mask_and_infos(store, arrays, cached):
    rows, views = np.arange(13), np.zeros(13, dtype=np.int64)
    labels = arrays("samples/label")
    tb = cached.to_teacher_batch(cached.gather(rows, views), labels, "cpu")
    tb.check(3)
    ok = arrays("samples/ok")
    assert not ok.all() and all(tb.valid[t].numpy().tolist() == ok.tolist() for t in ALL_IDS)
    assert all(torch.isfinite(tb.features[t]).all() for t in tb.features), "invalid rows are zeroed, not NaN"
    np.testing.assert_array_equal(tb.lse["vit48"].numpy()[ok], arrays("teachers/vit48/logits_lse")[ok, 0])
    np.testing.assert_array_equal(tb.label_logit["sub2"].numpy()[ok], arrays("teachers/sub2/label_logit")[ok, 0])
    assert np.isnan(tb.label_logit["sub2"].numpy()[ok & (labels == 1)]).all(), "bee is not a sub2 class"
    assert tb.labels.dtype == torch.int64 and tb.logit_ids() == ["cnn32", "extra4", "sub2", "vit48"]
    infos = {i.id: i for i in cached.teacher_infos()}
    assert infos["desc"].role == "descriptive" and not infos["desc"].has_logits and infos["desc"].featmap_dim is None
    assert infos["cnn32"].has_logits and infos["cnn32"].featmap_dim == tb.featmaps["cnn32"].shape[-1]
    assert infos["vit48"].feature_mean.shape == (infos["vit48"].feature_dim,) == infos["vit48"].feature_std.shape


def test_the_memory_plan_counts_what_one_batch_of_teacher_tensors_holds(cached):
    """``batch_tensor_bytes``: the gathered rows, their [T, B, ...] copy, float32 features/maps and the scores in
    the target classes; at least what a gathered batch and its TeacherBatch hold, at most 3x that."""
    def held(value):
        tensors = value.tensors if hasattr(value, "tensors") else [value] if isinstance(value, torch.Tensor) else []
        return sum(t.numel() * t.element_size() for t in tensors)

    rows, views = np.arange(8), np.zeros(8, dtype=np.int64)
    gathered = cached.gather(rows, views)
    batch = cached.to_teacher_batch(gathered, None, "cpu")
    measured = sum(a.nbytes for a in gathered.stacks.values()) + sum(held(v) for v in vars(batch).values())
    estimate = cached.memory_plan(8)["batch_tensor_bytes"]
    assert estimate == cached.batch_bytes(8) == 8 * cached.batch_bytes(1)       # per sample, not per store row
    assert measured <= estimate <= 3 * measured


def test_needs_limit_what_is_loaded(store):
    teachers = CachedTeachers(StoreReader(store), ["cnn32", "vit48"], needs=frozenset({"features"}))
    got = teachers.gather(np.array([0, 1]), np.array([0, 2]))
    assert all(set(g) == {"features"} for g in got.values())
    assert not any(i.has_logits or i.featmap_dim for i in teachers.teacher_infos())
    logits_only = CachedTeachers(StoreReader(store), ["desc", "sub2"], needs={"logits"})
    tb = logits_only.to_teacher_batch(logits_only.gather(np.array([0, 1]), np.array([0, 2])), None, "cpu")
    assert tb.valid["desc"].tolist() == [True, True] and list(tb.logits) == ["sub2"] and not tb.lse


class CountingArray:
    """A zarr array stand-in that records every read."""

    def __init__(self, array):
        self.array, self.reads = array, []
        self.shape, self.dtype, self.nbytes, self.chunks = array.shape, array.dtype, array.nbytes, array.chunks

    def __getitem__(self, key):
        self.reads.append(key)
        return self.array[key]


def test_featmap_block_cache_matches_ram_and_reads_one_view_of_each_block_once(store, cached, monkeypatch):
    reader = StoreReader(store)
    wrapped = {}
    original = reader.rows

    def counting(tid, path):
        assert path == "featmap"
        wrapped[tid] = CountingArray(original(tid, path))
        return wrapped[tid]

    monkeypatch.setattr(reader, "rows", counting)
    lazy = CachedTeachers(reader, ["cnn32", "vit48"], needs={"featmaps"}, ram_budget_bytes=1, window_blocks=2,
                          block_rows=4)
    assert set(lazy.caches) == {("cnn32", "featmap"), ("vit48", "featmap")} and not any(w.reads for w in wrapped.values())
    sampler = BlockShuffleSampler(13, lazy.block_rows, lazy.window_blocks, seed=3, ok=reader.samples()["ok"])
    per_epoch, assigned = [], []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order, views_of = np.array(list(sampler)), block_views(3, epoch, sampler.n_blocks, 3)
        before = {tid: len(w.reads) for tid, w in wrapped.items()}
        lazy.plan_epoch(sampler.windows(), views_of)             # reads the first window ahead
        for start in range(0, order.size, 5):
            rows = order[start:start + 5]
            got, ram = lazy.gather(rows, views_of[rows // 4]), cached.gather(rows, views_of[rows // 4])
            for tid in ("cnn32", "vit48"):
                np.testing.assert_array_equal(got[tid]["featmap"], ram[tid]["featmap"])
        per_epoch.append({tid: w.reads[before[tid]:] for tid, w in wrapped.items()})
        assigned.append([(4 * b, int(v)) for b, v in enumerate(views_of)])
        assert lazy.read_counts()["read_bytes_per_sample_teacher"] > 0
    for tid in wrapped:
        for reads, want in zip(per_epoch, assigned):
            assert sorted((rows.start, view) for rows, view in reads[tid]) == want, "each block once, in its view"
        assert all(r.start % 4 == 0 and r.stop - r.start in (4, 1) for r, _ in wrapped[tid].reads), "whole blocks"
    rows = good_rows(store)                       # views that ignore the assignment: read per (block, view)
    got = lazy.gather(rows, rows % 3)
    np.testing.assert_array_equal(got["vit48"]["featmap"], cached.gather(rows, rows % 3)["vit48"]["featmap"])
    auto = CachedTeachers(reader, ["cnn32"], needs={"featmaps"}, ram_budget_bytes=1)
    assert auto.block_rows == 1 and "featmap" not in auto.tables["cnn32"]


# ---------------------------------------------------------------- student views

def test_student_views_match_view_pixels_and_normalise(store, arrays):
    reader = StoreReader(store)
    data = StudentViews(reader, (24, 20), MEAN, STD, interpolation="bicubic", seed=5)
    data = pickle.loads(pickle.dumps(data))
    ids, boxes, root = arrays("samples/id"), arrays("samples/views"), reader.meta.dataset["root"]
    for row in good_rows(store)[:6]:
        item = data[row]
        v = item["view"]
        assert v == data.view_for(row) == block_views(5, 0, 4, 3)[row // 4]      # one view per 4-row unit
        box = boxes[row, v]
        expected = view_pixels(decode_image(f"{root}/{ids[row]}"), box[:4], bool(box[4]), (24, 20), "bicubic")
        assert torch.equal(data.pixels(row, v), expected)
        mean, std = torch.tensor(MEAN).view(3, 1, 1) * 255, torch.tensor(STD).view(3, 1, 1) * 255
        torch.testing.assert_close(item["image"], (expected.float() - mean) / std, rtol=0, atol=0)
        assert item["image"].shape == (3, 24, 20) and item["label"] == arrays("samples/label")[row]
    for epochs in (range(0, 3), range(3, 6)):       # each cycle of V = 3 epochs: every block sees every view once
        by_block = [[data.view_for(r, e) for e in epochs] for r in range(13)]
        assert all(sorted(views) == [0, 1, 2] for views in by_block)
        assert all(by_block[r] == by_block[r - r % 4] for r in range(13)), "the rows of a block share its view"
    assert [data.view_for(r, e) for r in range(13) for e in range(3)] != \
        [data.view_for(r, e) for r in range(13) for e in range(3, 6)], "cycles draw new permutations"
    center = StudentViews(reader, (16, 16), MEAN, STD, views_mode="center")
    assert {center[r]["view"] for r in good_rows(store)[:4]} == {0}


def test_missing_images_are_reported_with_count_and_fix(store, tmp_path):
    reader = StoreReader(store)
    moved = tmp_path / "moved"
    shutil.copytree(reader.meta.dataset["root"], moved)
    for name in ("ant/img000.jpg", "bee/img001.png"):
        (moved / name).unlink()
    with pytest.raises(UsageError) as err:
        StudentViews(reader, (16, 16), MEAN, STD, data_root=moved)
    text = str(err.value)
    assert "2 of 12 images" in text and str(moved / "ant/img000.jpg") in text and "--data" in text
    with pytest.raises(UsageError, match="12 of 12 images"):
        StudentViews(reader, (16, 16), MEAN, STD, data_root=tmp_path / "nowhere")
    (moved / "ant/img000.jpg").write_bytes(b"x")
    (moved / "bee/img001.png").write_bytes(b"x")
    assert len(StudentViews(reader, (16, 16), MEAN, STD, data_root=moved)) == 13


def test_make_loader_batches_feed_teacher_batches(store, cached):
    reader = StoreReader(store)
    data = StudentViews(reader, (16, 16), MEAN, STD, seed=1)
    loader = make_loader(data, batch_size=4, block_rows=4, window_blocks=2, seed=0, num_workers=2,
                         multiprocessing_context="fork")
    loader.set_epoch(1)
    batches = list(loader)
    assert len(batches) == len(loader) == 3 and all(b["image"].shape == (4, 3, 16, 16) for b in batches)
    rows = torch.cat([b["row"] for b in batches]).numpy()
    assert rows.tolist() == list(loader.sampler)[:12]
    assert all(int(v) == data.view_for(int(r), 1) for b in batches for r, v in zip(b["row"], b["view"]))
    tb = cached.for_batch(batches[0], "cpu")
    assert tb.batch_size == 4 and all(tb.valid[t].all() for t in ALL_IDS)


# ---------------------------------------------------------------- sampler

def test_sampler_permutes_ok_rows_deterministically_by_window():
    ok = np.ones(50, dtype=bool)
    ok[[3, 17, 49]] = False
    sampler = BlockShuffleSampler(50, block_rows=8, window_blocks=2, seed=7, ok=ok)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = np.array(list(sampler))
        assert sorted(order.tolist()) == np.flatnonzero(ok).tolist() and len(sampler) == 47
        start = 0
        for blocks in sampler.windows():
            window = order[start:start + sum(ok[b * 8:(b + 1) * 8].sum() for b in blocks)]
            assert set(window // 8) <= set(blocks.tolist()), "a window holds only its own blocks"
            start += window.size
        orders.append(order)
    again = BlockShuffleSampler(50, block_rows=8, window_blocks=2, seed=7, ok=ok)
    again.set_epoch(1)
    assert np.array_equal(np.array(list(again)), orders[1])
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    other = BlockShuffleSampler(50, block_rows=8, window_blocks=2, seed=8, ok=ok)
    assert not np.array_equal(np.array(list(other)), orders[0])


@pytest.mark.parametrize("split", ["blocks", "strided"])
def test_sampler_ddp_split_is_disjoint_equal_and_covering(split):
    world = 3
    parts = [BlockShuffleSampler(47, 8, 2, seed=1, rank=r, world=world, split=split) for r in range(world)]
    for s in parts:
        s.set_epoch(2)
    orders = [list(s) for s in parts]
    assert {len(o) for o in orders} == {16} == {len(s) for s in parts}
    flat = [r for o in orders for r in o]
    assert set(flat) == set(range(47)) and len(flat) == 48
    assert len(set(orders[0]) & set(orders[1])) == 0 and len(set(orders[1]) & set(orders[2])) == 0
    full = parts[0].global_order().tolist()
    if split == "strided":
        interleaved = [orders[i % world][i // world] for i in range(48)]      # like DistributedSampler
        assert interleaved[:47] == full and interleaved[47] == interleaved[0], \
            "rank r takes rows r, r+world, ... of the global order; padding repeats the start"
        return
    assert flat[:47] == full and flat[47] == full[0], "rank r takes the r-th contiguous slice; padding repeats the start"
    blocks = [set(np.asarray(o) // 8) for o in orders]
    for r in range(world):     # disjoint blocks but for one shared at each end of a slice
        others = set().union(*(blocks[q] for q in range(world) if q != r))
        assert len(blocks[r] & others) <= 2 and blocks[r] == {int(b) for w in parts[r].windows() for b in w}
    assert sum(map(len, blocks)) <= 6 + 2 * (world - 1), "about 1/world of the blocks each, not all of them"
    with pytest.raises(ValueError, match="rank"):
        BlockShuffleSampler(10, 4, 1, rank=3, world=3)
    with pytest.raises(ValueError, match="split must be one of blocks, strided"):
        BlockShuffleSampler(10, 4, 1, split="rows")


def test_stacked_batch_equals_the_per_teacher_construction(store, cached):
    """The stacked ``TeacherBatch`` (one tensor per group of equal-shaped teachers) holds, teacher by teacher,
    exactly what the per-teacher path makes of the same gathered rows: ``scatter_full_logits`` /
    ``scatter_topk_logits`` of each teacher, validity from its finite rows, invalid rows zeroed."""
    from kt_train.methods import scatter_full_logits, scatter_topk_logits
    from kt_train.methods.common import stacked_teacher_logits, teacher_logits
    from kt_train.methods.stacks import Stacked

    rows, views = np.arange(13), (np.arange(13) * 2) % 3
    got = cached.gather(rows, views)
    tb = cached.to_teacher_batch(got, None, "cpu")
    assert isinstance(tb.logits, Stacked) and len(tb.logits.tensors) == 1, "one [P, B, C] for every logit teacher"
    assert len(tb.features.tensors) < len(tb.features), "equal feature dims share a group"
    for tid in ALL_IDS:
        arrays = {p: torch.from_numpy(np.ascontiguousarray(a)) for p, a in got[tid].items()}
        ok = torch.ones(13, dtype=torch.bool)
        for path, a in arrays.items():
            if path != "label_logit" and a.is_floating_point():
                ok &= torch.isfinite(a.reshape(13, -1)).all(1)
        assert torch.equal(tb.valid[tid], ok), tid
        arrays = {p: torch.where(ok.view(-1, *[1] * (a.dim() - 1)), a, 0).to(a.dtype) if a.is_floating_point() else a
                  for p, a in arrays.items()}
        for path, table in (("features", tb.features), ("featmap", tb.featmaps)):
            if path in arrays:
                assert torch.equal(table[tid], arrays[path]), (tid, path)
        if tid in cached.label_maps:
            label_map = torch.from_numpy(cached.label_maps[tid])
            if "logits" in arrays:
                want, covered = scatter_full_logits(arrays["logits"], label_map, 3)
            else:
                want, covered = scatter_topk_logits(arrays["logits_topk/values"], arrays["logits_topk/index"],
                                                    arrays["logits_lse"], label_map, 3)
            assert torch.equal(tb.logits[tid], want) and torch.equal(tb.covered[tid], covered), tid
    ids = tb.logit_ids()
    for standardize in (False, True):           # cached mean/std for the full-logit teachers only: a mix
        torch.testing.assert_close(stacked_teacher_logits(tb, ids, standardize),
                                   torch.stack([teacher_logits(tb, t, standardize) for t in ids]), rtol=0, atol=0)
