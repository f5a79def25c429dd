"""``ktc train`` and ``ktc eval`` end to end on a tiny store: every method, resume, eval, bad input."""

from __future__ import annotations

import json
import math

import pytest
import yaml
import zarr
from click.testing import CliRunner

from extract_helpers import cnn_teacher, make_image_folder, vit_teacher, write_manifest
from kt_cache.cli import cli
from kt_cache.store import StoreReader
from kt_cache.finalize import write_object_manifest

COMMON = ["--student", "resnet10t", "--img-size", "32", "--epochs", "1", "--batch-size", "4", "--workers", "0",
          "--no-progress"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def extracted_project(root, per_class):
    """``root`` with labelled images of 3 classes, 3 views in units of 4 rows; a top-k CNN teacher and a
    full-logit ViT teacher (both with maps), extracted into ``root/out.zarr``."""
    make_image_folder(root / "images", per_class=per_class)
    manifest = write_manifest(root / "teachers.yaml", [cnn_teacher(), vit_teacher(role="predictive")])
    result = invoke("extract", "--manifest", manifest, "--workers", "0", "--no-progress")
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """12 labelled images (see ``extracted_project``)."""
    return extracted_project(tmp_path_factory.mktemp("train_store"), per_class=4)


def train(store, out, *extra):
    result = invoke("train", "--cache", store / "out.zarr", "--out", out, *COMMON, *extra)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["ce", "kd", "avg", "uniform", "kpu", "bikd", "fg"])
def test_every_method_trains_checkpoints_and_eval_reproduces(store, tmp_path, method):
    records = train(store, tmp_path / method, "--method", method, "--log-every", "1")
    steps = [r for r in records if r["kind"] == "step"]
    assert len(steps) == 3 and all(math.isfinite(r["loss"]) for r in steps)
    assert all(math.isfinite(v) for r in steps for k, v in r.items() if k.endswith("_loss"))
    assert all(math.isfinite(r["lr"]) and r["lr"] >= 0 for r in steps) and any(r["lr"] > 0 for r in steps)
    assert all(math.isfinite(r["samples_per_s"]) and r["samples_per_s"] > 0 for r in steps)
    for name in ("student.safetensors", "student.json", "method.safetensors", "optimizer.safetensors", "optimizer.json", "config.yaml",
                 "loss.png", "confusion.png", "eval.json"):
        assert (tmp_path / method / name).is_file(), name
    assert not list((tmp_path / method).glob("*.pt")), "run folders hold no pickle"
    saved = json.loads((tmp_path / method / "eval.json").read_text())
    again = invoke("eval", "--checkpoint", tmp_path / method, "--data", store / "images", "--cache", store / "out.zarr",
                   "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.output) == saved and 0 <= saved["top1"] <= 1 and saved["n"] == 12


def test_uniform_plots_vote_diagnostics_and_bikd_teaching_share(store, tmp_path):
    records = [r for r in train(store, tmp_path / "u", "--method", "uniform", "--log-every", "1") if r["kind"] == "step"]
    assert "tie_frac" in records[0] and "vote_agreement" in records[0]
    assert (tmp_path / "u" / "diagnostics.png").is_file()
    records = [r for r in train(store, tmp_path / "b", "--method", "bikd", "--students", "resnet10t,resnet10t",
                                "--log-every", "1") if r["kind"] == "step"]
    assert any(k.startswith("teach_share/") for k in records[0])
    assert (tmp_path / "b" / "teach_share.png").is_file() and (tmp_path / "b" / "student1.safetensors").is_file()


def test_no_teacher_network_is_built_during_training(store, tmp_path, monkeypatch):
    import timm

    import kt_cache.teachers as teachers

    def forbidden(*args, **kwargs):
        raise AssertionError("a teacher network was built during ktc train")

    monkeypatch.setattr(teachers, "load_teacher", forbidden)
    monkeypatch.setattr(teachers, "resolve_teacher", forbidden)
    built = []
    real_create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name, *a, **k: built.append(name) or real_create(name, *a, **k))
    train(store, tmp_path / "run", "--method", "uniform")
    assert set(built) == {"resnet10t"}, built           # only the student; never vit_tiny (a teacher)


