"""The pre-training pairs of a bootstrap: human pairs, raw web pairs, the pairs a round selected.

A pairs table has the columns :data:`PAIRS_SCHEMA_NAMES`: ``key``, ``image`` (bytes),
``captions`` (a list: a human image has several, a web or synthetic pair one) and ``source``
(``human``, ``web`` or ``synthetic``). :func:`write_pairs` writes one in a seeded random order.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from capfilt.stages.select import Selection

PAIRS_SCHEMA_NAMES = ("key", "image", "captions", "source")


def _pairs_table(keys: list[str], images: list[bytes], captions: list[list[str]], sources: list[str]) -> Any:
    import pyarrow as pa

    return pa.table(
        {
            "key": pa.array(keys, type=pa.string()),
            "image": pa.array(images, type=pa.binary()),
            "captions": pa.array(captions, type=pa.list_(pa.string())),
            "source": pa.array(sources, type=pa.string()),
        }
    )


def human_pairs(path: Path) -> Any:
    """Human rows (image + all reference captions), source ``human``."""
    import pyarrow.parquet as pq

    has_key = "key" in pq.read_schema(path).names
    data = pq.read_table(path, columns=(["key"] if has_key else []) + ["image", "captions"]).to_pydict()
    keys = [str(k) for k in data["key"]] if has_key else [f"human-{i}" for i in range(len(data["image"]))]
    captions = [[c for c in (caps or []) if c and c.strip()] for caps in data["captions"]]
    return _pairs_table(keys, data["image"], captions, ["human"] * len(keys))


def web_pairs(path: Path) -> Any:
    """Raw web rows (image + web text, unfiltered), source ``web``."""
    import pyarrow.parquet as pq

    data = pq.read_table(path, columns=["key", "image", "text"]).to_pydict()
    rows = [
        (k, i, t) for k, i, t in zip(data["key"], data["image"], data["text"], strict=True) if t and t.strip()
    ]
    return _pairs_table(
        [str(r[0]) for r in rows], [r[1] for r in rows], [[r[2]] for r in rows], ["web"] * len(rows)
    )


def selected_pairs(pipeline_dir: Path, rule: Selection) -> Any:
    """Pairs ``rule`` keeps from a pipeline run's samples, with their downloaded images.

    One row per kept text (a web text and a synthetic caption of the same image are two rows,
    as they are two pairs in BLIP's D): :func:`capfilt.rundir.read.kept_texts` of the samples
    re-selected by :meth:`capfilt.stages.select.Selection.apply`.
    """
    import pyarrow.parquet as pq

    from capfilt.rundir import committed_shards, images_path, samples_path
    from capfilt.rundir.read import kept_texts, member_key, scan_images_tar

    keys: list[str] = []
    images: list[bytes] = []
    captions: list[list[str]] = []
    sources: list[str] = []
    for shard in sorted(committed_shards(pipeline_dir)):
        samples = rule.apply(pq.read_table(samples_path(pipeline_dir, shard)))
        tar = images_path(pipeline_dir, shard)
        shard_images = (
            {member_key(name): data for name, _, data in scan_images_tar(tar)} if tar.is_file() else {}
        )
        for key, text, source, _ in kept_texts(samples):
            image = shard_images.get(key)
            if image is None:
                raise RuntimeError(f"{tar}: no image for kept sample {key!r}")
            keys.append(key)
            images.append(image)
            captions.append([text])
            sources.append(source)
    return _pairs_table(keys, images, captions, sources)


def write_pairs(table: Any, path: Path, *, seed: int) -> None:
    """A pre-training pairs table, rows in a seeded random order, written atomically.

    The loader shuffles row groups, then rows inside a row group (reads stay local at scale), so a
    table written source by source (all human captions, then the web pairs) would give batches of
    one source, and human captions written image by image would put ~13 images x 5 captions in a
    batch of 64. Shuffling once here makes every row group, and so every batch, a random mix.
    """
    import numpy as np
    import pyarrow.parquet as pq

    order = np.random.default_rng(seed).permutation(table.num_rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table.take(order), tmp, row_group_size=512)
    os.replace(tmp, path)


def count_sources(table: Any) -> dict[str, int]:
    """Rows per ``source``, sorted by source."""
    counts: dict[str, int] = {}
    for source in table.column("source").to_pylist():
        counts[source] = counts.get(source, 0) + 1
    return dict(sorted(counts.items()))
