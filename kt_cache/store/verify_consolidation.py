"""``ktc verify``'s metadata check: consolidated metadata exists and lists every node as stored.

A stale consolidation hides nodes from readers that cannot list the store (``https://``). Store format v3: the
root's teacher list names every teacher group, and each group below the root consolidates the nodes under it,
each as its own ``zarr.json`` has it; v1/v2: the root's consolidated metadata lists every node, with current
teacher attributes.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from kt_cache.store import format as fmt
from kt_cache.store.location import get_bytes, get_many, list_keys

if TYPE_CHECKING:
    from kt_cache.store.verify import VerifyReport


def json_document(reader: fmt.StoreReader, key: str) -> dict[str, Any] | None:
    """A metadata document as a dict; None when absent or not a JSON object (other checks report that)."""
    return parse_document(get_bytes(reader.store, key))


def check_consolidation(reader: fmt.StoreReader, manifest: dict[str, Any] | None, report: VerifyReport) -> None:
    """Consolidated metadata exists and lists every node as stored (a stale one hides nodes from readers): v3, the
    root's teacher list and each teacher's own document; v1/v2, the root's document."""
    fix = ("Fix: rerun `ktc extract` with the store's manifest (it re-finalizes), or ask the producer to."
           if report.made_by.startswith("ktc extract") and not report.packed else f"Fix: {report.repair}.")
    if not reader.consolidated:
        report.add("store", "zarr.json", f"no consolidated metadata: readers over https cannot discover teachers. {fix}")
        return
    keys = list(manifest or {}) + (list_keys(reader.store) if reader.location is None or reader.location.listable else [])
    stored = {k[: -len("/zarr.json")] for k in keys if k.endswith("/zarr.json")}
    if reader.meta.teachers is None:
        check_root_consolidation(reader, stored, fix, report)
        return
    groups = {node.split("/")[1] for node in stored if node.startswith("teachers/") and node.count("/") == 1}
    for teacher_id in sorted(groups - set(reader.meta.teachers)):
        report.add(f"teachers/{teacher_id}", f"teachers/{teacher_id}/zarr.json", "stored but missing from the root's "
                   f"teacher list (attrs['ktc']['teachers'], stale): readers do not see this teacher. {fix}")
    nodes = sorted(n for n in stored | {"samples"} if n == "samples" or n.startswith(("samples/", "teachers/")))
    docs = dict(zip(nodes, map(parse_document, get_many(reader.store, [f"{n}/zarr.json" for n in nodes]))))
    from kt_cache.finalize import children_by_group

    for group, children in children_by_group(docs).items():
        check_group_consolidation(group, docs, children, fix, report)


def parse_document(raw: bytes | None) -> dict[str, Any] | None:
    try:
        doc = json.loads(raw or b"null")
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def check_group_consolidation(group: str, docs: dict[str, dict[str, Any] | None], children: list[str], fix: str,
                              report: VerifyReport) -> None:
    """v3: a group's ``zarr.json`` holds every node under it, each as that node's own document has it."""
    from kt_cache.finalize import minimal_node, without_copies

    consolidated = (docs.get(group) or {}).get("consolidated_metadata")
    if not isinstance(consolidated, dict):
        report.add(group, f"{group}/zarr.json", f"no consolidated metadata for the nodes under {group}: readers "
                   f"over https cannot find its arrays. {fix}")
        return
    nodes = consolidated.get("metadata") or {}
    for node in sorted(children):
        name, own = node[len(group) + 1:], docs.get(node)
        if name not in nodes:
            report.add(node, f"{node}/zarr.json", f"stored but missing from {group}/zarr.json's consolidated "
                       f"metadata (stale). {fix}")
        elif own is not None and without_copies(minimal_node(own)) != without_copies(nodes[name]):
            report.add(node, f"{node}/zarr.json", f"differs from its copy in {group}/zarr.json's consolidated "
                       f"metadata (stale). {fix}")


def check_root_consolidation(reader: fmt.StoreReader, stored: set[str], fix: str, report: VerifyReport) -> None:
    """v1/v2: the root's consolidated metadata lists every node, with each teacher's current attributes."""
    nodes = dict(((json_document(reader, "zarr.json") or {}).get("consolidated_metadata") or {}).get("metadata") or {})
    for node in sorted(stored - set(nodes)):
        report.add(node, f"{node}/zarr.json", f"stored but missing from the consolidated metadata (stale). {fix}")
    for teacher_id in reader.teacher_ids():
        node = f"teachers/{teacher_id}"
        own = (json_document(reader, f"{node}/zarr.json") or {}).get("attributes")
        if own is not None and own != ((nodes.get(node) or {}).get("attributes") or {}):   # {} is left out there
            report.add(node, f"{node}/zarr.json", f"attributes differ from the consolidated copy (stale). {fix}")
