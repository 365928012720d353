"""Hugging Face checkpoints in every hub layout, revision pins and what a hub download fetches.

Tiny random BLIP models are saved offline (``support.save_hf_blip``) as a hub repo holds them:
single or sharded safetensors, single or sharded pytorch_model.bin. Nothing touches the network:
the hub client is replaced where a download is exercised.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support import HF_LAYOUTS, save_hf_blip

from capfilt.config import loads
from capfilt.errors import UserError
from capfilt.stages import caption
from model import hf
from model.hf import hub_files_to_fetch, load_any, load_state_dict, split_revision
from model.med import CheckpointError

FILTER_PARTS = ("vision_model.", "text_encoder.", "vision_proj.", "text_proj.", "itm_head.")


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    return {
        layout: save_hf_blip(root / layout, kind="filter", layout=layout, seed=3) for layout in HF_LAYOUTS
    }


def test_every_layout_holds_the_files_the_hub_would(layouts):
    names = {layout: sorted(p.name for p in d.iterdir()) for layout, d in layouts.items()}
    assert "model.safetensors" in names["safetensors"]
    assert "model.safetensors.index.json" in names["sharded-safetensors"]
    assert sum(n.endswith(".safetensors") for n in names["sharded-safetensors"]) > 1
    assert [n for n in names["bin"] if "model" in n] == ["pytorch_model.bin"]
    assert (
        sum(n.endswith(".bin") for n in names["sharded-bin"]) > 1
        and "pytorch_model.bin.index.json" in names["sharded-bin"]
    )
    assert not any(n.endswith(".safetensors") for n in names["bin"] + names["sharded-bin"])


def test_load_state_dict_gives_the_same_tensors_from_every_layout(layouts):
    reference = load_state_dict(layouts["safetensors"])
    assert len(reference) > 20
    for layout in HF_LAYOUTS[1:]:
        state = load_state_dict(layouts[layout])
        assert state.keys() == reference.keys(), layout
        assert all(torch.equal(state[k], reference[k]) for k in reference), layout


def test_every_layout_imports_as_a_filter_without_allow_pickle(layouts):
    reference, _ = load_any(layouts["safetensors"])
    for layout in HF_LAYOUTS[1:]:
        med, tokenizer = load_any(layouts[layout])  # .bin: torch.load(weights_only=True), no flag needed
        assert tokenizer is not None
        ours, theirs = med.state_dict(), reference.state_dict()
        imported = [k for k in theirs if k.startswith(FILTER_PARTS)]  # queues and LM head start random
        assert len(imported) > 20
        for name in imported:
            assert torch.equal(ours[name], theirs[name]), f"{layout}: {name}"


def test_hf_filter_dirs_use_blips_enc_token_for_itm_unless_told(layouts):
    med, _ = load_any(layouts["bin"])
    assert med.config.itm_use_enc_token is True  # BLIP fine-tunes and evaluates ITM with [ENC]
    med, _ = load_any(layouts["bin"], itm_use_enc_token=False)
    assert med.config.itm_use_enc_token is False


class Payload:
    """Not a tensor: weights_only unpickling refuses it."""


def test_a_bin_with_objects_needs_allow_pickle(layouts, tmp_path):
    d = tmp_path / "objects"
    d.mkdir()
    for f in layouts["safetensors"].iterdir():
        if f.name != "model.safetensors":
            (d / f.name).write_bytes(f.read_bytes())
    state = load_state_dict(layouts["safetensors"])
    torch.save({"model": state, "extra": Payload()}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only loading refuses it.*--allow-pickle"):
        load_state_dict(d)
    loaded = load_state_dict(d, allow_pickle=True)  # full unpickling, BLIP-style {"model": ...} unwrapped
    assert loaded.keys() == state.keys()


def test_a_broken_shard_index_is_a_clear_error(layouts, tmp_path):
    d = tmp_path / "broken"
    d.mkdir()
    for f in layouts["sharded-safetensors"].iterdir():
        if not f.name.startswith("model-00002"):
            (d / f.name).write_bytes(f.read_bytes())
    with pytest.raises(CheckpointError, match="shard model-00002-of-.*missing"):
        load_state_dict(d)
    (tmp_path / "none").mkdir()
    with pytest.raises(CheckpointError, match="no weights"):
        load_state_dict(tmp_path / "none")


@pytest.mark.parametrize(
    ("files", "weights"),
    [
        # Salesforce/blip-itm-large-coco's main branch: pickle weights only (and a TF file)
        (["config.json", "preprocessor_config.json", "pytorch_model.bin", "special_tokens_map.json",
          "tf_model.h5", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "README.md", ".gitattributes"],
         ["pytorch_model.bin"]),
        (["config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json"], ["model.safetensors"]),
        (["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
          "model-00002-of-00002.safetensors", "pytorch_model.bin", "onnx/model.onnx"],
         ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]),
        (["config.json", "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin",
          "pytorch_model-00002-of-00002.bin", "flax_model.msgpack"],
         ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]),
    ],
)  # fmt: skip
def test_hub_download_fetches_configs_tokenizer_and_one_weight_format(files, weights):
    chosen = hub_files_to_fetch(files)
    weight_files = [f for f in chosen if f.endswith((".bin", ".safetensors"))]
    assert weight_files == weights
    assert "config.json" in chosen and not any(
        f.endswith((".h5", ".msgpack", ".onnx", ".md")) for f in chosen
    )
    if "tokenizer.json" in files:
        assert "tokenizer.json" in chosen
    if "vocab.txt" in files:
        assert {"vocab.txt", "tokenizer_config.json", "special_tokens_map.json"} <= set(chosen)


def test_a_repo_without_weights_is_refused():
    with pytest.raises(CheckpointError, match="no weights"):
        hub_files_to_fetch(["config.json", "tf_model.h5"])


def test_split_revision():
    assert split_revision("Salesforce/blip-itm-large-coco") == ("Salesforce/blip-itm-large-coco", None)
    assert split_revision("org/name@refs/pr/5") == ("org/name", "refs/pr/5")
    assert split_revision("org/name@3f2a9c1") == ("org/name", "3f2a9c1")
    with pytest.raises(CheckpointError):
        split_revision("not a hub id")


def test_download_from_hub_pins_the_revision_and_lists_before_fetching(monkeypatch, tmp_path):
    calls = {}

    class Api:
        def list_repo_files(self, repo_id, revision=None):
            calls["list"] = (repo_id, revision)
            return ["config.json", "pytorch_model.bin", "tf_model.h5", "vocab.txt"]

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls["download"] = (repo_id, revision, sorted(allow_patterns))
        return str(tmp_path)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert caption.resolve_model("Salesforce/blip-itm-large-coco@v1.0") == tmp_path
    assert calls["list"] == ("Salesforce/blip-itm-large-coco", "v1.0")
    assert calls["download"] == (
        "Salesforce/blip-itm-large-coco",
        "v1.0",
        ["config.json", "pytorch_model.bin", "vocab.txt"],
    )


def test_download_errors_are_one_line(monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("network unreachable\nsecond line")

    monkeypatch.setattr(hf, "download_from_hub", hf.download_from_hub)
    import huggingface_hub

    class Api:
        list_repo_files = fail

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(UserError) as err:
        caption.resolve_model("org/missing-model")
    assert "org/missing-model" in str(err.value) and "\n" not in str(err.value)


def test_revision_in_config_and_in_the_model_spec(tmp_path):
    cfg = loads("input: {path: x}\nfilter: {model: Salesforce/blip-itm-large-coco, revision: refs/pr/3}\n")
    assert cfg.filter.model_ids == ["Salesforce/blip-itm-large-coco@refs/pr/3"]
    assert caption.is_hub_id("Salesforce/blip-itm-large-coco@refs/pr/3")
    with pytest.raises(UserError, match="filter: give the revision either"):
        loads("input: {path: x}\nfilter: {model: org/a@v1, revision: v2}\n")
    with pytest.raises(UserError, match="filter: revision applies to model"):
        loads("input: {path: x}\nfilter: {models: [org/a, org/b], revision: v2}\n")
    local = tmp_path / "ckpt"
    local.mkdir()
    assert not caption.is_hub_id(f"{local}@v1")
    with pytest.raises(UserError, match="only applies to hub ids"):
        caption.resolve_model(f"{local}@v1")