def test_config_file_flags_override_and_resolved_config_is_saved(store, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"method": "kd", "lr": 0.01, "method_options": {"tau": 2.0}}))
    train(store, tmp_path / "run", "--config", config, "--lr", "0.002")
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["method"] == "kd" and saved["lr"] == 0.002 and saved["method_options"] == {"tau": 2.0}
    config.write_text(yaml.safe_dump({"methd": "kd"}))
    result = invoke("train", "--cache", store / "out.zarr", "--config", config)
    assert result.exit_code == 2 and "methd" in result.output and 'Did you mean "method"' in result.output


def test_resume_continues_from_the_last_epoch(store, tmp_path):
    out = tmp_path / "run"
    train(store, out, "--method", "kd", "--epochs", "1")
    first = json.loads((out / "state.json").read_text())
    records = train(store, out, "--method", "kd", "--epochs", "2", "--resume", "--log-every", "1")
    epochs = [r["epoch"] for r in records if r["kind"] == "epoch"]
    assert epochs == [0, 1] and json.loads((out / "state.json").read_text())["step"] == first["step"] + 3


@pytest.fixture(scope="module")
def store32(tmp_path_factory):
    """33 labelled images in units of 4 rows: a block is a small share of the store, as at scale."""
    return extracted_project(tmp_path_factory.mktemp("store32"), per_class=11)


@pytest.mark.parametrize("method, streamed_array", [("uniform", ("cnn32", "features")), ("kpu", ("cnn32", "featmap"))])
def test_a_small_ram_budget_streams_and_trains_the_same_student(store32, tmp_path, method, streamed_array):
    """With a budget of 85 % of the teacher arrays, the largest are streamed in row blocks and read ahead; the
    batches, hence the student bit for bit, are those of holding everything in RAM under the same sampler."""
    import torch
    from safetensors.torch import load_file

    from kt_train.data import CachedTeachers
    from kt_train.methods import METHODS

    reader = StoreReader(store32 / "out.zarr")
    held = CachedTeachers(reader, reader.teacher_ids(), needs=METHODS[method].needs, window_blocks=1)
    budget = 0.85 * sum(a.nbytes for table in held.tables.values() for a in table.values()) / (1 << 30)
    streamed = CachedTeachers(reader, reader.teacher_ids(), needs=METHODS[method].needs,
                              ram_budget_bytes=int(budget * (1 << 30)), window_blocks=1)
    assert streamed_array in streamed.caches and streamed.block_rows == 4    # the sampler's blocks
    runs, plans = {}, {}
    for name, gib in (("ram", "4"), ("streamed", repr(budget))):
        result = invoke("train", "--cache", store32 / "out.zarr", "--out", tmp_path / name, *COMMON, "--method", method,
                        "--ram-budget-gb", gib, "--window-blocks", "1")
        assert result.exit_code == 0, result.output
        assert "memory: teacher arrays" in result.output and "GiB of teacher tensors per batch of 4" in result.output
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        plans[name] = next(r for r in records if r["kind"] == "memory")
        assert all(r["peak_rss_mib"] > 0 for r in records if r["kind"] == "epoch")
        runs[name] = load_file(str(tmp_path / name / "student.safetensors"))
    assert all(torch.equal(runs["ram"][k], runs["streamed"][k]) for k in runs["ram"])
    model = {k: plans["ram"][k] for k in ("student_params", "method_params", "model_state_bytes")}
    assert model["student_params"] > 0 and model["method_params"] > 0     # uniform's heads / kpu's adapters
    assert model["model_state_bytes"] == 16 * (model["student_params"] + model["method_params"])
    held_all = sum(a.nbytes for table in held.tables.values() for a in table.values())
    assert plans["ram"]["streamed_arrays"] == 0 and plans["ram"]["held_bytes"] == held_all
    plan = plans["streamed"]      # what is held plus the stream buffers stays within the budget
    assert plan["streamed_arrays"] >= 1 and plan["block_rows"] == 4 and plan["held_bytes"] < held_all
    assert 0 < plan["held_bytes"] + plan["stream_buffer_bytes"] <= plan["ram_budget_bytes"]
    assert plan["batch_tensor_bytes"] == plans["ram"]["batch_tensor_bytes"] > 0        # where the arrays live: same
    bad = invoke("train", "--cache", store32 / "out.zarr", "--out", tmp_path / "bad", *COMMON, "--ram-budget-gb", "0")
    assert bad.exit_code == 2 and "--ram-budget-gb 0.0: must be > 0" in bad.output


