"""``kt_cache.open_datatree``: the store in xarray with ids and class names as coordinates (the docs example runs)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

import kt_cache
from http_server import serve_folder
from kt_cache.store import StoreReader

DOC = Path(__file__).resolve().parents[1] / "docs" / "store-format.md"


def test_the_tree_has_meaningful_coordinates_and_the_top_k_pair(two_teacher_store):
    tree, reader = kt_cache.open_datatree(str(two_teacher_store)), StoreReader(two_teacher_store)
    ids = [str(i) for i in reader.sample("id").tolist()]
    assert list(tree.ds.sample.values) == ids and list(tree.ds.target_class.values) == reader.class_names
    cnn, vit = tree["teachers/cnn32"].ds, tree["teachers/vit48"].ds
    assert cnn["logits_topk_index"].dims == ("sample", "view", "rank")
    np.testing.assert_array_equal(cnn["logits_topk_values"].sel(sample=ids[5]).values,
                                  reader.read("cnn32", "logits_topk/values")[5])
    assert list(vit["class"].values) == reader.teacher_attrs("vit48")["class_names"]
    np.testing.assert_array_equal(vit["features"].sel(sample=ids[2], view=1).values, reader.read("vit48", "features")[2, 1])
    assert "done" not in cnn and "class_names" not in cnn.attrs["ktc_teacher"]


def test_the_documented_example_runs_locally_and_over_http(two_teacher_store, capsys):
    code = re.search(r"```python\n(import kt_cache\n.*?)```", DOC.read_text(), flags=re.S).group(1)
    exec(compile(code.replace('"train.zarr"', repr(str(two_teacher_store))), str(DOC), "exec"), {})
    assert "label:" in capsys.readouterr().out
    with serve_folder(two_teacher_store.parent) as server:
        tree = kt_cache.open_datatree(f"{server.url}/{two_teacher_store.name}")
        assert tree["teachers/vit48"].ds["logits"].shape == (12, 3, 3)
