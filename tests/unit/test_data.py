"""Training data: every source type reads, the stream is deterministic, weights and flips behave."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from model.data import (
    BLIP_MEAN,
    BLIP_STD,
    AugmentConfig,
    Collator,
    DataConfig,
    ImageTransform,
    MixedStream,
    SourceSpec,
    _Mixer,
    _random_resized_crop_box,
    build_loader,
    has_direction_words,
    image_id,
    load_source,
)
from model.tokenizer import train_tokenizer

COLORS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "white": (255, 255, 255)}


def image_bytes(color: str, fmt: str = "JPEG", size: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), COLORS[color]).save(buf, format=fmt)
    return buf.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / "00000.tar", "w") as tar:
        add_member(tar, "00000/k0.jpg", image_bytes("red"))
        add_member(tar, "00000/k0.txt", b"a red square")
        add_member(tar, "00000/k1.png", image_bytes("green", "PNG"))
        add_member(tar, "00000/k1.json", json.dumps({"caption": "a green square", "url": "x"}).encode())
        add_member(tar, "00000/k2.jpg", image_bytes("blue"))  # no caption: skipped
    with tarfile.open(root / "00001.tar", "w") as tar:
        add_member(tar, "k3.webp", image_bytes("blue", "WEBP"))
        add_member(tar, "k3.json", json.dumps({"text": "a  blue\nsquare"}).encode())


def mean_color(tensor: torch.Tensor) -> np.ndarray:
    mean, std = torch.tensor(BLIP_MEAN).view(3, 1, 1), torch.tensor(BLIP_STD).view(3, 1, 1)
    return ((tensor * std + mean) * 255).mean(dim=(1, 2)).numpy()


def decoded(source, index: int) -> tuple[int, int, int]:
    return Image.open(io.BytesIO(source.image_bytes(index))).convert("RGB").getpixel((5, 5))


@pytest.fixture(scope="module")
def tokenizer():
    words = "a picture of red green blue white square circle on the left right".split()
    return train_tokenizer([" ".join(words)] * 3, vocab_size=200)


def test_webdataset_shards(tmp_path: Path) -> None:
    write_shards(tmp_path / "shards")
    source = load_source(SourceSpec(path=str(tmp_path / "shards")))
    assert sorted(zip(source.keys, [t[0] for t in source.texts], strict=True)) == [
        ("k0", "a red square"), ("k1", "a green square"), ("k3", "a blue square")
    ]
    assert len(source.blocks) == 2
    for i, key in enumerate(source.keys):
        expected = {"k0": COLORS["red"], "k1": COLORS["green"], "k3": COLORS["blue"]}[key]
        assert np.allclose(decoded(source, i), expected, atol=12)
    single = load_source(SourceSpec(path=str(tmp_path / "shards" / "00001.tar"), format="webdataset"))
    assert single.keys == ["k3"]


def test_parquet_text_and_captions_and_hf_struct(tmp_path: Path) -> None:
    pq.write_table(pa.table({"key": ["a", "b", "c"], "image": [image_bytes("red"), image_bytes("green"), None],
                             "text": ["red one", "green one", "missing image"]}), tmp_path / "t.parquet",
                   row_group_size=2)
    source = load_source(SourceSpec(path=str(tmp_path / "t.parquet")))
    assert source.keys == ["a", "b", "c"] and source.blocks == [(0, 2), (2, 3)]
    assert np.allclose(decoded(source, 1), COLORS["green"], atol=12)
    with pytest.raises(ValueError, match="no image bytes"):
        source.image_bytes(2)

    captions = pa.table({"key": ["h0", "h1"], "image": [image_bytes("red"), image_bytes("blue")],
                         "captions": [["red 1", "red 2", ""], ["blue 1"]]})
    pq.write_table(captions, tmp_path / "human.parquet")
    sampled = load_source(SourceSpec(path=str(tmp_path / "human.parquet")))
    assert sampled.texts == [["red 1", "red 2"], ["blue 1"]]  # empty captions dropped
    expanded = load_source(SourceSpec(path=str(tmp_path / "human.parquet"), captions="expand"))
    assert expanded.keys == ["h0", "h0", "h1"] and expanded.texts == [["red 1"], ["red 2"], ["blue 1"]]

    hf = pa.table({"image": [{"bytes": image_bytes("blue"), "path": None}], "text": ["blue"]})
    (tmp_path / "hf").mkdir()
    pq.write_table(hf, tmp_path / "hf" / "x.parquet")
    hf_source = load_source(SourceSpec(path=str(tmp_path / "hf")))
    assert hf_source.keys == ["x:0:0"]
    assert np.allclose(decoded(hf_source, 0), COLORS["blue"], atol=12)

    pq.write_table(pa.table({"image": [image_bytes("red")]}), tmp_path / "notext.parquet")
    with pytest.raises(ValueError, match="'text' or 'captions'"):
        load_source(SourceSpec(path=str(tmp_path / "notext.parquet")))


def test_run_directory_with_bytes_and_with_shard_references(tmp_path: Path) -> None:
    inline = tmp_path / "run1"
    (inline / "dataset").mkdir(parents=True)
    pq.write_table(pa.table({"key": ["k0", "k0"], "text": ["web text", "synthetic text"], "source": ["web", "synthetic"],
                             "itm": [0.9, 0.8], "image": [image_bytes("red")] * 2}), inline / "dataset" / "part-0.parquet")
    source = load_source(SourceSpec(path=str(inline)))
    assert source.keys == ["k0", "k0"] and [t[0] for t in source.texts] == ["web text", "synthetic text"]

    referenced = tmp_path / "run2"
    write_shards(referenced / "images")
    (referenced / "dataset").mkdir()
    pq.write_table(pa.table({"key": ["k3", "k0", "k1"], "text": ["blue", "red", "green"], "source": ["web"] * 3,
                             "itm": [0.7] * 3, "shard": ["00001", "00000.tar", "images/00000.tar"]}),
                   referenced / "dataset" / "part-0.parquet")
    source = load_source(SourceSpec(path=str(referenced)))
    by_key = {k: source.texts[i][0] for i, k in enumerate(source.keys)}
    assert by_key == {"k0": "red", "k1": "green", "k3": "blue"}
    for i, key in enumerate(source.keys):
        assert np.allclose(decoded(source, i), COLORS[by_key[key]], atol=12)

    pq.write_table(pa.table({"key": ["zz"], "text": ["x"], "shard": ["00000"]}), referenced / "dataset" / "part-1.parquet")
    with pytest.raises(ValueError, match="'zz' has no image"):
        load_source(SourceSpec(path=str(referenced)))


def test_run_directory_in_capfilt_writer_layout(tmp_path: Path) -> None:
    """capfilt's writer records (image_tar relative to the run, image_member) and an int shard."""
    run = tmp_path / "run"
    (run / "images").mkdir(parents=True)
    with tarfile.open(run / "images" / "shard-00000.tar", "w") as tar:
        for key, color in (("k0", "red"), ("k1", "green")):
            add_member(tar, f"{key}.jpg", image_bytes(color))
            add_member(tar, f"{key}.json", json.dumps({"key": key, "caption": "web"}).encode())
    (run / "dataset").mkdir()
    table = pa.table({"key": ["k0", "k0", "k1"], "text": ["web red", "synthetic red", "green"],
                      "source": ["web", "synthetic", "web"], "itm": [0.9, 0.8, 0.7],
                      "shard": pa.array([0, 0, 0], pa.int32()),
                      "image_tar": ["images/shard-00000.tar"] * 3, "image_member": ["k0.jpg", "k0.jpg", "k1.jpg"]})
    pq.write_table(table, run / "dataset" / "shard-00000.parquet")
    source = load_source(SourceSpec(path=str(run)))
    assert source.keys == ["k0", "k0", "k1"] and source.texts[1] == ["synthetic red"]
    assert np.allclose(decoded(source, 0), COLORS["red"], atol=12)
    assert np.allclose(decoded(source, 2), COLORS["green"], atol=12)
    # Without the tar path columns, an int shard number resolves to images/shard-NNNNN.tar.
    pq.write_table(table.drop_columns(["image_tar", "image_member"]), run / "dataset" / "shard-00000.parquet")
    by_key = load_source(SourceSpec(path=str(run), format="run"))
    assert np.allclose(decoded(by_key, 2), COLORS["green"], atol=12)


