"""Config loading: every failure is one UserError line naming the field; overrides; round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict

from capfilt import config
from capfilt.config import PipelineConfig, apply_overrides, dump, load, load_model, loads
from capfilt.errors import UserError

MINIMAL = "input: {path: urls.parquet}\n"
FULL = """\
input: {path: urls.parquet, format: parquet, url_col: URL, text_col: TEXT, keep_cols: [similarity]}
download: {image_size: 384, resize_mode: border, timeout_s: 10, retries: 1,
           max_bytes: 20000000, min_image_size: 0, user_agent_token: capfilt,
           disallowed_header_directives: [noai, noimageai, noindex, noimageindex]}
caption:  {model: Salesforce/blip-image-captioning-base, num_captions: 1, top_p: 0.9,
           max_length: 30, min_length: 5, prompt: "a picture of ", seed: 0,
           batch_size: 64, dtype: auto, num_gpus: 0, concurrency: 1}
filter:   {model: Salesforce/blip-itm-base-coco, threshold: 0.5, keep_web: true, keep_synthetic: 1,
           batch_size: 128, dtype: auto, num_gpus: 0, concurrency: 1}
output:   {dir: runs/laion, rows_per_shard: 10000}
ray:      {address: null}
"""


def write(tmp_path: Path, text: str, name: str = "pipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(text: str, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(UserError) as info:
        loads(text, overrides)
    message = str(info.value)
    assert "\n" not in message, "errors must be one line"
    return message


def test_design_example_loads_with_documented_defaults(tmp_path):
    cfg = load(write(tmp_path, FULL))
    assert cfg.caption is not None and cfg.caption.model_ids == ["Salesforce/blip-image-captioning-base"]
    assert cfg.caption.prompt == "a picture of "
    assert cfg.filter is not None and cfg.filter.threshold == 0.5
    assert cfg.input.keep_cols == ["similarity"]

    minimal = load(write(tmp_path, MINIMAL, "demo.yaml"))
    assert minimal.caption is None and minimal.filter is None  # download-only run
    assert minimal.output.dir == "runs/demo"  # named after the config file
    assert minimal.download.image_size == 384 and minimal.download.resize_mode == "keep_ratio"
    assert minimal.download.disallowed_header_directives == ["noai", "noimageai", "noindex", "noimageindex"]
    assert minimal.input.key_col is None and minimal.ray.address is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("input: [\n", "<string>:2:1: YAML syntax error"),
        ("input:\n  path: a\n   url_col: x\n", "<string>:3:"),
        ("input: {path: a}\ninput: {path: b}\n", "duplicate key 'input'"),
        ("- input\n", "expected a mapping of sections"),
        ("", "input: required field is missing"),
        ("input: {}\n", "input.path: required field is missing"),
        (MINIMAL + "caption: {model: m, top_q: 0.9}\n", "caption.top_q: unknown key (did you mean 'top_p'?)"),
        (MINIMAL + "captions: {model: m}\n", "captions: unknown key (did you mean 'caption'?)"),
        (
            MINIMAL + "caption: {model: m, top_p: abc}\n",
            "caption.top_p: input should be a valid number, got 'abc'",
        ),
        (MINIMAL + "caption: {model: m, top_p: 0}\n", "caption.top_p: input should be greater than 0, got 0"),
        (
            MINIMAL + "caption: {model: m, top_p: 1.5}\n",
            "caption.top_p: input should be less than or equal to 1",
        ),
        (MINIMAL + "caption: {model: m, num_captions: 0}\n", "caption.num_captions: input should be greater"),
        (
            MINIMAL + "caption: {model: m, min_length: 40}\n",
            "caption: min_length (40) must not exceed max_length",
        ),
        (MINIMAL + "caption: {num_captions: 2}\n", "caption: give model (one model) or models"),
        (MINIMAL + "caption: {model: a, models: [b]}\n", "caption: give either model or models"),
        (MINIMAL + "caption: {model: m, dtype: fp8}\n", "caption.dtype: input should be 'auto'"),
        (
            MINIMAL + "filter: {model: m, threshold: -0.1}\n",
            "filter.threshold: input should be greater than or equal to 0",
        ),
        (
            MINIMAL + "filter: {model: m, keep_web: maybe}\n",
            "filter.keep_web: input should be a valid boolean",
        ),
        (MINIMAL + "download: {resize_mode: stretch}\n", "download.resize_mode: input should be 'no'"),
        (MINIMAL + "download: {encode_quality: 101}\n", "encode_quality 101 is out of range for jpg"),
        (
            MINIMAL + "download: {threads: 0}\n",
            "download.threads: input should be greater than or equal to 1",
        ),
        (MINIMAL + "download: 5\n", "download: input should be a valid dictionary"),
        ("input: {path: a, format: xlsx}\n", "input.format: input should be 'parquet'"),
        ("input: {path: a, keep_cols: [status]}\n", "input.keep_cols: status would collide"),
        ("input: {path: a, keep_cols: [x, x]}\n", "input.keep_cols: x listed more than once"),
        (MINIMAL + "output: {rows_per_shard: 0}\n", "output.rows_per_shard: input should be greater"),
    ],
)
def test_each_error_class_names_the_field(text, expected):
    assert expected in error_of(text)


def test_several_errors_stay_on_one_line():
    message = error_of(MINIMAL + "caption: {model: m, top_p: 2, seed: -1}\n")
    assert "caption.top_p" in message and "caption.seed" in message


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(UserError, match="nope.yaml: config file not found"):
        load(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="is a directory"):
        load(tmp_path)


def test_overrides_set_parse_and_create_sections(tmp_path):
    path = write(tmp_path, FULL)
    cfg = load(
        path,
        [
            "caption.top_p=0.95",
            "output.dir=/tmp/x",
            "download.disallowed_header_directives=[NoAI]",
            "download.resize_mode=no",  # YAML 1.1 reads `no` as False; it still means the mode
            "filter=null",  # switch a stage off
            "input.key_col=id",
            "caption.num_captions=3",
            "caption.num_captions=4",  # later overrides win
        ],
    )
    assert cfg.caption is not None and cfg.caption.top_p == 0.95 and cfg.caption.num_captions == 4
    assert cfg.output.dir == "/tmp/x"
    assert cfg.download.disallowed_header_directives == ["noai"]
    assert cfg.download.resize_mode == "no"
    assert cfg.filter is None
    assert cfg.input.key_col == "id"
    # a stage absent from the file is created by overriding one of its keys
    on = loads(MINIMAL, ["caption.model=tiny", "output.dir=2024"])
    assert on.caption is not None and on.caption.model == "tiny"
    assert on.output.dir == "2024"  # numbers typed for a string field stay the text typed


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("caption.top_p", "--set caption.top_p: expected SECTION.KEY=VALUE"),
        ("=3", "expected SECTION.KEY=VALUE"),
        ("caption..top_p=1", "empty name"),
        ("captoin.top_p=0.9", "--set captoin.top_p=0.9: unknown section 'captoin' (did you mean 'caption'?)"),
        (
            "caption.top_p=abc",
            "--set caption.top_p=abc: caption.top_p: input should be a valid number, got 'abc'",
        ),
        ("caption.top_q=1", "--set caption.top_q=1: caption.top_q: unknown key"),
        ("input.path.x=1", "--set input.path.x=1: input.path is a value, not a section"),
        ("download.retries=[1", "cannot parse value"),
    ],
)
def test_bad_overrides(override, expected):
    assert expected in error_of(MINIMAL + "caption: {model: m}\n", (override,))


def test_file_errors_blame_the_file_and_override_errors_the_option(tmp_path):
    path = write(tmp_path, MINIMAL + "caption: {model: m, seed: -1}\n")
    with pytest.raises(UserError) as info:
        load(path, ["caption.top_p=7"])
    message = str(info.value)
    assert f"{path}: caption.seed" in message
    assert "--set caption.top_p=7: caption.top_p" in message


def test_apply_overrides_does_not_mutate_its_input():
    data = {"a": {"b": 1}}
    assert apply_overrides(data, ["a.b=2", "c.d.e=[1, x]"]) == {"a": {"b": 2}, "c": {"d": {"e": [1, "x"]}}}
    assert data == {"a": {"b": 1}}


def test_dump_round_trips(tmp_path):
    cfg = load(
        write(tmp_path, FULL), ["download.resize_mode=no", "caption.prompt=a photo of ", "ray.address=auto"]
    )
    text = dump(cfg)
    again = load(write(tmp_path, text, "config.yaml"))
    assert again == cfg
    assert isinstance(again, PipelineConfig)
    assert dump(again) == text


def test_load_model_is_generic_over_schemas(tmp_path):
    class Trainer(BaseModel):
        model_config = ConfigDict(extra="forbid")
        lr: float = 1e-4
        steps: int = 10

    path = write(tmp_path, "lr: 0.001\n")
    assert load_model(Trainer, path, ["steps=5"]) == Trainer(lr=0.001, steps=5)
    with pytest.raises(UserError, match=r"lrr: unknown key \(did you mean 'lr'\?\)"):
        load_model(Trainer, write(tmp_path, "lrr: 1\n", "t.yaml"))
    with pytest.raises(UserError, match="unknown section 'epochs'"):
        load_model(Trainer, path, ["epochs=1"])


def test_reserved_columns_cover_the_samples_contract():
    for column in ("key", "url", "web_text", "status", "error", "synthetic_texts", "web_itm", "web_kept"):
        assert column in config.RESERVED_COLUMNS
