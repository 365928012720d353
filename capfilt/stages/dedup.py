"""Dedup: exact (URL, image bytes) and near (perceptual hash) duplicates across a whole run.

Two parts, both Ray-free here (the pipeline decides where they run):

* :func:`add_phash` (a map step after download): ``phash``, the 64-bit DCT perceptual hash of
  every ok image as 16 hex digits (the bit order of the ``imagehash`` package's ``phash``).
  It survives re-encoding and resizing: the image is reduced to 32x32 grey levels, and each
  bit says whether one of the 8x8 lowest 2-D DCT frequencies is above their median.
* :func:`run_dedup` (after every shard is committed): marks duplicates in the committed
  shards. Only ok rows take part (a failed row is not a copy worth keeping, and marking an
  ok row as the copy of a failed download would lose it). Two ok rows are linked when they
  have the same URL (``dedup.url``), the same ``sha256`` (``dedup.sha256``) or phashes at
  Hamming distance <= ``dedup.near_distance``; a duplicate group is a connected component of
  these links, and every member but the smallest key gets ``duplicate_of`` = that key.

How the links are found without a table of all hashes in one process: each row emits
tokens (``u:URL``, ``s:SHA256``, ``p:PHASH`` and, for near duplicates, the pigeonhole bands
``b<i>:BITS`` of its phash: two hashes within distance d agree exactly on at least one of
d + 1 disjoint bands), Ray Data groups rows by token across the cluster, and each group
emits its links (exact tokens: every member to the group's smallest key; band tokens: the
pairs whose full distance is <= d, one representative per distinct phash). The driver only
sees the links, i.e. keys of duplicates, and joins them with a union-find.

Marking after the shards were committed: each shard whose marks change is rewritten,
``dataset/`` first (without the duplicates' pairs unless ``dedup.keep_in_dataset``) and then
``samples/`` (with ``duplicate_of``), each atomically (temporary name + rename), samples last
as everywhere else. The marks are a pure function of the committed samples' key, url,
status, sha256 and phash, so a rerun (after a crash mid-pass, or after more shards were
committed) recomputes them and rewrites exactly the shards that differ; ``RUN/dedup.json``
records the finished pass, and a rerun over the same shards with the same config skips it.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from capfilt.rundir import SHARD_META_KEY, atomic_write, atomic_write_text
from capfilt.stages.select import object_array
from capfilt.stages.status import Status

Batch = dict[str, np.ndarray]

HASH_SIDE = 32
"""The image is reduced to HASH_SIDE x HASH_SIDE grey levels before the DCT."""
LOW_FREQ = 8
"""The LOW_FREQ x LOW_FREQ lowest DCT frequencies give the 64 bits."""
STATE_FILE = "dedup.json"
SHARDS_PER_PARTITION = 16
MAX_PARTITIONS = 200
DUPLICATE_COLUMN = "duplicate_of"


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix: ``M @ x`` is the DCT of a length-n vector."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_DCT = _dct_matrix(HASH_SIDE)


def phash(data: bytes) -> str:
    """The 64-bit DCT perceptual hash of encoded image bytes, as 16 lower-case hex digits."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.draft("L", (HASH_SIDE * 2, HASH_SIDE * 2))  # JPEG: decode at a reduced scale
        grey = image.convert("L").resize((HASH_SIDE, HASH_SIDE), Image.Resampling.LANCZOS)
        pixels = np.asarray(grey, dtype=np.float64)
    low = (_DCT @ pixels @ _DCT.T)[:LOW_FREQ, :LOW_FREQ]
    bits = (low > np.median(low)).flatten()
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


def hamming(a: str, b: str) -> int:
    """Number of differing bits of two hex hashes."""
    return (int(a, 16) ^ int(b, 16)).bit_count()


def add_phash(batch: Mapping[str, np.ndarray]) -> Batch:
    """Add ``phash`` (hex string; "" for rows that are not ok or whose bytes do not decode).

    "" rather than None, as for ``sha256``: Ray Data turns an all-None object column into floats.
    """
    out = dict(batch)
    values: list[str] = []
    for status, image in zip(batch["status"], batch["image"], strict=True):
        value = ""
        if str(status) == Status.ok and image is not None and len(image):
            try:
                value = phash(bytes(image))
            except Exception:  # noqa: BLE001 - the caption/filter stages report undecodable images
                value = ""
        values.append(value)
    out["phash"] = object_array(values)
    return out


# --------------------------------------------------------------------------- links