def test_missing_path_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.parquet"):
        load_source(SourceSpec(path=str(tmp_path / "nowhere.parquet")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .parquet files"):
        load_source(SourceSpec(path=str(tmp_path / "empty"), format="parquet"))
    (tmp_path / "empty" / "a.jpg").write_bytes(image_bytes("red"))
    with pytest.raises(FileNotFoundError, match="no .tar shards, .parquet files or capfilt run"):
        load_source(SourceSpec(path=str(tmp_path / "empty")))


def test_mixing_weights_and_prefix_counts() -> None:
    mixer = _Mixer(weights=[3.0, 1.0, 0.0], seed=5)
    sources, occurrences = mixer.draw(0, 40_000)
    share = np.bincount(sources, minlength=3) / len(sources)
    assert share[0] == pytest.approx(0.75, abs=0.015) and share[2] == 0
    for s in range(2):  # each source's occurrences count 0, 1, 2, ... in stream order
        assert np.array_equal(occurrences[sources == s], np.arange((sources == s).sum()))
    # Any window drawn on its own (a resumed run, another worker) agrees with the whole.
    fresh = _Mixer(weights=[3.0, 1.0, 0.0], seed=5)
    part_s, part_o = fresh.draw(65_530, 100)  # straddles a chunk boundary
    full_s, full_o = _Mixer(weights=[3, 1, 0], seed=5).draw(0, 65_630)
    assert np.array_equal(part_s, full_s[65_530:]) and np.array_equal(part_o, full_o[65_530:])
    with pytest.raises(ValueError, match="weights"):
        _Mixer(weights=[0.0, 0.0], seed=0)


def make_parquet_source(path: Path, n: int) -> None:
    names = list(COLORS)
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(n)],
                             "image": [image_bytes(names[i % 4]) for i in range(n)],
                             "text": [f"a {names[i % 4]} square" for i in range(n)]}), path, row_group_size=4)