def test_the_run_states_its_model_memory_and_warns_when_it_outgrows_the_device(store32, tmp_path, monkeypatch):
    """Beside the teacher arrays, the run prints the students' and the method's trainable parameters with what they
    take under AdamW, and warns (with the fix) when that is more than half of the device's memory."""
    import kt_train.loop

    result = invoke("train", "--cache", store32 / "out.zarr", "--out", tmp_path / "plain", *COMMON, "--method", "uniform")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()[0])
    line = next(x for x in result.output.splitlines() if x.startswith("memory: model"))
    assert f"{record['method_params'] / 1e6:.1f} M (uniform) trainable parameters" in line and "Warning" not in line
    monkeypatch.setattr(kt_train.loop, "device_memory_bytes", lambda device: record["model_state_bytes"])
    small = invoke("train", "--cache", store32 / "out.zarr", "--out", tmp_path / "small", *COMMON, "--method", "uniform")
    assert small.exit_code == 0, small.output
    assert "more than half of this device's" in small.output and "--opt hidden=64" in small.output
    monkeypatch.setattr(kt_train.loop, "device_memory_bytes", lambda device: record["model_state_bytes"] - 1)
    refused = invoke("train", "--cache", store32 / "out.zarr", "--out", tmp_path / "refused", *COMMON, "--method", "uniform")
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert "with gradients and AdamW moments, more than this device's" in refused.output and "--opt hidden=64" in refused.output
    assert not (tmp_path / "refused" / "student.safetensors").exists()


