"""Dedup's pure parts: perceptual hash, grouping tokens, links, components, marking a shard."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from support import scene

from capfilt.stages import write
from capfilt.stages.dedup import (
    add_phash,
    bands,
    duplicate_marks,
    group_links,
    hamming,
    mark_shard,
    phash,
    row_tokens,
)
from capfilt.stages.select import object_array


def encode(image: Image.Image, fmt: str = "JPEG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def test_phash_survives_reencoding_and_resizing_but_tells_pictures_apart() -> None:
    hashes = [phash(encode(scene(s), quality=95)) for s in range(8)]
    assert all(len(h) == 16 for h in hashes)
    for s, h in enumerate(hashes):
        original = scene(s)
        assert hamming(h, phash(encode(original, quality=40))) <= 4, "re-encoded at low quality"
        assert hamming(h, phash(encode(original.resize((160, 120)), quality=85))) <= 4, "resized to half"
        assert hamming(h, phash(encode(original.resize((640, 480)), "PNG"))) <= 4, "upscaled, other format"
    distances = [hamming(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1 :]]
    assert min(distances) > 10, distances


def test_add_phash_hashes_ok_rows_only() -> None:
    good = encode(scene(1))
    batch = {
        "status": object_array(["ok", "download_failed", "ok"]),
        "image": object_array([good, b"", b"not an image"]),
    }
    out = add_phash(batch)
    assert list(out["phash"]) == [phash(good), "", ""]


@pytest.mark.parametrize("distance", [1, 3, 4, 7])
def test_hashes_within_the_distance_share_a_band(distance: int) -> None:
    rng = random.Random(distance)
    for _ in range(200):
        value = rng.getrandbits(64)
        flipped = value
        for bit in rng.sample(range(64), rng.randint(0, distance)):
            flipped ^= 1 << bit
        a, b = f"{value:016x}", f"{flipped:016x}"
        assert set(bands(a, distance)) & set(bands(b, distance))
        assert len(bands(a, distance)) == distance + 1


def test_row_tokens_follow_the_config_and_skip_failed_rows() -> None:
    row = {"status": "ok", "url": "http://x/a.jpg", "sha256": "ab", "phash": "00000000000000ff"}
    assert row_tokens(row, url=True, sha256=True, near_distance=None) == ["u:http://x/a.jpg", "s:ab"]
    tokens = row_tokens(row, url=False, sha256=False, near_distance=1)
    assert tokens == ["p:00000000000000ff", "b0:" + "0" * 32, "b1:" + "0" * 24 + "1" * 8]
    assert row_tokens({**row, "status": "download_failed"}, url=True, sha256=True, near_distance=4) == []


def test_group_links_exact_groups_link_to_the_smallest_key() -> None:
    assert group_links("s:ab", ["k3", "k1", "k2"], [None] * 3, 0) == [("k1", "k2"), ("k1", "k3")]
    assert group_links("u:x", ["k1"], [None], 0) == []


def test_group_links_band_groups_check_the_full_distance() -> None:
    near = "00000000000000ff"
    close = "00000000000000f0"  # 4 bits away
    far = "0f0f0f0f000000ff"  # 16 bits away from near
    links = group_links("b0:x", ["c", "a", "b", "d"], [close, near, far, near], 4)
    # d shares a's hash: equal hashes are linked by their p: token, not here.
    assert links == [("a", "c")]


def test_duplicate_marks_join_chains_to_the_smallest_key() -> None:
    marks = duplicate_marks([("k5", "k7"), ("k2", "k5"), ("k8", "k9"), ("k1", "k9")])
    assert marks == {"k5": "k2", "k7": "k2", "k8": "k1", "k9": "k1"}
    assert duplicate_marks([]) == {}


def test_mark_shard_marks_samples_drops_pairs_and_is_idempotent(tmp_path: Path) -> None:
    rows = pa.table(
        {
            "key": ["a", "b", "c"],
            "url": ["u1", "u2", "u3"],
            "web_text": ["one", "two", "three"],
            "status": ["ok", "ok", "ok"],
            "error": ["", "", ""],
            "image": pa.array([encode(scene(i)) for i in range(3)], type=pa.binary()),
            "synthetic_texts": [["s1"], ["s2"], ["s3"]],
            "web_itm": [0.9, 0.9, 0.9],
            "synthetic_itm": [[0.8], [0.8], [0.8]],
            "web_kept": [True, True, True],
            "synthetic_kept": [[True], [True], [True]],
        }
    )
    write.write_shard(tmp_path, 0, rows)
    assert mark_shard(tmp_path, 0, {"b": "a", "zz": "a"}, keep_in_dataset=False, image_ext="jpg")
    samples = pq.read_table(write.samples_path(tmp_path, 0))
    assert samples.num_rows == 3, "duplicates are never dropped from samples/"
    assert samples.column("duplicate_of").to_pylist() == [None, "a", None]
    dataset = pq.read_table(write.dataset_path(tmp_path, 0))
    assert sorted(set(dataset.column("key").to_pylist())) == ["a", "c"]
    assert dataset.num_rows == 4
    before = write.samples_path(tmp_path, 0).read_bytes()
    assert not mark_shard(tmp_path, 0, {"b": "a"}, keep_in_dataset=False, image_ext="jpg")
    assert write.samples_path(tmp_path, 0).read_bytes() == before
    # Marks that go away (another config) are removed again; keep_in_dataset keeps the pairs.
    assert mark_shard(tmp_path, 0, {"c": "a"}, keep_in_dataset=True, image_ext="jpg")
    samples = pq.read_table(write.samples_path(tmp_path, 0))
    assert samples.column("duplicate_of").to_pylist() == [None, None, "a"]
    assert pq.read_table(write.dataset_path(tmp_path, 0)).num_rows == 6


def test_dedup_done_only_for_the_same_config_and_shards(tmp_path: Path) -> None:
    import json

    from capfilt.config import DedupConfig
    from capfilt.stages.dedup import STATE_FILE, dedup_done

    cfg = DedupConfig(enabled=True)
    assert not dedup_done(tmp_path, cfg)
    for shard in (0, 1):
        write.samples_path(tmp_path, shard).parent.mkdir(parents=True, exist_ok=True)
        write.samples_path(tmp_path, shard).write_bytes(b"")
    state = {"config": cfg.model_dump(mode="json"), "shards": [0, 1], "duplicates": 0, "groups": 0}
    (tmp_path / STATE_FILE).write_text(json.dumps(state))
    assert dedup_done(tmp_path, cfg)
    assert not dedup_done(tmp_path, DedupConfig(enabled=True, near_distance=2))
    write.samples_path(tmp_path, 2).write_bytes(b"")  # a resumed run committed another shard
    assert not dedup_done(tmp_path, cfg)