def bands(value: str, distance: int) -> list[str]:
    """The ``distance + 1`` disjoint bit bands of a 64-bit hash, as ``b<i>:<bits>`` tokens."""
    bits = f"{int(value, 16):064b}"
    count = distance + 1
    edges = [round(i * 64 / count) for i in range(count + 1)]
    return [f"b{i}:{bits[edges[i] : edges[i + 1]]}" for i in range(count)]


def row_tokens(row: Mapping[str, Any], *, url: bool, sha256: bool, near_distance: int | None) -> list[str]:
    """The grouping tokens of one samples row (none for a row that is not ok)."""
    if row.get("status") != Status.ok:
        return []
    tokens = []
    if url and row.get("url"):
        tokens.append(f"u:{row['url']}")
    if sha256 and row.get("sha256"):
        tokens.append(f"s:{row['sha256']}")
    value = row.get("phash")
    if near_distance is not None and value:
        tokens.append(f"p:{value}")
        if near_distance > 0:
            tokens.extend(bands(value, near_distance))
    return tokens


def group_links(
    token: str, keys: Sequence[str], hashes: Sequence[str | None], distance: int
) -> list[tuple[str, str]]:
    """Links ``(smaller key, larger key)`` within one token group.

    Exact tokens link every member to the group's smallest key. A band token only says the
    hashes share one band: pairs of distinct hashes are checked at full length, one
    representative (the smallest key) per distinct hash, since equal hashes are already
    linked by their ``p:`` token.
    """
    if len(keys) < 2:
        return []
    if not token.startswith("b"):
        first = min(keys)
        return [(first, k) for k in sorted(set(keys)) if k != first]
    reps: dict[str, str] = {}
    for key, value in zip(keys, hashes, strict=True):
        if value and (value not in reps or key < reps[value]):
            reps[value] = key
    distinct = sorted(reps)
    if len(distinct) < 2:
        return []
    ints = np.array([int(v, 16) for v in distinct], dtype=np.uint64)
    links = []
    for i in range(len(distinct) - 1):
        xor = np.bitwise_xor(ints[i], ints[i + 1 :])
        counts = np.unpackbits(xor.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)
        for j in np.flatnonzero(counts <= distance):
            a, b = reps[distinct[i]], reps[distinct[i + 1 + int(j)]]
            links.append((min(a, b), max(a, b)))
    return links


