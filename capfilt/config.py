"""Pipeline configuration: one pydantic class per YAML section, and the loader.

The YAML keys are a user-facing contract (README "Pipeline YAML", docs/architecture.md), so every section
forbids unknown keys: a typo such as ``top_q`` must fail loudly rather than silently run
with the default. Every failure of :func:`load` is a :class:`capfilt.errors.UserError`
whose message is one line naming the file or ``--set`` option, the field, and what is
wrong, because the CLI prints it as-is and exits with code 2.

The loader is generic (:func:`load_model`, :func:`apply_overrides`) so that other schemas,
for example the bootstrap or training configs, reuse the same YAML + ``--set`` handling.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from capfilt.errors import UserError
from capfilt.rundir import CARRIED_COLUMNS, OPTIONAL_SAMPLE_COLUMNS, SAMPLE_SCHEMA

#: Columns the pipeline itself writes into ``samples/*.parquet`` or carries between stages
#: (``_row``, ``_shard``, ``image``), derived from the one definition in ``capfilt.rundir``;
#: ``input.keep_cols`` may not reuse these names, or a carried input column would silently
#: overwrite (or be overwritten by) a pipeline column. Names starting with one of
#: :data:`RESERVED_PREFIXES` are reserved as well.
RESERVED_COLUMNS: frozenset[str] = frozenset({*CARRIED_COLUMNS, *SAMPLE_SCHEMA.names, *OPTIONAL_SAMPLE_COLUMNS})

RESERVED_PREFIXES: tuple[str, ...] = ("_", "pixels_")
"""Internal column namespaces: ``_row``-style bookkeeping and the preprocess stage's pixels."""

Dtype = Literal["auto", "float32", "float16", "bfloat16"]

# --------------------------------------------------------------------------- bounds
#
# The same rules hold for every numeric field of every section (pipeline, train, bootstrap),
# enforced once by :class:`_Section`: a YAML boolean is never a number (``image_size: true``
# is not 1) and floats are finite (``.inf`` and ``.nan`` are refused). The limits that
# protect a run are the Annotated types below, so each lives in one place.

MAX_IMAGE_SIDE = 4096
"""Largest ``download.image_size``: a 4096 x 4096 RGB image is 50 MB decoded."""
MAX_RETRIES = 10
"""Most extra attempts per URL (``download.retries``)."""
MAX_TIMEOUT_S = 3600.0
"""Longest per-URL timeout in seconds (``download.timeout_s``)."""
MAX_ROWS_PER_SHARD = 2**31 - 1
"""Largest ``output.rows_per_shard`` (row indices inside a shard are 32-bit)."""

NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Probability = Annotated[float, Field(ge=0, le=1)]
ImageSide = Annotated[int, Field(ge=1, le=MAX_IMAGE_SIDE)]
Seconds = Annotated[float, Field(gt=0, le=MAX_TIMEOUT_S)]
Retries = Annotated[int, Field(ge=0, le=MAX_RETRIES)]
ShardRows = Annotated[int, Field(ge=1, le=MAX_ROWS_PER_SHARD)]


def _is_number_type(annotation: Any) -> bool:
    """Whether a field's type is int or float (also inside Annotated[...] or ``X | None``)."""
    if get_origin(annotation) is Annotated:
        return _is_number_type(get_args(annotation)[0])
    if annotation in (int, float):
        return True
    args = get_args(annotation)
    if get_origin(annotation) in (Union, UnionType) and bool not in args:
        return any(_is_number_type(arg) for arg in args)
    return False


