"""Checks on what capfilt reads from outside: sample keys, tar member names, text encodings,
paths derived from a run directory, and model checkpoints before a run starts.

Each check is one small function that raises :class:`capfilt.errors.UserError` (one line,
exit code 2) so the readers and writers that call it stay one line long:

* :func:`validate_key` / :func:`validate_keys`: a sample key becomes a file name (``KEY.jpg``
  in tars, ``images/NNNNN/KEY.jpg`` in exports), so it must be a safe single path component
  with no control characters (a NUL, ESC or newline in a key would corrupt tar headers,
  terminals and logs). Called where the input is read and again where a run directory is
  read back (export), since a run directory may have been edited.
* :class:`SampleNames`: a webdataset tar groups files into samples by name; two files
  ``a/x.jpg`` and ``b/x.jpg`` are two samples that would get the same key ``x``.
* :func:`check_utf8`: string columns of JSONL and Parquet inputs must be valid UTF-8.
* :func:`inside`: every path built from run-directory data must stay inside its root.
* :func:`check_models`: the pipeline's checkpoints load and fit the config (on the driver,
  before Ray starts, so a corrupt file is one line, not an actor crash per replica).
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa

from capfilt.errors import UserError

MAX_KEY_BYTES = 200
"""Longest key in UTF-8 bytes: file names are limited to 255 bytes and exports add ``_N.json``."""

_FORBIDDEN_IN_KEY = {"/": "'/'", "\\": "'\\'", ".": "'.'"}
_CONTROL_CATEGORIES = {"Cc", "Cf", "Cs", "Zl", "Zp"}


def key_problem(key: Any) -> str | None:
    """Why ``key`` cannot be a sample key, or None when it can."""
    if not isinstance(key, str):
        return f"is a {type(key).__name__}, not text"
    if not key:
        return "is empty"
    for char in key:
        if char in _FORBIDDEN_IN_KEY:
            return f"contains {_FORBIDDEN_IN_KEY[char]}"
        category = unicodedata.category(char)
        if category in _CONTROL_CATEGORIES:
            return f"contains the control character U+{ord(char):04X}"
        if char.isspace():
            return "contains whitespace"
    if len(key.encode("utf-8", errors="surrogatepass")) > MAX_KEY_BYTES:
        return f"is longer than {MAX_KEY_BYTES} bytes"
    return None


def validate_key(key: Any, *, where: str) -> None:
    """Raise UserError ``WHERE: key 'k' contains ...`` unless ``key`` is a safe sample key.

    A key must be non-empty text of at most :data:`MAX_KEY_BYTES` UTF-8 bytes with no ``/``,
    ``\\``, ``.``, whitespace or control/format character (categories Cc, Cf, Cs, Zl, Zp),
    because keys name files in tars and exports. ``repr`` in the message keeps it one line.
    """
    _raise_if_bad(key, f"{where}: key {{key}}")


def validate_keys(keys: Iterable[Any], *, field: str, file: str, unit: str = "row") -> None:
    """:func:`validate_key` for every key of ``file``; the message names the row (or sample):
    ``input.key_col: key 'a\\x1b' in row 3 of urls.parquet contains the control character U+001B``.
    """
    for index, key in enumerate(keys):
        _raise_if_bad(key, f"{field}: key {{key}} in {unit} {index} of {file}")


def _raise_if_bad(key: Any, template: str) -> None:
    problem = key_problem(key)
    if problem is not None:
        shown = repr(key)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        message = template.replace("{key}", shown)
        raise UserError(f"{message} {problem} (keys name files in the output tars)")


_MEMBER_EXTENSION = re.compile(r"^[A-Za-z0-9]{1,10}$")


def validate_member(member: Any, *, where: str) -> str:
    """Check a tar member name read back from a run directory (``KEY.jpg``); returns its extension.

    The name must be a valid key, a dot and a short alphanumeric extension: no directories,
    no ``..``, no control characters.
    """
    stem, dot, extension = member.rpartition(".") if isinstance(member, str) else ("", "", "")
    if not dot or not _MEMBER_EXTENSION.match(extension):
        raise UserError(
            f"{where}: image member {member!r} is not KEY.EXT (the run directory may have been edited)"
        )
    _raise_if_bad(stem, f"{where}: image member {member!r}: key {{key}}")
    return extension


class SampleNames:
    """Groups the members of one webdataset tar into samples and refuses ambiguous names.

    webdataset's sample name is the member path up to the first dot of its file name
    (``a/x.jpg`` -> ``a/x``); capfilt keys are the file-name part (``x``), as img2dataset
    writes them. Two different sample names with the same key (``a/x.jpg`` and
    ``b/x.jpg``) would silently merge into one sample or collide, so they are an error
    naming both members.
    """

    def __init__(self, file: str) -> None:
        self.file = file
        self._first: dict[str, str] = {}  # key -> sample name (member path without extension)
        self._member: dict[str, str] = {}  # key -> first member seen for it

    def key_of(self, member: str) -> str:
        """The key of tar member ``member`` (``a/b/x.jpg`` -> ``x``), checked for ambiguity."""
        directory, _, name = member.rpartition("/")
        key = name.split(".", 1)[0]
        sample = f"{directory}/{key}" if directory else key
        first = self._first.setdefault(key, sample)
        self._member.setdefault(key, member)
        if first != sample:
            raise UserError(
                f"input.path: {self.file}: members {self._member[key]!r} and {member!r} are different "
                f"samples with the same name {key!r}; keep one per name (sample names ignore directories)"
            )
        return key


def check_utf8(table: pa.Table, file: str, *, row_offset: int = 0) -> None:
    """Raise UserError naming the column and row of the first invalid UTF-8 string in ``table``.

    Parquet ``string`` columns and JSON texts promise UTF-8; a file that breaks the promise
    would otherwise fail later with a traceback deep inside Arrow.
    """
    for name in table.column_names:
        column = table.column(name)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            continue
        offset = row_offset
        for chunk in column.chunks:
            try:
                chunk.validate(full=True)
            except pa.ArrowInvalid:
                raw = chunk.cast(pa.large_binary() if pa.types.is_large_string(chunk.type) else pa.binary())
                for row, value in enumerate(raw.to_pylist()):
                    if value is None:
                        continue
                    try:
                        value.decode("utf-8")
                    except UnicodeDecodeError as err:
                        raise UserError(
                            f"input.path: {file}: column {name!r} row {offset + row} is not valid UTF-8 "
                            f"(byte {err.start}: {value[err.start : err.start + 1]!r})"
                        ) from None
                raise UserError(f"input.path: {file}: column {name!r} is not valid UTF-8") from None
            offset += len(chunk)


def inside(root: str | os.PathLike[str], relative: str, *, what: str) -> Path:
    """``root / relative``, refused unless it stays inside ``root`` (symlinks resolved).

    For paths built from data read back from a run directory (tar names, keys): a tampered
    ``../../x`` or an absolute path must not make capfilt read or write elsewhere.
    """
    base = Path(root).resolve()
    if not relative or Path(relative).is_absolute() or "\x00" in relative:
        raise UserError(f"{what}: {relative!r} is not a relative path inside {root}")
    target = (base / relative).resolve()
    if target != base and base not in target.parents:
        raise UserError(
            f"{what}: {relative!r} points outside {root}; the run directory may have been tampered with"
        )
    return target


# --------------------------------------------------------------------------- models


def check_models(cfg: Any) -> None:
    """Before a run: every caption/filter checkpoint is readable and fits the config.

    Reads each model's config file and the header of its safetensors weights (no tensor is
    loaded), and checks ``caption.max_length`` against the model's text positions. Raises
    :class:`model.med.CheckpointError` or UserError, one line each.
    """
    from capfilt.stages.caption import model_specs, resolve_model
    from model.med import inspect_checkpoint

    for stage in ("caption", "filter"):
        section = getattr(cfg, stage, None)
        if section is None:
            continue
        for spec in model_specs(section):
            positions = inspect_checkpoint(resolve_model(spec))
            max_length = getattr(section, "max_length", None)
            if stage == "caption" and max_length is not None and max_length > positions:
                raise UserError(
                    f"caption.max_length: {max_length} exceeds the {positions} text positions of model {spec}"
                )
