"""``ktc verify``, ``ktc merge``, ``ktc subset``, ``ktc pack``, ``ktc compact``, ``ktc upgrade``: trust, combine and
ship stores between labs."""

from __future__ import annotations

import json

import click


@click.command()
@click.argument("store")
@click.option("--quick", is_flag=True, help="Check metadata only (attributes, array metadata, metadata digests, "
              "consolidation, object list, object sizes); read no chunk.")
@click.option("--keep-temp", is_flag=True, help="List orphan temp files of killed writers instead of removing them.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def verify(store: str, quick: bool, keep_temp: bool, as_json: bool) -> None:
    """Check a store (path or URL) against its object manifest and its done flags.

    Recomputes size + sha256 of every object listed in ktc-objects.json, decodes every chunk, checks that
    units marked done hold no NaN for decoded samples and that no array holds inf, and removes orphan
    temp files (*.<hex>.partial) of killed writers. Exits 1 naming every bad array and object.
    """
    from kt_cache.errors import StoreError
    from kt_cache.store.verify import verify_store

    report = verify_store(store, quick=quick, clean=not keep_temp)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=1))
        if not report.ok:
            raise click.exceptions.Exit(1)
        return
    if not report.ok:
        raise StoreError(report.summary() + f"\nFix: {report.repair}.")
    click.echo(report.summary())


@click.command()
@click.argument("stores", nargs=-1, required=True)
@click.option("--out", "out", required=True, help="The new merged store (a path that does not exist yet).")
@click.option("--rename", "renames", multiple=True, metavar="[N:]OLD=NEW",
              help="Rename teacher OLD to NEW: in every input after the first that holds OLD (or in its only "
                   "holder), or in input N (1-based). Repeatable.")
def merge(stores: tuple[str, ...], out: str, renames: tuple[str, ...]) -> None:
    """Merge stores of the same dataset and views into a new store; chunks are copied, never re-encoded.

    Teacher ids must be disjoint (use --rename). Inputs may be local paths, zip:// packs or URLs.
    """
    from kt_cache.store.sharing import merge_stores

    path = merge_stores(list(stores), out, renames)
    click.echo(f"merged {len(stores)} stores into {path}")


@click.command()
@click.argument("store")
@click.option("--teachers", "teachers", multiple=True, required=True, metavar="ID[,ID…]",
              help="Teachers to keep (comma-separated or repeated).")
@click.option("--out", "out", required=True, help="The new store (a path that does not exist yet).")
def subset(store: str, teachers: tuple[str, ...], out: str) -> None:
    """Copy some teachers of a store (path or URL) into a new store; only their objects are read."""
    from kt_cache.store.sharing import subset_store

    path = subset_store(store, teachers, out)
    click.echo(f"wrote {path}")


@click.command()
@click.argument("store")
@click.argument("out")
def pack(store: str, out: str) -> None:
    """Pack a finalized store into one uncompressed .zip (readable as zip://OUT by ktc and by zarr's ZipStore)."""
    from kt_cache.store.sharing import pack_store

    path = pack_store(store, out)
    click.echo(f"packed {store} into {path} ({path.stat().st_size} bytes); read it as zip://{path}")


@click.command()
@click.argument("store")
@click.option("--out", "out", required=True, help="The new compact store (a path that does not exist yet).")
@click.option("--features", "features", metavar="CODEC", help="Codec of pooled features: fp16, int8, pca:K or "
              "pca:K,int8 (K principal components kept; K may be D/N, a fraction of each teacher's width D). "
              "Default: copied unchanged.")
@click.option("--featmap", "featmap", metavar="CODEC", help="Codec of spatial maps: the same choices, "
              "per grid cell over the channels, or tc:B, a transform code of each whole map at B bytes per cell "
              "(tc:D/8: 1/16 of fp16). Default: copied unchanged.")
@click.option("--teachers", "teachers", multiple=True, metavar="ID[,ID…]",
              help="Teachers to re-encode (default: every teacher storing that output); others are copied.")
@click.option("--json", "as_json", is_flag=True, help="Print the measured error of every re-encoded array as JSON.")
def compact(store: str, out: str, features: str | None, featmap: str | None, teachers: tuple[str, ...],
            as_json: bool) -> None:
    """Write a smaller copy of a store: features and/or featmaps re-encoded by a lossy codec.

    Each re-encoded array records its codec, parameters (arrays beside it) and the reconstruction error
    measured over every stored vector (mean cosine, relative MSE, worst-decile cosine); `ktc info` shows
    them and `ktc train` decodes transparently. Everything else is copied object by object.
    """
    from kt_cache.compact import compact_store
    from kt_cache.info import code_widths, folder_bytes

    path, records = compact_store(store, out, features, featmap, teachers)
    if as_json:
        click.echo(json.dumps({"store": str(path), "arrays": records}, indent=1))
        return
    for r in records:
        e = r["error"]
        click.echo(f"{r['teacher']}/{r['output']}: {r['name']} ({code_widths(r)}), mean cosine {e['mean_cosine']:.4f}, "
                   f"worst decile {e['worst_decile_cosine']:.4f}, relative MSE {e['rel_mse']:.4f} over "
                   f"{e['vectors']} vectors")
    click.echo(f"wrote {path} ({folder_bytes(path)} bytes)")


@click.command()
@click.argument("store")
def upgrade(store: str) -> None:
    """Convert the store folder STORE, written by an older ktc (format v1), to the format this ktc writes (v2),
    in place. Only metadata changes (docs/store-format.md, "Versions"): no chunk is re-encoded, and the integrity
    record keeps every chunk's entry. A store already in this format is left as it is."""
    from kt_cache.store.upgrade import upgrade_store

    result = upgrade_store(store)
    if result["from"] == result["to"]:
        click.echo(f"{result['store']}: already format v{result['to']}; nothing to do.")
        return
    click.echo(f"{result['store']}: upgraded format v{result['from']} -> v{result['to']} "
               f"({len(result['teachers'])} teacher(s) rewritten: {', '.join(result['teachers']) or 'none'}).")