def test_stream_is_deterministic_across_workers_and_resume(tmp_path: Path, tokenizer) -> None:
    make_parquet_source(tmp_path / "a.parquet", 10)
    write_shards(tmp_path / "shards")
    config = DataConfig(sources=[SourceSpec(path=str(tmp_path / "a.parquet"), weight=2.0),
                                 SourceSpec(path=str(tmp_path / "shards"))],
                        batch_size=4, image_size=16, seed=3)

    def take(loader, n):
        out = []
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                return out

    # One set of sources shared by every loader: the in-process loader opens the tar files first,
    # then forked workers read the same sources (they must not share descriptors or offsets).
    sources = [load_source(spec) for spec in config.sources]
    base = take(build_loader(config, tokenizer=tokenizer, sources=sources), 5)
    config.num_workers = 2
    workers = take(build_loader(config, tokenizer=tokenizer, sources=sources), 5)
    config.num_workers = 0
    resumed = take(build_loader(config, tokenizer=tokenizer, start=3), 2)
    for a, b in zip(base, workers, strict=True):
        for key in ("pixel_values", "input_ids", "image_ids"):
            assert torch.equal(a[key], b[key])
    for a, b in zip(base[3:], resumed, strict=True):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["input_ids"], b["input_ids"])
    # Rank 1 of 2 reads the odd global batches.
    rank1 = take(build_loader(config, tokenizer=tokenizer, rank=1, world_size=2), 2)
    assert torch.equal(rank1[0]["image_ids"], base[1]["image_ids"])
    assert torch.equal(rank1[1]["image_ids"], base[3]["image_ids"])
    assert base[0]["pixel_values"].shape == (4, 3, 16, 16)


def test_every_item_once_per_source_epoch(tmp_path: Path, tokenizer) -> None:
    make_parquet_source(tmp_path / "a.parquet", 12)
    source = load_source(SourceSpec(path=str(tmp_path / "a.parquet")))
    stream = MixedStream(sources=[source], weights=[1.0], batch_size=12,
                         transform=ImageTransform(image_size=8, train=False),
                         collate=Collator(tokenizer=tokenizer), seed=1)
    epoch0, epoch1 = stream.batch(0)["image_ids"], stream.batch(1)["image_ids"]
    expected = sorted(image_id(f"k{i}") for i in range(12))
    assert sorted(epoch0.tolist()) == expected and sorted(epoch1.tolist()) == expected
    assert epoch0.tolist() != epoch1.tolist()  # reshuffled per epoch


def test_caption_sampling_varies_per_visit(tmp_path: Path, tokenizer) -> None:
    pq.write_table(pa.table({"key": ["h"], "image": [image_bytes("red")],
                             "captions": [["red square", "red circle", "white square"]]}), tmp_path / "h.parquet")
    source = load_source(SourceSpec(path=str(tmp_path / "h.parquet")))
    stream = MixedStream(sources=[source], weights=[1.0], batch_size=30,
                         transform=ImageTransform(image_size=8, train=False),
                         collate=lambda samples: [text for _, text, _ in samples], seed=0)
    texts = stream.batch(0)
    assert set(texts) == {"red square", "red circle", "white square"}
    assert texts == stream.batch(0)