class _Section(BaseModel):
    """Base of every config section (pipeline, ``capfilt train`` and ``capfilt bootstrap``).

    Unknown keys are errors and defaults are validated too. ``coerce_numbers_to_str`` lets
    ``--set output.dir=2024`` or ``caption.model: 123`` mean the string the user typed,
    since YAML would otherwise hand us an int. Every int or float field refuses booleans
    (pydantic's lax mode would read ``true`` as 1) and every float field refuses ``.inf``
    and ``.nan`` (``allow_inf_nan=False``).
    """

    model_config = ConfigDict(
        extra="forbid",
        validate_default=True,
        validate_assignment=True,
        coerce_numbers_to_str=True,
        allow_inf_nan=False,
    )

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and info.field_name is not None:
            field = cls.model_fields.get(info.field_name)
            if field is not None and _is_number_type(field.annotation):
                raise ValueError(f"expected a number, got the boolean {str(value).lower()}")
        return value


class InputConfig(_Section):
    """Where the URL/text pairs come from and which columns hold what."""

    path: str | list[str] = Field(
        description="File, directory, glob or fsspec URL of the input, or a list of those (in key order)."
    )
    format: Literal["parquet", "csv", "tsv", "jsonl", "webdataset"] = Field(
        default="parquet", description="webdataset = existing img2dataset tar shards with images."
    )
    url_col: str = Field(default="URL", min_length=1)
    text_col: str = Field(default="TEXT", min_length=1)
    keep_cols: list[str] = Field(
        default_factory=list, description="Input columns copied unchanged into samples/*.parquet."
    )
    key_col: str | None = Field(
        default=None,
        description="Input column used as the sample key; None = '<file index>_<row index>'.",
    )
    where: str | None = Field(
        default=None,
        description="Row filter on input metadata before download, e.g. 'punsafe < 0.5 and WIDTH >= 256'; "
        "rows it rejects get status filtered_metadata (capfilt/stages/where.py).",
    )
    limit: int | None = Field(
        default=None, ge=1, description="Only the first N input rows (in file and row order): a trial slice."
    )

    @field_validator("where")
    @classmethod
    def _where_parses(cls, text: str | None) -> str | None:
        if text is None or not text.strip():
            return None
        from capfilt.stages.where import parse_where  # light: pyarrow.compute only

        parse_where(text)  # syntax and operators; columns are checked against the input's schema
        return text

    @field_validator("path")
    @classmethod
    def _paths_not_empty(cls, path: str | list[str]) -> str | list[str]:
        if isinstance(path, list) and not path:
            raise ValueError("the list of inputs is empty")
        if any(not p.strip() for p in ([path] if isinstance(path, str) else path)):
            raise ValueError("must not be empty")
        return path

    @field_validator("keep_cols")
    @classmethod
    def _no_reserved_or_repeated(cls, cols: list[str]) -> list[str]:
        clash = sorted(c for c in cols if c in RESERVED_COLUMNS or c.startswith(RESERVED_PREFIXES))
        if clash:
            raise ValueError(
                f"{', '.join(clash)} would collide with a column the pipeline writes; rename the input column"
            )
        repeated = sorted({c for c in cols if cols.count(c) > 1})
        if repeated:
            raise ValueError(f"{', '.join(repeated)} listed more than once")
        return cols