def test_cpu_ranks_on_one_machine_share_its_memory_for_the_model_check(monkeypatch):
    """Under torchrun on a CPU machine every local rank holds the model state: each may take its share of the RAM."""
    import torch

    from kt_train.loop import device_memory_bytes

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    whole = device_memory_bytes(torch.device("cpu"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert whole and device_memory_bytes(torch.device("cpu")) == whole // 4


def test_evaluation_reads_the_teachers_within_the_runs_budget(store32, tmp_path, monkeypatch):
    """The final agreement with the teachers holds or streams their logits within the run's --ram-budget-gb (recorded
    in run.json), and a streamed evaluation scores what the in-RAM one does."""
    import kt_train.data
    from kt_train.data import CachedTeachers

    out = tmp_path / "run"
    train(store32, out, "--method", "kd", "--ram-budget-gb", "4")
    info = json.loads((out / "run.json").read_text())
    assert info["ram_budget_bytes"] == 4 << 30
    built = []

    class Recording(CachedTeachers):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(kt_train.data, "CachedTeachers", Recording)
    scores = {}
    for name, budget in (("ram", 4 << 30), ("streamed", 1)):
        (out / "run.json").write_text(json.dumps(dict(info, ram_budget_bytes=budget)))
        result = invoke("eval", "--checkpoint", out, "--cache", store32 / "out.zarr", "--json")
        assert result.exit_code == 0, result.output
        scores[name] = json.loads(result.output)["teacher_agreement"]
        assert built[-1].ram_budget_bytes == budget and bool(built[-1].caches) == (name == "streamed")
    assert scores["streamed"] == scores["ram"] and scores["ram"]["n"] == 33


def test_a_run_of_an_older_version_with_optimizer_pt_resumes_to_the_same_student(store, tmp_path):
    """Older runs saved optimizer and scheduler state as one ``optimizer.pt`` (tensors and plain numbers only),
    and their ``state.json`` listed no files: such a run still resumes (``weights_only=True``), identically."""
    import torch
    from safetensors.torch import load_file

    from kt_train.checkpoint import load_training_state

    new, old = tmp_path / "new", tmp_path / "old"
    train(store, new, "--method", "kd", "--epochs", "1")
    train(store, old, "--method", "kd", "--epochs", "1")
    torch.save(load_training_state(old), old / "optimizer.pt")
    (old / "optimizer.safetensors").unlink()
    (old / "optimizer.json").unlink()
    state = json.loads((old / "state.json").read_text())
    (old / "state.json").write_text(json.dumps({k: v for k, v in state.items() if k != "files"}))
    for out in (new, old):
        train(store, out, "--method", "kd", "--epochs", "2", "--resume")
    a, b = (load_file(str(out / "student.safetensors")) for out in (new, old))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("extra", "needle"), [
    (["--method", "kpu", "--teachers", "cnn32", "--student", "resnet10t"], None),   # control: works
    (["--method", "bikd", "--labels", "ignore"], "needs the true labels"),
    (["--method", "ce", "--labels", "ignore"], "needs the true labels"),
    (["--method", "kd", "--student", "resnet10tt"], "resnet10t"),
    (["--method", "kd", "--teachers", "cnn3"], 'Did you mean "cnn32"'),
    (["--method", "kd", "--data", "/nonexistent/images"], "--data"),
])
def test_bad_training_input_exits_2_with_the_fix(store, tmp_path, extra, needle):
    result = invoke("train", "--cache", store / "out.zarr", "--out", tmp_path / "run", *COMMON, *extra)
    if needle is None:
        assert result.exit_code == 0, result.output
        return
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Fix" in result.output and "Traceback" not in result.output


def test_a_bad_ddp_split_is_refused_from_the_flag_and_from_a_config_file(store, tmp_path):
    flag = invoke("train", "--cache", store / "out.zarr", "--out", tmp_path / "a", *COMMON, "--ddp-split", "rows")
    assert flag.exit_code == 2 and "'rows' is not one of 'blocks', 'strided'" in flag.output
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"ddp_split": "rows"}))
    result = invoke("train", "--cache", store / "out.zarr", "--out", tmp_path / "b", *COMMON, "--config", config)
    assert result.exit_code == 2 and "--ddp-split rows: expected 'blocks' or 'strided'" in result.output
    assert "Fix:" in result.output and "Traceback" not in result.output


def test_store_without_needed_outputs_is_refused(tmp_path):
    make_image_folder(tmp_path / "images", per_class=2)
    teachers = [cnn_teacher(outputs=["features"], logits=None, featmap=None, role="descriptive")]
    manifest = write_manifest(tmp_path / "teachers.yaml", teachers)
    assert invoke("extract", "--manifest", manifest, "--workers", "0", "--no-progress").exit_code == 0
    # kpu trains on features alone (its global terms); its refusal of a bare teacher: tests/train/test_kpu_fg_runs.py
    for method, needle in (("uniform", "predictive with stored logits"),):
        result = invoke("train", "--cache", tmp_path / "out.zarr", "--out", tmp_path / method, *COMMON,
                        "--method", method)
        assert result.exit_code == 2 and needle in result.output and "Fix" in result.output, result.output


def test_incomplete_teacher_is_refused(store, tmp_path):
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(store / "out.zarr", copy)
    zarr.open_group(str(copy), mode="r+", use_consolidated=False)["teachers/cnn32/done"][1] = False
    write_object_manifest(copy)   # as finalized by a run whose unit 1 failed
    result = invoke("train", "--cache", copy, "--out", tmp_path / "run", *COMMON, "--method", "kd")
    assert result.exit_code == 2 and "cnn32" in result.output and "ktc extract" in result.output