def duplicate_marks(links: Iterable[tuple[str, str]]) -> dict[str, str]:
    """``{key: smallest key of its connected component}`` for every linked key but the smallest."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for a, b in links:
        ra, rb = find(a), find(b)
        if ra != rb:
            small, large = (ra, rb) if ra < rb else (rb, ra)
            parent[large] = small
            parent.setdefault(small, small)
    return {k: find(k) for k in parent if find(k) != k}


# --------------------------------------------------------------------------- the pass

SAMPLE_COLUMNS = ("key", "url", "status", "sha256", "phash")


def _tokens_batch(batch: Mapping[str, np.ndarray], *, url: bool, sha256: bool, near: int | None) -> Batch:
    """Ray Data flat map: one (token, key, phash) row per token of each samples row."""
    names = [n for n in SAMPLE_COLUMNS if n in batch]
    out: dict[str, list[Any]] = {"token": [], "key": [], "phash": []}
    for values in zip(*(batch[n] for n in names), strict=True):
        row = dict(zip(names, values, strict=True))
        for token in row_tokens(row, url=url, sha256=sha256, near_distance=near):
            out["token"].append(token)
            out["key"].append(str(row["key"]))
            out["phash"].append(row.get("phash"))
    return {k: object_array(v) for k, v in out.items()}


def _links_group(group: Mapping[str, np.ndarray], *, distance: int) -> Batch:
    """Ray Data map_groups: the links of one token group."""
    if len(group["token"]) == 0:
        return {"a": object_array([]), "b": object_array([])}
    links = group_links(
        str(group["token"][0]), [str(k) for k in group["key"]], list(group["phash"]), distance
    )
    return {"a": object_array([a for a, _ in links]), "b": object_array([b for _, b in links])}


def find_links(files: Sequence[Path], cfg: Any) -> list[tuple[str, str]]:
    """All duplicate links of the committed samples ``files``, found by a Ray Data groupby."""
    import ray

    present = set(pq.read_schema(files[0]).names)
    columns = [c for c in SAMPLE_COLUMNS if c in present or c == "key"]
    ds = ray.data.read_parquet([str(f) for f in files], columns=columns)
    near = cfg.near_distance if "phash" in present else None
    ds = ds.map_batches(_tokens_batch, fn_kwargs={"url": cfg.url, "sha256": cfg.sha256, "near": near})
    # A partition per ~SHARDS_PER_PARTITION committed shards (Ray's default of 200 partitions
    # is far too many for a small run and about right for a large one).
    partitions = max(1, min(MAX_PARTITIONS, len(files) // SHARDS_PER_PARTITION))
    links = ds.groupby("token", num_partitions=partitions).map_groups(
        _links_group, fn_kwargs={"distance": near or 0}
    )
    return sorted({(str(r["a"]), str(r["b"])) for r in links.iter_rows()})


def mark_shard(
    run_dir: Path, shard: int, marks: Mapping[str, str], *, keep_in_dataset: bool, image_ext: str
) -> bool:
    """Write ``duplicate_of`` into a committed shard and drop the duplicates' pairs from dataset/.

    Returns whether the shard changed (a shard already carrying these marks is left alone).
    """
    from capfilt.stages import write

    samples = pq.read_table(write.samples_path(run_dir, shard))
    keys = samples.column("key").to_pylist()
    wanted = pa.array([marks.get(k) for k in keys], type=pa.string())
    if DUPLICATE_COLUMN in samples.column_names:
        if samples.column(DUPLICATE_COLUMN).combine_chunks().equals(wanted):
            return False
        samples = samples.set_column(samples.column_names.index(DUPLICATE_COLUMN), DUPLICATE_COLUMN, wanted)
    else:
        samples = samples.append_column(DUPLICATE_COLUMN, wanted)
    dataset = write.dataset_table(samples, shard=shard, image_ext=image_ext)
    if not keep_in_dataset:
        duplicates = {k for k in keys if k in marks}
        keep = [k not in duplicates for k in dataset.column("key").to_pylist()]
        dataset = dataset.filter(pa.array(keep, type=pa.bool_()))
    buffer = io.BytesIO()
    pq.write_table(dataset, buffer)
    data = buffer.getvalue()
    atomic_write(write.dataset_path(run_dir, shard), lambda stream: stream.write(data))
    # The commit's record (checksums for verified resume) follows the rewritten dataset file.
    meta = dict(samples.schema.metadata or {})  # bytes keys, as SHARD_META_KEY
    if SHARD_META_KEY in meta:
        record = json.loads(meta[SHARD_META_KEY])
        record["dataset_sha256"] = hashlib.sha256(data).hexdigest()
        meta[SHARD_META_KEY] = json.dumps(record, sort_keys=True)
        samples = samples.replace_schema_metadata(meta)
    atomic_write(write.samples_path(run_dir, shard), lambda stream: pq.write_table(samples, stream))
    return True


def _finished_state(run_dir: Path, cfg: Any) -> dict[str, Any] | None:
    """``dedup.json`` when it records a pass over the committed shards with this config, else None."""
    from capfilt.stages import write

    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        return None
    state = json.loads(path.read_text(encoding="utf-8"))
    shards = sorted(write.committed_shards(run_dir))
    return (
        state
        if state.get("config") == cfg.model_dump(mode="json") and state.get("shards") == shards
        else None
    )


def dedup_done(run_dir: Path, cfg: Any) -> bool:
    """Whether the dedup pass over the committed shards with this ``dedup`` config is finished."""
    return _finished_state(run_dir, cfg) is not None


def run_dedup(run_dir: Path, cfg: Any, *, image_ext: str = "jpg") -> dict[str, Any]:
    """Mark duplicates across every committed shard of ``run_dir`` (Ray must be initialised).

    ``cfg`` is the ``dedup`` config section. Writes ``RUN/dedup.json`` (config, shards, marked
    rows, groups) and returns it with ``shards_rewritten`` (this call's work, not written).
    """
    import ray

    from capfilt.stages import write

    run_dir = Path(run_dir)
    shards = sorted(write.committed_shards(run_dir))
    settings = cfg.model_dump(mode="json")
    state_path = run_dir / STATE_FILE
    finished = _finished_state(run_dir, cfg)
    if finished is not None:
        return {**finished, "shards_rewritten": 0}
    files = [(s, write.samples_path(run_dir, s)) for s in shards]
    links = find_links([p for _, p in files], cfg) if files else []
    marks = duplicate_marks(links)
    # One copy of the marks in the object store; each shard task looks up its own keys.
    marks_ref = ray.put(marks)
    rewrite = ray.remote(num_cpus=0.25)(mark_shard)
    pending = [
        rewrite.remote(run_dir, shard, marks_ref, keep_in_dataset=cfg.keep_in_dataset, image_ext=image_ext)
        for shard in shards
    ]
    changed = ray.get(pending)
    state = {
        "config": settings,
        "shards": shards,
        "duplicates": len(marks),
        "groups": len(set(marks.values())),
    }
    atomic_write_text(state_path, json.dumps(state, indent=2) + "\n")
    return {**state, "shards_rewritten": sum(bool(c) for c in changed)}
