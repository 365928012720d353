"""The synthetic world: determinism, truthful captions, exact noise ground truth, the attribute check."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capfilt.errors import UserError
from capfilt.synth import (
    COLORS,
    SHAPES,
    Scene,
    SceneObject,
    all_words,
    attribute_accuracy,
    caption_pairs,
    check_caption,
    human_captions,
    junk_text,
    make_corpus,
    sample_scene,
    url_list,
    web_text,
    wrong_attribute_scene,
)

WEB, HUMAN, TEST = 150, 24, 12


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("corpus")
    summary = make_corpus(
        out, images=WEB, seed=7, human_images=HUMAN, test_images=TEST, workers=1, progress=False
    )
    return out, summary


def _rows(out: Path, split: str) -> list[dict]:
    return pq.read_table(out / f"{split}.parquet").to_pylist()


def _obj(color: str, shape: str, *, position: str = "center", x: float = 0.5, y: float = 0.5) -> SceneObject:
    return SceneObject(shape=shape, color=color, size="medium", position=position, x=x, y=y, angle=0.0)


# ---- layout -----------------------------------------------------------------------------------------


def test_layout_counts_and_columns(corpus: tuple[Path, dict]) -> None:
    out, summary = corpus
    assert summary["web"]["images"] == WEB and summary["human"]["images"] == HUMAN
    assert summary["test"]["images"] == TEST
    assert json.loads((out / "corpus.json").read_text())["web"] == summary["web"]
    web = pq.read_table(out / "web.parquet")
    assert web.column_names == [
        "key",
        "image_path",
        "image",
        "text",
        "noise_type",
        "noisy",
        "source_key",
        "objects",
        "background",
    ]
    human = pq.read_table(out / "human.parquet")
    assert human.column_names == ["key", "image_path", "image", "captions", "objects", "background"]
    assert pq.read_table(out / "test.parquet").column_names == human.column_names
    assert web.num_rows == WEB and human.num_rows == HUMAN
    keys = web.column("key").to_pylist() + human.column("key").to_pylist()
    assert len(set(keys)) == len(keys)


def test_images_decode_at_size_and_match_files(corpus: tuple[Path, dict]) -> None:
    out, _ = corpus
    for split in ("web", "human", "test"):
        rows = _rows(out, split)
        assert len(list((out / "images" / split).glob("*.jpg"))) == len(rows)
        for row in rows:
            assert (out / row["image_path"]).read_bytes() == row["image"]
            image = Image.open(io.BytesIO(row["image"]))
            assert (image.format, image.size, image.mode) == ("JPEG", (96, 96), "RGB")


def test_objects_are_drawn_in_their_colour_where_the_truth_says(corpus: tuple[Path, dict]) -> None:
    out, _ = corpus
    checked = 0
    for row in _rows(out, "human") + _rows(out, "test"):
        pixels = np.asarray(Image.open(io.BytesIO(row["image"])), dtype=np.float32)
        for obj in json.loads(row["objects"]):
            cx, cy = round(obj["x"] * 96), round(obj["y"] * 96)
            patch = pixels[cy - 1 : cy + 2, cx - 1 : cx + 2].reshape(-1, 3).mean(0)
            distance = float(np.linalg.norm(patch - np.array(COLORS[obj["color"]])))
            assert distance < 60, (row["key"], obj, patch)
            checked += 1
    assert checked >= HUMAN + TEST


def test_other_sizes(tmp_path: Path) -> None:
    make_corpus(tmp_path, images=3, seed=1, size=64, human_images=1, test_images=1, progress=False)
    assert Image.open(tmp_path / "images" / "web" / "web-000002.jpg").size == (64, 64)


def test_default_split_sizes(tmp_path: Path) -> None:
    summary = make_corpus(tmp_path, images=6, seed=0, test_images=2, progress=False)
    assert summary["human"]["images"] == 2  # round(6 / 3)
    defaults = make_corpus(tmp_path / "d", images=3, seed=0, human_fraction=0, progress=False)
    assert defaults["human"]["images"] == 0 and defaults["test"]["images"] == 100


# ---- determinism ------------------------------------------------------------------------------------


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_whatever_the_workers(tmp_path: Path) -> None:
    kwargs = dict(images=20, seed=3, human_images=4, test_images=3, progress=False)
    make_corpus(tmp_path / "a", workers=1, **kwargs)
    make_corpus(tmp_path / "b", workers=2, **kwargs)
    a, b = _snapshot(tmp_path / "a"), _snapshot(tmp_path / "b")
    assert len(a) == 20 + 4 + 3 + 5  # images + 4 parquet tables + corpus.json
    assert a == b
    make_corpus(tmp_path / "c", workers=1, **{**kwargs, "seed": 4})
    c = _snapshot(tmp_path / "c")
    assert a["images/web/web-000000.jpg"] != c["images/web/web-000000.jpg"]


def test_row_group_batching_does_not_change_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from capfilt import synth

    kwargs = dict(images=17, seed=9, human_images=5, test_images=0, progress=False, workers=1)
    make_corpus(tmp_path / "one", **kwargs)
    monkeypatch.setattr(synth, "_ROW_GROUP", 4)
    make_corpus(tmp_path / "many", **kwargs)
    for split in ("web", "human"):
        many = pq.ParquetFile(tmp_path / "many" / f"{split}.parquet")
        assert many.num_row_groups > 1
        assert many.read().to_pylist() == _rows(tmp_path / "one", split)
    assert pq.read_table(tmp_path / "many" / "test.parquet").num_rows == 0


def test_test_split_is_its_own_stream(tmp_path: Path) -> None:
    small = make_corpus(tmp_path / "s", images=2, seed=5, human_images=2, test_images=2, progress=False)
    large = make_corpus(tmp_path / "l", images=9, seed=5, human_images=5, test_images=2, progress=False)
    assert small and large
    test_small = _rows(tmp_path / "s", "test")
    assert [r["image"] for r in test_small] == [r["image"] for r in _rows(tmp_path / "l", "test")]
    human = _rows(tmp_path / "s", "human")
    assert {r["image"] for r in test_small}.isdisjoint({r["image"] for r in human})


# ---- captions ---------------------------------------------------------------------------------------


def test_every_reference_caption_passes_the_check(corpus: tuple[Path, dict]) -> None:
    out, _ = corpus
    for split in ("human", "test"):
        for row in _rows(out, split):
            assert len(row["captions"]) == 5 and len(set(row["captions"])) == 5
            for caption in row["captions"]:
                assert check_caption(caption, row["objects"]), (caption, row["objects"])


def test_many_scenes_captions_are_truthful_about_layout() -> None:
    """Relations and position words agree with the object coordinates, over many random scenes."""
    for index in range(400):
        rng = np.random.default_rng([11, index])
        scene = sample_scene(rng)
        by_pair = {(o.color, o.shape): o for o in scene.objects}
        for caption in human_captions(scene, rng, count=5):
            assert check_caption(caption, scene.objects), caption
            for relation, axis in ((" to the left of ", "x"), (" above ", "y")):
                if relation in caption:
                    before, after = caption.split(relation)
                    first, second = by_pair[caption_pairs(before)[-1]], by_pair[caption_pairs(after)[0]]
                    assert getattr(first, axis) < getattr(second, axis), caption
            if caption.startswith("from left to right"):
                xs = [by_pair[p].x for p in caption_pairs(caption)]
                assert xs == sorted(xs), caption
            if len(scene.objects) == 1:
                obj = scene.objects[0]
                words = set(re.findall(r"[a-z]+", caption))
                if words & {"left"}:
                    assert obj.column == 0 and obj.x < 1 / 3, caption
                if words & {"right"}:
                    assert obj.column == 2 and obj.x > 2 / 3, caption
                if words & {"top", "upper"}:
                    assert obj.row == 0 and obj.y < 1 / 3, caption
                if words & {"bottom", "lower"}:
                    assert obj.row == 2 and obj.y > 2 / 3, caption


def test_scenes_have_distinct_pairs_and_no_heavy_overlap() -> None:
    from capfilt.synth import SIZES

    counts = {1: 0, 2: 0, 3: 0}
    for index in range(400):
        scene = sample_scene(np.random.default_rng([12, index]))
        counts[len(scene.objects)] += 1
        assert len(scene.pairs()) == len(scene.objects)
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1 :]:
                assert np.hypot(a.x - b.x, a.y - b.y) >= SIZES[a.size] + SIZES[b.size] - 1e-3
    assert min(counts.values()) > 50


def test_all_words_covers_every_generated_text() -> None:
    vocab = set(all_words())
    assert set(SHAPES) | set(COLORS) <= vocab
    seen: set[str] = set()
    for index in range(300):
        rng = np.random.default_rng([13, index])
        scene = sample_scene(rng)
        texts = human_captions(scene, rng) + [
            web_text(scene, rng),
            junk_text(rng),
            web_text(wrong_attribute_scene(scene, rng), rng),
        ]
        for text in texts:
            seen.update(re.findall(r"[a-z]+|\d", text.lower()))
    assert seen <= vocab, sorted(seen - vocab)
    assert len(vocab - seen) < 0.2 * len(vocab)  # the list is not padded with words never produced


# ---- web noise --------------------------------------------------------------------------------------


def test_noise_share_and_types_are_exact(corpus: tuple[Path, dict]) -> None:
    out, summary = corpus
    rows = _rows(out, "web")
    types = [r["noise_type"] for r in rows]
    assert sum(r["noisy"] for r in rows) == round(0.4 * WEB) == summary["web"]["noisy"]
    assert all(r["noisy"] == (r["noise_type"] != "clean") for r in rows)
    for kind in ("mismatched", "junk", "wrong_attribute"):
        assert types.count(kind) == 20


@pytest.mark.parametrize("noise", [0.0, 1.0])
def test_noise_extremes(tmp_path: Path, noise: float) -> None:
    summary = make_corpus(
        tmp_path, images=9, seed=2, noise=noise, human_images=0, test_images=0, progress=False
    )
    assert summary["web"]["noisy"] == round(9 * noise)
    assert summary["web"]["noise_types"]["clean"] == 9 - round(9 * noise)


def test_noise_ground_truth_matches_the_check(corpus: tuple[Path, dict]) -> None:
    out, _ = corpus
    rows = _rows(out, "web")
    by_key = {r["key"]: r for r in rows}
    for row in rows:
        passes = check_caption(row["text"], row["objects"])
        kind = row["noise_type"]
        assert passes == (kind == "clean"), (kind, row["text"], row["objects"])
        if kind == "mismatched":
            donor = by_key[row["source_key"]]
            assert row["source_key"] != row["key"]
            assert check_caption(row["text"], donor["objects"])  # it is the other image's text
        elif kind == "junk":
            assert row["source_key"] is None and caption_pairs(row["text"]) == []
        else:
            assert row["source_key"] == row["key"]
        if kind == "wrong_attribute":
            truth = {(o["color"], o["shape"]) for o in json.loads(row["objects"])}
            stated = set(caption_pairs(row["text"]))
            assert len(truth - stated) == 1 and len(stated - truth) == 1  # exactly one attribute off


def test_url_list(corpus: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = corpus
    raw = pq.read_table(out / "urls.parquet")
    assert raw.column_names == ["path", "TEXT", "key", "noise_type", "noisy"]
    target = url_list(out, "http://127.0.0.1:8123/", tmp_path / "urls.parquet")
    table = pq.read_table(target)
    assert table.column_names[:2] == ["URL", "TEXT"] and table.num_rows == WEB
    first = table.slice(0, 1).to_pylist()[0]
    assert first["URL"] == f"http://127.0.0.1:8123/images/web/{first['key']}.jpg"
    assert table.column("TEXT").to_pylist() == [r["text"] for r in _rows(out, "web")]
    with pytest.raises(UserError, match="not found"):
        url_list(tmp_path / "nowhere", "http://127.0.0.1:1")
    with pytest.raises(UserError, match="no 'path' column"):
        url_list(tmp_path, "http://127.0.0.1:1")  # tmp_path/urls.parquet is a served list, not a corpus


def test_corpus_is_served_and_downloadable(corpus: tuple[Path, dict], tmp_path: Path) -> None:
    import urllib.request

    from capfilt.serve import serve_directory

    out, _ = corpus
    with serve_directory(out) as base_url:
        table = pq.read_table(url_list(out, base_url, tmp_path / "u.parquet")).slice(0, 3).to_pylist()
        for row in table:
            with urllib.request.urlopen(row["URL"], timeout=5) as response:
                assert response.read() == (out / "images" / "web" / f"{row['key']}.jpg").read_bytes()


# ---- the attribute check ----------------------------------------------------------------------------


RED_CIRCLE_BLUE_SQUARE = [_obj("red", "circle"), _obj("blue", "square")]


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("a red circle and a blue square", True),
        ("Two shapes: a small RED circle, and a big blue square on a striped background", True),
        ("a blue square to the left of a red circle", True),
        ("red circle | blue square | best wallpapers 2024", True),
        ("a red small circle and a blue square", True),  # colour within the binding window
        ("a blue circle and a red square", False),  # colours swapped between the shapes
        ("a red circle", False),  # one object missing
        ("a red circle and a square", False),  # colour missing
        ("a red circle and a blue star", False),  # wrong shape
        ("a red circle and a blue square and a green star", False),  # hallucinated object
        ("a red circle and a square that is blue", False),  # colour after the shape does not bind
        ("red and blue circle square", False),
        ("IMG_2041.jpg", False),
        ("", False),
    ],
)
def test_check_caption(caption: str, expected: bool) -> None:
    assert check_caption(caption, RED_CIRCLE_BLUE_SQUARE) is expected


def test_check_caption_inputs_and_modes() -> None:
    objects_json = json.dumps([o.to_dict() for o in RED_CIRCLE_BLUE_SQUARE])
    assert check_caption("a red circle and a blue square", objects_json)
    assert check_caption(
        "a red circle and a blue square",
        [{"color": "red", "shape": "circle"}, {"color": "blue", "shape": "square"}],
    )
    extra = "a red circle, a blue square and a green star"
    assert not check_caption(extra, RED_CIRCLE_BLUE_SQUARE)
    assert check_caption(extra, RED_CIRCLE_BLUE_SQUARE, strict=False)
    assert check_caption("two red circles", [_obj("red", "circle")])  # plurals count as the shape
    assert caption_pairs("a tiny red heart, a star") == [("red", "heart"), (None, "star")]


def test_attribute_accuracy() -> None:
    objects = [RED_CIRCLE_BLUE_SQUARE, [_obj("green", "star")], [_obj("black", "cross")]]
    captions = ["a red circle and a blue square", "a green star", "a white cross"]
    assert attribute_accuracy(captions, objects) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        attribute_accuracy(captions[:2], objects)
    with pytest.raises(ValueError):
        attribute_accuracy([], [])


def test_wrong_attribute_scene_changes_exactly_one_attribute() -> None:
    for index in range(200):
        rng = np.random.default_rng([14, index])
        scene = sample_scene(rng)
        wrong = wrong_attribute_scene(scene, rng)
        changed = [(a, b) for a, b in zip(scene.objects, wrong.objects, strict=True) if a != b]
        assert len(changed) == 1
        a, b = changed[0]
        assert (a.color != b.color) != (a.shape != b.shape)
        assert len(wrong.pairs()) == len(wrong.objects) and wrong.pairs() != scene.pairs()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"images": 0}, "images"),
        ({"images": 2, "noise": 1.5}, "noise"),
        ({"images": 2, "size": 8}, "size"),
        ({"images": 2, "test_images": -1}, "test_images"),
        ({"images": 2, "seed": -1}, "seed"),
    ],
)
def test_bad_arguments_are_user_errors(tmp_path: Path, kwargs: dict, field: str) -> None:
    with pytest.raises(UserError, match=field):
        make_corpus(tmp_path, progress=False, **{"seed": 0, **kwargs})
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="out"):
        make_corpus(tmp_path / "file", images=1, seed=0, progress=False)


def test_mismatch_falls_back_to_junk_when_no_other_image_differs() -> None:
    from capfilt.synth import _noisy_web_texts

    scene = sample_scene(np.random.default_rng(0))
    texts, labels, sources = _noisy_web_texts([scene, scene], ["a", "a"], seed=0, noise=1.0)
    # noise 1.0 over two rows assigns one mismatched and one junk; the mismatch has no donor
    assert labels == ["junk", "junk"] and sources == [None, None]
    assert not any(caption_pairs(t) for t in texts)


def test_scene_json_round_trip() -> None:
    scene = sample_scene(np.random.default_rng(0))
    assert isinstance(scene, Scene)
    restored = [SceneObject(**d) for d in json.loads(scene.objects_json())]
    assert tuple(restored) == scene.objects


# ---- worlds -----------------------------------------------------------------------------------------


def test_demo_world_draws_only_its_values_and_stays_checkable(tmp_path: Path) -> None:
    from capfilt.synth import WORLDS

    demo = WORLDS["demo"]
    summary = make_corpus(
        tmp_path, images=120, seed=3, human_images=10, test_images=10, size=32, world="demo", progress=False
    )
    assert (
        summary["world"] == "demo" and json.loads((tmp_path / "corpus.json").read_text())["world"] == "demo"
    )
    counts = set()
    for split in ("web", "human", "test"):
        for row in _rows(tmp_path, split):
            objects = json.loads(row["objects"])
            counts.add(len(objects))
            assert row["background"] == "plain"
            assert {(o["color"], o["shape"], o["size"]) for o in objects} <= {
                (c, s, z) for c in demo.colors for s in demo.shapes for z in demo.sizes
            }
            for caption in row.get("captions") or []:
                assert check_caption(caption, objects)
    assert counts == {1, 2}
    web = _rows(tmp_path, "web")
    assert {r["noise_type"] for r in web} == {"clean", "mismatched", "junk", "wrong_attribute"}
    for row in web:
        if row["noise_type"] == "wrong_attribute":  # the wrong value is one of the world's own
            stated = caption_pairs(row["text"])
            assert not check_caption(row["text"], row["objects"])
            assert {c for c, _ in stated} <= set(demo.colors) and {s for _, s in stated} <= set(demo.shapes)
        elif row["noise_type"] == "clean":
            assert check_caption(row["text"], row["objects"])


def test_standard_world_is_the_default_and_unknown_worlds_are_user_errors(tmp_path: Path) -> None:
    for index in range(20):
        assert sample_scene(np.random.default_rng([5, index])) == sample_scene(
            np.random.default_rng([5, index]), "standard"
        )
    with pytest.raises(UserError, match="world"):
        make_corpus(tmp_path, images=2, seed=0, world="nope", progress=False)
    from capfilt.synth import World

    with pytest.raises(ValueError, match="unknown values"):
        World(
            name="x",
            shapes=("blob",),
            colors=("red",),
            sizes=("large",),
            backgrounds=("plain",),
            object_counts=((1, 1.0),),
            description="",
        )