def test_kpu_with_a_frozen_sentinel_from_the_store(store, tmp_path):
    import shutil

    store = shutil.copytree(store, tmp_path / "store")           # adding a teacher must not touch the shared store
    sentinel = vit_teacher(id="vit_sentinel", role="sentinel")
    manifest = write_manifest(store / "teachers.yaml", [cnn_teacher(), vit_teacher(role="predictive"), sentinel])
    assert invoke("extract", "--manifest", manifest, "--workers", "0", "--no-progress").exit_code == 0
    out = tmp_path / "kpu"
    result = invoke("train", "--cache", store / "out.zarr", "--out", out, "--method", "kpu", "--sentinel",
                    "vit_sentinel", "--teachers", "cnn32,vit48", "--img-size", "48", "--epochs", "1",
                    "--batch-size", "4", "--workers", "0", "--no-progress")
    assert result.exit_code == 0, result.output
    spec = json.loads((out / "student.json").read_text())
    assert spec["sentinel"]["model"] == "vit_tiny_patch16_224" and spec["name"] == "vit_tiny_patch16_224"


def test_bikd_on_a_store_without_labels_names_the_label_free_option(tmp_path):
    """A flat folder (no class sub-folders) gives a store whose labels are all -1: Bi-KD with true labels is
    refused naming ``--opt label_source=vote``; with it, label-free Bi-KD trains on the teachers' vote."""
    import shutil

    make_image_folder(tmp_path / "nested", per_class=2)
    (tmp_path / "images").mkdir()
    for image in sorted((tmp_path / "nested").rglob("img*")):
        shutil.move(image, tmp_path / "images" / f"{image.parent.name}_{image.name}")
    manifest = write_manifest(tmp_path / "teachers.yaml", [cnn_teacher()])
    doc = yaml.safe_load(manifest.read_text())
    doc["dataset"]["classes"] = ["ant", "bee", "cat"]                 # the label space, without any label
    manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert invoke("extract", "--manifest", manifest, "--workers", "0", "--no-progress").exit_code == 0
    store = tmp_path / "out.zarr"
    assert (zarr.open_group(str(store), mode="r")["samples/label"][:] == -1).all()
    refused = invoke("train", "--cache", store, "--out", tmp_path / "refused", *COMMON, "--method", "bikd")
    assert refused.exit_code == 2, refused.output
    assert "needs the true labels" in refused.output and "no labelled samples" in refused.output
    assert "--opt label_source=vote" in refused.output and "Traceback" not in refused.output
    assert not (tmp_path / "refused" / "student.safetensors").exists()
    out = tmp_path / "vote"
    result = invoke("train", "--cache", store, "--out", out, *COMMON, "--method", "bikd",
                    "--opt", "label_source=vote", "--log-every", "1")
    assert result.exit_code == 0, result.output
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["kind"] == "step"]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)
    assert (out / "student.safetensors").is_file()
    assert "teacher_agreement" in json.loads((out / "eval.json").read_text()), "no labels: agreement only"


def test_train_help_shows_every_default_and_that_cache_is_required():
    from click.testing import CliRunner as Runner

    from kt_cache.cli import cli as ktc
    from kt_train.config import TrainConfig

    text = " ".join(Runner().invoke(ktc, ["train", "--help"]).output.split())
    assert "Required, here or in --config" in text
    for flag, value in (("batch-size", TrainConfig.batch_size), ("lr", TrainConfig.lr), ("epochs", TrainConfig.epochs),
                        ("method", TrainConfig.method)):
        assert f"--{flag}" in text and f"[default: {value}]" in text, (flag, value)
    assert "(default: a quarter of this machine's memory)" in text      # --ram-budget-gb: computed at run time