class DownloadConfig(_Section):
    """Download and resize settings; names follow img2dataset's options of the same meaning."""

    image_size: ImageSide = 384
    # keep_ratio: the smaller side becomes image_size, nothing is cut or padded, so the stored image
    # stays useful for training (random crops); the models squash it to their own input side.
    resize_mode: Literal["no", "keep_ratio", "center_crop", "border", "keep_ratio_largest"] = "keep_ratio"
    timeout_s: Seconds = Field(
        default=10.0,
        description="Absolute deadline of one request: connect, status line, headers, body, all redirect hops.",
    )
    retries: Retries = Field(default=1, description="Extra attempts after a transient failure (exponential back-off).")
    max_bytes: PositiveInt = Field(default=20_000_000, description="Bodies larger than this are too_large.")
    max_pixels: Annotated[int, Field(ge=1, le=1_000_000_000)] = Field(
        default=40_000_000,
        description="Images with more pixels (read from the header, before decoding) are too_large.",
    )
    decode_pixel_budget: PositiveInt = Field(
        default=120_000_000,
        description="Pixels a download task may hold decoded at once (threads wait for budget).",
    )
    max_header_bytes: Annotated[int, Field(ge=1024, le=1 << 20)] = Field(
        default=65_536, description="Status line + headers larger than this fail."
    )
    batch_timeout_s: Annotated[float, Field(gt=0, le=86_400)] | None = Field(
        default=None,
        description="Deadline of one download batch; rows still stuck are download_failed (deadline). "
        "None: derived from timeout_s, retries, threads and the batch size.",
    )
    allow_private_networks: bool = Field(
        default=False,
        description="Allow loopback, private, link-local, CGNAT... addresses (blocked_address).",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names, IPs or CIDR networks exempt from the address policy, e.g. [127.0.0.1].",
    )
    per_host_connections: Annotated[int, Field(ge=1, le=1024)] = Field(
        default=4, description="Concurrent requests to one host, per download task."
    )
    per_host_rate: PositiveFloat | None = Field(
        default=None, description="Requests per second to one host, per download task; None: no limit."
    )
    backoff_s: Annotated[float, Field(ge=0, le=600)] = Field(
        default=1.0, description="First back-off before a retry; doubles per attempt, jittered."
    )
    retry_after_max_s: Annotated[float, Field(ge=0, le=3600)] = Field(
        default=60.0, description="Longest Retry-After honoured; a longer one fails the row."
    )
    robots_txt: bool = Field(
        default=False, description="Fetch and obey each host's robots.txt (user agent: user_agent_token)."
    )
    min_image_size: NonNegativeInt = Field(default=0, description="Smaller side below this is too_small.")
    user_agent_token: str | None = Field(
        default="capfilt", description="Token in the User-Agent and matched by X-Robots-Tag."
    )
    disallowed_header_directives: list[str] = Field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"],
        description="X-Robots-Tag directives that opt an image out; [] disables the check.",
    )
    threads: PositiveInt = 16
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: NonNegativeInt = Field(
        default=95, description="0-100 for jpg/webp; zlib level 0-9 for png (default 3 there)."
    )

    @field_validator("resize_mode", mode="before")
    @classmethod
    def _yaml_no_is_false(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `no` as False; `resize_mode: no` means the mode "no".
        return "no" if value is False else value

    @field_validator("user_agent_token")
    @classmethod
    def _normalise_token(cls, value: str | None) -> str | None:
        # img2dataset matches the token case-insensitively against X-Robots-Tag.
        if value is None or not value.strip():
            return None
        return value.strip().lower()

    @field_validator("allowed_hosts")
    @classmethod
    def _valid_hosts(cls, values: list[str]) -> list[str]:
        import ipaddress

        out = []
        for value in values:
            entry = value.strip().lower().strip("[]")
            if not entry:
                raise ValueError("allowed_hosts entries must not be empty")
            if "/" in entry:
                try:
                    ipaddress.ip_network(entry, strict=False)
                except ValueError:
                    raise ValueError(f"{value!r} is not a valid CIDR network") from None
            elif any(c in entry for c in " :@?#") and not _is_ip(entry):
                raise ValueError(f"{value!r} is not a host name, IP address or CIDR network")
            out.append(entry)
        return out

    @field_validator("disallowed_header_directives")
    @classmethod
    def _normalise_directives(cls, values: list[str]) -> list[str]:
        return [v.strip().lower() for v in values if v.strip()]

    @model_validator(mode="before")
    @classmethod
    def _png_default_quality(cls, data: Any) -> Any:
        # For png the "quality" is a zlib level (0-9), so the jpg default of 95 cannot apply.
        if isinstance(data, dict) and data.get("encode_format") == "png" and "encode_quality" not in data:
            return {**data, "encode_quality": 3}
        return data

    @model_validator(mode="after")
    def _budget_fits_one_image(self) -> DownloadConfig:
        if self.decode_pixel_budget < self.max_pixels:
            raise ValueError(
                f"decode_pixel_budget ({self.decode_pixel_budget}) must be at least max_pixels ({self.max_pixels})"
            )
        return self

    @model_validator(mode="after")
    def _quality_in_range(self) -> DownloadConfig:
        top = 9 if self.encode_format == "png" else 100
        if self.encode_quality > top:
            raise ValueError(
                f"encode_quality {self.encode_quality} is out of range for {self.encode_format} (0-{top})"
            )
        return self


def _is_ip(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class _ModelStage(_Section):
    """Fields shared by the two model stages: which model(s) and how Ray should run them."""

    model: str | None = Field(
        default=None, description="HF id (org/name[@revision]), local HF BLIP dir or capfilt checkpoint."
    )
    models: list[str] = Field(default_factory=list, description="Several models for an ensemble.")
    revision: str | None = Field(
        default=None,
        description="Hub revision (branch, tag, commit, refs/pr/N) of `model`; same as model: org/name@revision.",
    )
    batch_size: PositiveInt = 64
    dtype: Dtype = "auto"
    num_gpus: NonNegativeFloat = Field(default=0, description="GPUs per model replica (fractions allowed).")
    concurrency: PositiveInt = Field(default=1, description="Number of model replicas (Ray actors).")

    @model_validator(mode="after")
    def _one_model_source(self) -> _ModelStage:
        if self.model is None and not self.models:
            raise ValueError("give model (one model) or models (an ensemble)")
        if self.model is not None and self.models:
            raise ValueError("give either model or models, not both")
        if any(not m for m in self.models) or self.model == "":
            raise ValueError("model names must not be empty")
        if self.revision is not None:
            if self.model is None:
                raise ValueError("revision applies to model; pin ensemble members as org/name@revision")
            if "@" in self.model:
                raise ValueError(
                    "give the revision either as model: org/name@revision or as revision, not both"
                )
        return self

    @property
    def model_ids(self) -> list[str]:
        """The model(s) to load, whichever of ``model``/``models`` was given (``@revision`` appended)."""
        if self.model is not None:
            return [f"{self.model}@{self.revision}" if self.revision else self.model]
        return list(self.models)


class CaptionConfig(_ModelStage):
    """Captioner: K synthetic captions per image (nucleus sampling by default, as in BLIP).

    With ``models`` (an ensemble) every model writes ``num_captions`` captions and the
    sample's ``synthetic_texts`` is their union, in model order.
    """

    num_captions: PositiveInt = 1
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.9
    max_length: PositiveInt = Field(default=30, description="At most the model's text positions.")
    # BLIP's generate() in sampling mode: top_p 0.9, max_length 30, min_length 10 and a hard-coded
    # repetition penalty of 1.1 (salesforce/BLIP models/blip.py); both lengths count [DEC] + prompt.
    min_length: NonNegativeInt = 10
    prompt: str = "a picture of "
    seed: NonNegativeInt = 0
    repetition_penalty: PositiveFloat = 1.1
    sample: bool = Field(default=True, description="True: nucleus sampling; False: beam search.")
    num_beams: PositiveInt = Field(default=3, description="Used when sample is false.")

    @model_validator(mode="after")
    def _lengths_ordered(self) -> CaptionConfig:
        if self.min_length > self.max_length:
            raise ValueError(f"min_length ({self.min_length}) must not exceed max_length ({self.max_length})")
        return self


class FilterConfig(_ModelStage):
    """Filter: ITM match probability for the web text and each synthetic caption.

    With ``models`` (an ensemble) a text's score is the mean of the models' scores. With
    ``itc_weight`` w > 0 the score the threshold applies to is ``(1 - w) * ITM + w * ITC cosine``
    (:func:`capfilt.stages.select.filter_score`).
    """

    batch_size: PositiveInt = 128
    threshold: Probability = Field(default=0.5, description="Keep a text when its filter score >= this.")
    itc_weight: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Weight of the ITC cosine in the filter score, (1 - w) * ITM + w * ITC; 0: BLIP's "
        "ITM-only rule. > 0 also writes web_itc / synthetic_itc.",
    )
    keep_web: bool = Field(default=True, description="Whether the web text may be kept at all.")
    keep_synthetic: NonNegativeInt = Field(
        default=1, description="Keep at most this many synthetic captions."
    )
    itc_column: bool = Field(
        default=False, description="Also write ITC similarities (web_itc, synthetic_itc)."
    )
    fused: bool = Field(
        default=False,
        description="Run the filter inside the caption actors (one pool, caption's num_gpus/concurrency): "
        "pixels cross the object store once and there is no caption:filter GPU ratio to tune.",
    )


class ClipConfig(_Section):
    """CLIP scoring (optional stage after the filter): cosine of each text with the image.

    Any Hugging Face CLIP checkpoint (``transformers.CLIPModel`` with its image processor and
    tokenizer): a local directory or a hub id. Scores go to ``web_clip`` / ``synthetic_clip``.
    """

    model: str = Field(min_length=1, description="HF CLIP id or local dir (safetensors weights).")
    threshold: float | None = Field(
        default=None, ge=-1, le=1, description="Keep a text only when its CLIP cosine >= this; null: no cut."
    )
    batch_size: int = Field(default=128, ge=1)
    dtype: Dtype = "auto"
    num_gpus: float = Field(default=0, ge=0, description="GPUs per CLIP replica (fractions allowed).")
    concurrency: int = Field(default=1, ge=1, description="Number of CLIP replicas (Ray actors).")

    @property
    def model_ids(self) -> list[str]:
        return [self.model]


class SelectConfig(_Section):
    """How the kept texts of an image are chosen among those that pass the thresholds.

    ``filter.threshold`` / ``clip.threshold`` decide which texts pass; ``filter.keep_web`` and
    ``filter.keep_synthetic`` cap them as before. ``rank_by`` orders the synthetic captions for
    ``keep_synthetic`` and all texts for ``top_n``. BLIP-2's recipe (rank the web text and the
    K captions by CLIP, keep the best two) is ``rank_by: clip, top_n: 2`` with
    ``filter.keep_synthetic >= K``.
    """

    rank_by: Literal["itm", "clip", "agreement"] = Field(
        default="itm",
        description="Score that ranks texts: the filter's ITM, the CLIP cosine, or (synthetic captions "
        "only) their agreement with the image's other captions.",
    )
    top_n: int | None = Field(
        default=None, ge=1, description="Keep at most this many texts per image, web text included."
    )
    min_agreement: float | None = Field(
        default=None,
        ge=-1.0,
        le=1.0,
        description="Keep a synthetic caption only when the mean ITC-text cosine with the image's other "
        "sampled captions (synthetic_agreement, from the filter) is >= this; needs >= 2 captions per image.",
    )


class DedupConfig(_Section):
    """Duplicates across the whole run: same URL, same image bytes, or near-identical images.

    Every sample of a duplicate group except the one with the smallest key gets
    ``duplicate_of`` = that key; duplicates stay in ``samples/`` and, unless
    ``keep_in_dataset``, are left out of ``dataset/``.
    """

    enabled: bool = Field(default=False, description="Run the dedup pass after the shards are written.")
    url: bool = Field(default=True, description="Same URL = duplicate.")
    sha256: bool = Field(
        default=True, description="Same image bytes (after download re-encoding) = duplicate."
    )
    near_distance: int | None = Field(
        default=4,
        ge=0,
        le=16,
        description="Perceptual-hash Hamming distance (of 64 bits) up to which images are duplicates; null: off.",
    )
    keep_in_dataset: bool = Field(
        default=False, description="Mark duplicates but keep their pairs in dataset/."
    )


class OutputConfig(_Section):
    """Where the run directory goes and how large its shards are."""

    dir: str = Field(
        default="runs/capfilt",
        min_length=1,
        description="Run directory; load() defaults it to runs/<config file stem>.",
    )
    rows_per_shard: ShardRows = 10_000


class RayConfig(_Section):
    """Ray connection: the only difference between a laptop and a cluster run."""

    address: str | None = Field(default=None, description='None: start a local Ray; "auto": join a cluster.')
    max_retries: int = Field(
        default=3,
        ge=0,
        le=100,
        description="Retries of a pipeline task (and restarts of an actor) after its worker died; "
        "then the run fails naming the lost shards (Ray Data's default retries forever).",
    )

    def task_options(self) -> dict[str, int]:
        """``map_batches`` kwargs for task stages: finite retries of a task whose worker died."""
        return {"max_retries": self.max_retries}

    def actor_options(self) -> dict[str, int]:
        """``map_batches`` kwargs for actor-pool stages: finite actor restarts and task retries."""
        return {"max_restarts": self.max_retries, "max_task_retries": self.max_retries}


class PipelineConfig(_Section):
    """A whole ``capfilt run`` config. A null or absent caption/filter skips that stage."""

    input: InputConfig
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    caption: CaptionConfig | None = None
    filter: FilterConfig | None = None
    clip: ClipConfig | None = None
    select: SelectConfig = Field(default_factory=SelectConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _clip_for_clip_ranking(self) -> PipelineConfig:
        if self.clip is None and self.select.rank_by == "clip":
            raise ValueError("select.rank_by: clip needs a clip section (clip.model)")
        if self.select.rank_by == "agreement" and self.select.top_n is not None:
            raise ValueError("select.rank_by: agreement ranks synthetic captions only; it cannot be used with top_n")
        captions = self.caption.num_captions * len(self.caption.model_ids) if self.caption is not None else None
        problem = agreement_problem(self.select, captions_per_image=captions, has_filter=self.filter is not None)
        if problem:
            raise ValueError(problem)
        return self


def agreement_problem(
    select: SelectConfig, *, captions_per_image: int | None, has_filter: bool, prefix: str = ""
) -> str | None:
    """Why ``select``'s agreement options cannot work here, or None (``capfilt run`` and
    ``capfilt bootstrap`` configs both check with this). Agreement is computed by the filter, among
    an image's captions: it needs a filter and >= 2 captions per image (None: captions unknown)."""
    if select.min_agreement is None and select.rank_by != "agreement":
        return None
    what = f"{prefix}select.min_agreement / rank_by: agreement"
    if not has_filter:
        return f"{what} need a filter section (it computes agreement)"
    if captions_per_image is not None and captions_per_image < 2:
        return (
            f"{what} need >= 2 captions per image, got {captions_per_image} (caption.num_captions x "
            f"captioners); set {prefix}select.min_agreement=null to keep captions without agreement"
        )
    return None


# --------------------------------------------------------------------------- loading

M = TypeVar("M", bound=BaseModel)


MAX_YAML_VALUES = 100_000
"""Most values a YAML document may hold once its aliases are expanded (a config has ~100)."""

_MERGE_TAG = "tag:yaml.org,2002:merge"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader for configs: merge keys (``<<: *base``) work; the rest fails with one line.

    Refused: duplicate keys (PyYAML lets the last one win), keys that are lists or mappings,
    aliases that refer to a node containing them (an infinite value), and documents whose
    aliases expand to more than :data:`MAX_YAML_VALUES` values ("billion laughs": 300 bytes
    that would become 10^9 strings once copied). Both are checked on the composed node
    graph, before any value is constructed, so the check costs time linear in the file.
    """

    def construct_document(self, node: yaml.Node) -> Any:
        _check_expansion(node)
        return super().construct_document(node)


def _check_expansion(root: yaml.Node) -> None:
    """Raise ConstructorError for a cyclic alias or an expansion beyond MAX_YAML_VALUES."""
    sizes: dict[int, int] = {}  # id(node) -> values in its expansion
    on_path: set[int] = set()
    # Iterative post-order walk (a deep document must not hit Python's recursion limit).
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        ident = id(node)
        if children_done:
            on_path.discard(ident)
            total = 1 + sum(sizes[id(child)] for child in _children(node))
            if total > MAX_YAML_VALUES:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"aliases expand to more than {MAX_YAML_VALUES:,} values; refusing to expand",
                    node.start_mark,
                )
            sizes[ident] = total
            continue
        if ident in sizes:
            continue
        if ident in on_path:
            raise yaml.constructor.ConstructorError(
                None, None, "an alias refers to a value that contains it (infinite value)", node.start_mark
            )
        on_path.add(ident)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in on_path:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    "an alias refers to a value that contains it (infinite value)",
                    child.start_mark,
                )
            if id(child) not in sizes:
                stack.append((child, False))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == _MERGE_TAG:
            continue  # SafeConstructor.flatten_mapping merges these; explicit keys override them
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, f"a key must be a plain value, not a {type(key).__name__}", key_node.start_mark
            ) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML config text with :class:`_StrictLoader`; any problem is a one-line UserError.

    Also used for YAML read back from a run directory (``config.yaml``), which a user may
    have edited or which may come from elsewhere.
    """
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = " ".join((err.problem or err.context or "invalid YAML").split())
        raise UserError(f"{where}: YAML syntax error: {problem}") from None
    except yaml.YAMLError as err:
        raise UserError(f"{source}: YAML syntax error: {' '.join(str(err).split())}") from None
    except RecursionError:  # nesting deeper than the parser's recursion allows
        raise UserError(f"{source}: YAML syntax error: nested too deeply") from None


_parse_yaml = parse_yaml


def _parse_override(override: str) -> tuple[list[str], Any]:
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"--set {override}: expected SECTION.KEY=VALUE, e.g. caption.top_p=0.95")
    parts = key.split(".")
    if any(not p for p in parts):
        raise UserError(f"--set {override}: empty name in {key!r}")
    try:
        value = yaml.load(raw, Loader=_StrictLoader) if raw.strip() else None
    except yaml.YAMLError as err:
        problem = " ".join((getattr(err, "problem", None) or "invalid YAML value").split())
        raise UserError(f"--set {override}: cannot parse value {raw!r}: {problem}") from None
    except RecursionError:
        raise UserError(f"--set {override}: cannot parse value: nested too deeply") from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``a.b=value`` override applied in order.

    The value is parsed as a YAML scalar or flow list (``0.95``, ``true``, ``null``,
    ``[noai, noindex]``). Missing or null intermediate sections are created, so
    ``--set caption.model=x`` turns on a stage the file left out. Names are not checked
    here (this function knows no schema); :func:`load_model` does that.
    """
    result: dict[str, Any] = _deep_copy(data)
    for override in overrides:
        parts, value = _parse_override(override)
        node = result
        for depth, name in enumerate(parts[:-1]):
            child = node.get(name)
            if child is None:
                child = node[name] = {}
            elif not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise UserError(f"--set {override}: {where} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return result


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def _check_override_sections(schema_cls: type[BaseModel], overrides: Sequence[str]) -> None:
    sections = list(schema_cls.model_fields)
    for override in overrides:
        parts, _ = _parse_override(override)
        if parts[0] not in sections:
            hint = _did_you_mean(parts[0], sections)
            raise UserError(
                f"--set {override}: unknown section {parts[0]!r}{hint}; sections: {', '.join(sections)}"
            )


def _did_you_mean(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _model_at(schema_cls: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at ``loc`` (for 'did you mean')."""
    model: Any = schema_cls
    for name in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(str(name))
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _format_error(schema_cls: type[BaseModel], error: ErrorDetails) -> tuple[str, str]:
    """(dotted field name, lower-case message) for one pydantic error."""
    loc = tuple(error["loc"])
    field = ".".join(str(p) for p in loc) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        owner = _model_at(schema_cls, loc[:-1])
        hint = _did_you_mean(str(loc[-1]), owner.model_fields) if owner else ""
        return field, f"unknown key{hint}"
    if kind == "missing":
        return field, "required field is missing"
    message = error["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            message = message[len(prefix) :]
    message = message[:1].lower() + message[1:]
    message = message.split(", unable to", 1)[0]
    if kind not in ("value_error", "assertion_error") and not isinstance(error.get("input"), dict):
        message += f", got {_short(error.get('input'))}"
    return field, message


def _source_of(field: str, overrides: Sequence[str], default: str) -> str:
    """Blame the ``--set`` that wrote ``field`` if one did, else the file."""
    for override in reversed(overrides):
        key = override.partition("=")[0].strip()
        if field == key or field.startswith(key + "."):
            return f"--set {override}"
    return default


def validate_data(schema_cls: type[M], data: Any, *, source: str, overrides: Sequence[str] = ()) -> M:
    """Validate a parsed mapping against ``schema_cls``; errors become one-line UserErrors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(
            f"{source}: expected a mapping of sections at the top level, got {type(data).__name__}"
        )
    _check_override_sections(schema_cls, overrides)
    data = apply_overrides(data, overrides)
    try:
        return schema_cls.model_validate(data)
    except ValidationError as err:
        # One line in all cases: errors are grouped by where they came from (file or --set).
        by_source: dict[str, list[str]] = {}
        for error in err.errors():
            field, message = _format_error(schema_cls, error)
            by_source.setdefault(_source_of(field, overrides, source), []).append(f"{field}: {message}")
        raise UserError(
            "; ".join(f"{where}: {'; '.join(items)}" for where, items in by_source.items())
        ) from None


def load_model_text(
    schema_cls: type[M], text: str, *, source: str = "<string>", overrides: Sequence[str] = ()
) -> M:
    """Parse YAML ``text``, apply ``overrides`` and validate it as ``schema_cls``."""
    return validate_data(schema_cls, _parse_yaml(text, source), source=source, overrides=tuple(overrides))


def _read_text(path: str | Path) -> str:
    file = Path(path)
    if not file.exists():
        raise UserError(f"{path}: config file not found")
    if file.is_dir():
        raise UserError(f"{path}: is a directory, expected a YAML config file")
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read config file: {err}") from None


def load_model(schema_cls: type[M], path: str | Path, overrides: Sequence[str] = ()) -> M:
    """Load a YAML file as ``schema_cls`` with ``--set`` overrides (generic over schemas)."""
    return load_model_text(schema_cls, _read_text(path), source=str(path), overrides=overrides)


def _with_default_output_dir(data: Any, name: str) -> Any:
    """Default ``output.dir`` to ``runs/<config name>`` so two configs never share a run dir."""
    if isinstance(data, dict):
        output = data.get("output")
        if output is None:
            data = {**data, "output": {"dir": f"runs/{name}"}}
        elif isinstance(output, dict) and "dir" not in output:
            data = {**data, "output": {**output, "dir": f"runs/{name}"}}
    return data


def loads(
    text: str, overrides: Sequence[str] = (), *, source: str = "<string>", name: str = "capfilt"
) -> PipelineConfig:
    """Load a pipeline config from YAML text (e.g. the embedded demo config)."""
    data = _with_default_output_dir(_parse_yaml(text, source), name)
    return validate_data(PipelineConfig, data, source=source, overrides=tuple(overrides))


def load(path: str | Path, overrides: Sequence[str] = ()) -> PipelineConfig:
    """Load a ``capfilt run`` config file; ``overrides`` are ``--set a.b=value`` strings.

    ``output.dir`` defaults to ``runs/<file stem>``. Raises :class:`UserError` (one line)
    on any problem: missing file, YAML syntax, unknown key, wrong type, out of range,
    malformed or unknown ``--set``.
    """
    return loads(_read_text(path), overrides, source=str(path), name=Path(path).stem)


def dump(config: BaseModel) -> str:
    """The resolved config as YAML (written as RUN/config.yaml); ``load`` reads it back equal."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True, width=1000)