def test_flip_refused_for_left_right_captions() -> None:
    assert has_direction_words("a dog on the Left") and has_direction_words("rightmost cup")
    assert not has_direction_words("a bright light") and not has_direction_words("a red square")
    image = Image.new("RGB", (16, 16), COLORS["blue"])
    image.paste(COLORS["red"], (0, 0, 8, 16))  # red on the left half
    flip_only = AugmentConfig(random_resized_crop=False, randaugment_ops=0, hflip=True)
    transform = ImageTransform(image_size=16, train=True, augment=flip_only)

    def left_is_red(text: str, seed: int) -> bool:
        out = mean_color(transform(image, rng=np.random.default_rng(seed), text=text)[:, :, :8])
        return out[0] > out[2]

    assert all(left_is_red("the red square is on the left", s) for s in range(20))
    neutral = [left_is_red("a red and blue square", s) for s in range(20)]
    assert not all(neutral) and any(neutral)
    default = ImageTransform(image_size=16, train=True, augment=AugmentConfig(random_resized_crop=False,
                                                                              randaugment_ops=0))
    assert all(mean_color(default(image, rng=np.random.default_rng(s))[:, :, :8])[0] > 100 for s in range(20))


def test_transforms_shapes_normalisation_and_crop_bounds() -> None:
    white = Image.new("RGB", (40, 30), COLORS["white"])
    eval_t = ImageTransform(image_size=24, train=False)
    out = eval_t(white, rng=np.random.default_rng(0))
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    expected = (1 - torch.tensor(BLIP_MEAN)) / torch.tensor(BLIP_STD)
    torch.testing.assert_close(out.mean(dim=(1, 2)), expected, atol=1e-4, rtol=0)
    train_t = ImageTransform(image_size=24, train=True)
    a = train_t(Image.new("RGB", (40, 30), COLORS["green"]), rng=np.random.default_rng(4))
    b = train_t(Image.new("RGB", (40, 30), COLORS["green"]), rng=np.random.default_rng(4))
    assert a.shape == (3, 24, 24) and torch.equal(a, b)
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, right, bottom = _random_resized_crop_box(40, 30, (0.5, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= left < right <= 40 and 0 <= top < bottom <= 30
        assert (right - left) * (bottom - top) >= 0.45 * 1200
    assert _random_resized_crop_box(100, 10, (0.9, 1.0), (1.0, 1.0), rng) == (45, 0, 55, 10)  # fallback
    with pytest.raises(ValueError):
        ImageTransform(image_size=0, train=False)


def test_collator_prompt_and_image_ids(tokenizer) -> None:
    pixels = torch.zeros(3, 4, 4)
    plain = Collator(tokenizer=tokenizer, max_length=6)
    batch = plain([(pixels, "a red square on the left right", "k"), (pixels, "a blue circle", "k")])
    assert batch["prompt_length"] == 0 and batch["input_ids"].shape == (2, 6)  # truncated at max_length
    assert batch["image_ids"][0] == batch["image_ids"][1]  # same key: ITC positives
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 1, 1, 0]  # padded to the longest
    prompted = Collator(tokenizer=tokenizer, max_length=20, prompt="a picture of ")
    assert prompted.prompt_length == 4  # [CLS] a picture of
    ids = prompted([(pixels, "a red square", "x")])["input_ids"][0].tolist()
    assert tokenizer.decode(ids[1:4]) == "a picture of"
    assert tokenizer.decode(ids[4:7]) == "a red square"


def test_broken_image_falls_back_deterministically(tmp_path: Path, tokenizer) -> None:
    pq.write_table(pa.table({"key": ["bad", "good"], "image": [b"not an image", image_bytes("green")],
                             "text": ["broken", "green"]}), tmp_path / "b.parquet")
    source = load_source(SourceSpec(path=str(tmp_path / "b.parquet")))
    stream = MixedStream(sources=[source], weights=[1.0], batch_size=2,
                         transform=ImageTransform(image_size=8, train=False),
                         collate=lambda samples: samples, seed=0)
    with pytest.warns(UserWarning, match="cannot decode image 'bad'"):
        samples = stream.batch(0)
    assert [key for _, _, key in samples] == ["good", "good"]