def per_teacher_layout(out, store):
    """Rewrite run folder ``out`` (uniform) as runs before grouped heads wrote it: one head per teacher in
    ``method.safetensors`` (``nn.Linear`` weights ``[d_out, d_in]``) and AdamW state in that parameter order."""
    import torch
    from safetensors.torch import load_file, save_file

    from kt_train.checkpoint import load_training_state, save_training_state
    from kt_train.data import CachedTeachers
    from kt_train.methods import METHODS, MethodDims, build_method

    reader = StoreReader(store / "out.zarr")
    cached = CachedTeachers(reader, reader.teacher_ids(), needs=METHODS["uniform"].needs)
    method = build_method("uniform", {}, MethodDims(512, len(reader.class_names), cached.teacher_infos()))
    layout = method.legacy_params()

    def split(stacked, p):
        return (stacked[p.member].T if p.transpose else stacked[p.member]).contiguous()

    heads = load_file(str(out / "method.safetensors"))
    assert heads.keys() == method.state_dict().keys()
    save_file({p.old: split(heads[p.new], p) for p in layout}, str(out / "method.safetensors"), {"method": "uniform"})
    saved = load_training_state(out)
    old = [p for p in layout if not p.buffer]
    new = [n for n, q in method.named_parameters() if q.requires_grad]
    group, = saved["optimizer"]["param_groups"]
    students = len(group["params"]) - len(new)
    state = {i: v for i, v in saved["optimizer"]["state"].items() if i < students}
    for j, p in enumerate(old):
        entry = saved["optimizer"]["state"][students + new.index(p.new)]
        state[students + j] = {k: v if k == "step" else split(v, p) for k, v in entry.items()}
    assert all(torch.is_tensor(v) for e in state.values() for v in e.values())
    optimizer = {"state": state, "param_groups": [dict(group, params=list(range(students + len(old))))]}
    save_training_state(out, optimizer, saved["scheduler"], saved["scaler"])
    doc = json.loads((out / "state.json").read_text())
    (out / "state.json").write_text(json.dumps({k: v for k, v in doc.items() if k != "files"}))


def test_a_run_saved_with_per_teacher_heads_resumes_to_the_same_student(store, tmp_path):
    """Runs before grouped heads saved UNIFORM's encoders/decoders per teacher (``encoders.<id>.0.weight``) with
    AdamW moments in that order: such a folder resumes into the grouped heads exactly as a new one does."""
    import torch
    from safetensors.torch import load_file

    new, old = tmp_path / "new", tmp_path / "old"
    for out in (new, old):
        train(store, out, "--method", "uniform", "--epochs", "1")
    per_teacher_layout(old, store)
    assert any(".0.weight" in k and ".d" not in k for k in load_file(str(old / "method.safetensors")))
    for out in (new, old):
        train(store, out, "--method", "uniform", "--epochs", "2", "--resume")
    for name in ("student.safetensors", "method.safetensors"):
        a, b = (load_file(str(out / name)) for out in (new, old))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_a_run_that_uses_no_logits_finishes_when_a_teachers_logits_name_no_target_class(tmp_path):
    """kpu reads features and maps only: a teacher whose classes are not the dataset's (e.g. ImageNet logits over
    a folder of other classes) trains, and the final agreement leaves it out and says so instead of failing."""
    from extract_helpers import finished_project

    base = finished_project(tmp_path / "p", [cnn_teacher(classes=["x1", "x2", "x3"])])
    out = tmp_path / "kpu"
    result = invoke("train", "--cache", base / "out.zarr", "--out", out, *COMMON, "--method", "kpu")
    assert result.exit_code == 0, result.output
    agreement = json.loads((out / "eval.json").read_text())["teacher_agreement"]
    assert agreement["unmapped_teachers"] == ["cnn32"] and agreement["n"] == 0
    assert "cnn32 name none of them" in agreement["note"]
    refused = invoke("train", "--cache", base / "out.zarr", "--out", tmp_path / "kd", *COMMON, "--method", "kd")
    assert refused.exit_code == 2 and "in the target label space" in refused.output      # kd needs those logits
