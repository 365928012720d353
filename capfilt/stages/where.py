"""``input.where``: a row filter on the input's metadata, applied before anything is downloaded.

LAION-style metadata carries what its subsets are made from (``punsafe``, ``pwatermark``,
``similarity``, ``WIDTH``/``HEIGHT``, ...). Filtering on it before download saves the most
bandwidth, so ``input.where`` takes a small SQL-like boolean expression::

    punsafe < 0.5 and pwatermark < 0.8 and (WIDTH >= 256 or HEIGHT >= 256)
    NSFW in ('UNLIKELY', 'UNSURE') and not LICENSE is null

Grammar (keywords are case-insensitive)::

    expr       := and_expr ("or" and_expr)*
    and_expr   := not_expr ("and" not_expr)*
    not_expr   := "not" not_expr | predicate
    predicate  := "(" expr ")"
                | operand (("<" | "<=" | ">" | ">=" | "=" | "==" | "!=" | "<>") operand)?
                | operand "is" ["not"] "null"
                | operand ["not"] "in" "(" literal ("," literal)* ")"
    operand    := column | literal | "-" number
    column     := name ([A-Za-z_][A-Za-z0-9_]*) | `any name in backticks`
    literal    := number | 'string' | "string" | true | false

It is parsed here (no ``eval``) and compiled to a ``pyarrow.compute`` expression, evaluated on
whole batches. SQL's rule for nulls applies: a comparison with a null is unknown, and a row is
kept only when the expression is true, so ``punsafe < 0.5`` drops rows whose ``punsafe`` is null
(write ``punsafe is null or punsafe < 0.5`` to keep them). A bare column must be boolean.

The rows it rejects are not dropped: the where step (:func:`apply_where`, a map step right after
reading) gives them status ``filtered_metadata`` and the download stage passes rows whose status
is already set through untouched, so they are never requested and still appear in
``samples/`` with their status. Columns the expression names are read with the input (see
:func:`read_config`) and dropped again by the where step unless ``keep_cols`` lists them; the
URL, text and key columns are seen as the pipeline's ``url``, ``web_text`` and ``key`` (text,
a null as ``''``).

Mistakes are one line naming the problem: syntax and unknown operators when the config is
loaded, unknown columns and type mismatches as soon as the input's schema is known (``--dry-run``
reads it from a local file's footer or first block; never over the network).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from capfilt.errors import UserError
from capfilt.stages.status import Status

FILTERED_ERROR = "rejected by input.where"
"""The ``error`` text of a ``filtered_metadata`` row."""


class WhereError(ValueError):
    """A mistake in an ``input.where`` expression (a ValueError so pydantic names the field)."""


# --------------------------------------------------------------------------- tokens

_KEYWORDS = {"and", "or", "not", "is", "null", "in", "true", "false"}
_COMPARISONS = {"<": "<", "<=": "<=", ">": ">", ">=": ">=", "=": "==", "==": "==", "!=": "!=", "<>": "!="}
_TOKEN = re.compile(
    r"""\s*(?:
        (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
      | (?P<string>'(?:[^']|'')*'|"(?:[^"]|"")*")
      | (?P<quoted>`[^`]+`)
      | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<op><=|>=|!=|<>|==|=|<|>|\(|\)|,|-)
    )""",
    re.VERBOSE,
)
_HINTS = {"&&": "and", "&": "and", "||": "or", "|": "or", "!": "not", "~": "not"}


@dataclass(frozen=True)
class _Token:
    kind: str  # number | string | name | keyword | op | end
    value: Any
    pos: int


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            start = len(text[pos:]) - len(text[pos:].lstrip()) + pos
            bad = text[start : start + 2] if text[start : start + 2] in _HINTS else text[start]
            hint = f" (use {_HINTS[bad]})" if bad in _HINTS else ""
            if bad in "'\"`":
                raise WhereError(f"unterminated quote {bad} at position {start}")
            raise WhereError(f"unknown operator {bad!r} at position {start}{hint}")
        kind = match.lastgroup or ""
        raw = match.group(kind)
        start = match.start(kind)
        if kind == "number":
            value: Any = float(raw) if any(c in raw for c in ".eE") else int(raw)
        elif kind == "string":
            value = raw[1:-1].replace(raw[0] * 2, raw[0])
        elif kind == "quoted":
            kind, value = "name", raw[1:-1]
        elif kind == "name" and raw.lower() in _KEYWORDS:
            kind, value = "keyword", raw.lower()
        else:
            value = raw
        tokens.append(_Token(kind, value, start))
        pos = match.end()
    tokens.append(_Token("end", None, len(text)))
    return tokens


# --------------------------------------------------------------------------- syntax tree


@dataclass(frozen=True)
class Column:
    name: str


@dataclass(frozen=True)
class Literal:
    value: Any  # int | float | str | bool


@dataclass(frozen=True)
class Compare:
    op: str  # < <= > >= == !=
    left: Any
    right: Any


@dataclass(frozen=True)
class IsNull:
    operand: Any
    negated: bool


@dataclass(frozen=True)
class In:
    operand: Any
    values: tuple[Literal, ...]
    negated: bool


@dataclass(frozen=True)
class Bool:
    op: str  # and | or | not
    args: tuple[Any, ...]


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.i = 0

    @property
    def tok(self) -> _Token:
        return self.tokens[self.i]

    def take(self) -> _Token:
        token = self.tokens[self.i]
        self.i += 1
        return token

    def at(self, kind: str, value: Any = None) -> bool:
        return self.tok.kind == kind and (value is None or self.tok.value == value)

    def expect(self, kind: str, value: Any, what: str) -> None:
        if not self.at(kind, value):
            raise WhereError(f"expected {what} at position {self.tok.pos}, found {self._describe(self.tok)}")
        self.take()

    @staticmethod
    def _describe(token: _Token) -> str:
        return "the end" if token.kind == "end" else repr(token.value)

    def parse(self) -> Any:
        if self.at("end"):
            raise WhereError("empty expression")
        node = self.or_expr()
        if not self.at("end"):
            raise WhereError(f"unexpected {self._describe(self.tok)} at position {self.tok.pos}")
        return node

    def or_expr(self) -> Any:
        args = [self.and_expr()]
        while self.at("keyword", "or"):
            self.take()
            args.append(self.and_expr())
        return args[0] if len(args) == 1 else Bool("or", tuple(args))

    def and_expr(self) -> Any:
        args = [self.not_expr()]
        while self.at("keyword", "and"):
            self.take()
            args.append(self.not_expr())
        return args[0] if len(args) == 1 else Bool("and", tuple(args))

    def not_expr(self) -> Any:
        if self.at("keyword", "not"):
            self.take()
            return Bool("not", (self.not_expr(),))
        return self.predicate()

    def predicate(self) -> Any:
        if self.at("op", "("):
            self.take()
            node = self.or_expr()
            self.expect("op", ")", "')'")
            return node
        left = self.operand()
        if self.at("op") and self.tok.value in _COMPARISONS:
            op = _COMPARISONS[self.take().value]
            return Compare(op, left, self.operand())
        if self.at("keyword", "is"):
            self.take()
            negated = self.at("keyword", "not")
            if negated:
                self.take()
            self.expect("keyword", "null", "null after 'is'")
            return IsNull(left, negated)
        negated = False
        if self.at("keyword", "not"):
            self.take()
            negated = True
            if not self.at("keyword", "in"):
                raise WhereError(f"expected 'in' after 'not' at position {self.tok.pos}")
        if self.at("keyword", "in"):
            self.take()
            self.expect("op", "(", "'(' after 'in'")
            values = [self.literal()]
            while self.at("op", ","):
                self.take()
                values.append(self.literal())
            self.expect("op", ")", "')' closing the 'in' list")
            return In(left, tuple(values), negated)
        if self.at("name") or self.at("number") or self.at("string"):
            raise WhereError(
                f"expected an operator (<, <=, >, >=, =, !=, is, in, and, or) at position {self.tok.pos}, "
                f"found {self._describe(self.tok)}"
            )
        return left

    def operand(self) -> Any:
        token = self.tok
        if token.kind == "name":
            self.take()
            return Column(token.value)
        return self.literal()

    def literal(self) -> Literal:
        token = self.take()
        if token.kind in ("number", "string"):
            return Literal(token.value)
        if token.kind == "keyword" and token.value in ("true", "false"):
            return Literal(token.value == "true")
        if token.kind == "op" and token.value == "-" and self.at("number"):
            return Literal(-self.take().value)
        if token.kind == "keyword" and token.value == "null":
            raise WhereError(f"null at position {token.pos} compares as unknown; write 'x is null'")
        if token.kind == "op" and token.value not in "(),":
            raise WhereError(f"unexpected operator {token.value!r} at position {token.pos}")
        raise WhereError(
            f"expected a column or a value at position {token.pos}, found {self._describe(token)}"
        )


def parse_where(text: str) -> Any:
    """The syntax tree of ``text``; :class:`WhereError` (one line) on a syntax mistake."""
    return _Parser(text).parse()


def columns_of(node: Any) -> list[str]:
    """Column names an expression reads, in order of first use."""
    found: list[str] = []

    def visit(n: Any) -> None:
        if isinstance(n, Column):
            if n.name not in found:
                found.append(n.name)
        elif isinstance(n, Compare):
            visit(n.left)
            visit(n.right)
        elif isinstance(n, IsNull | In):
            visit(n.operand)
        elif isinstance(n, Bool):
            for arg in n.args:
                visit(arg)

    visit(node)
    return found


# --------------------------------------------------------------------------- compile


def _kind(dtype: pa.DataType) -> str:
    if pa.types.is_dictionary(dtype):
        dtype = dtype.value_type
    if pa.types.is_boolean(dtype):
        return "bool"
    if pa.types.is_integer(dtype) or pa.types.is_floating(dtype) or pa.types.is_decimal(dtype):
        return "number"
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return "string"
    if pa.types.is_null(dtype):
        return "null"
    return str(dtype)


def _literal_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    return "number" if isinstance(value, int | float) else "string"


def compile_where(
    text: str, schema: Mapping[str, pa.DataType] | None = None, *, rename: Mapping[str, str] | None = None
) -> pc.Expression:
    """``text`` as a ``pyarrow.compute`` expression.

    With ``schema`` (column name -> Arrow type) unknown columns and comparisons of different
    kinds (a string column with a number, ...) are errors. ``rename`` maps an input column name
    to the name it has in the batches the expression is evaluated on.
    """
    tree = parse_where(text)
    rename = dict(rename or {})

    def kind_of(node: Any) -> str | None:
        if isinstance(node, Literal):
            return _literal_kind(node.value)
        if schema is None:
            return None
        if node.name not in schema:
            close = [c for c in schema if c.lower() == node.name.lower()]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise WhereError(f"unknown column {node.name!r}{hint}; input columns: {', '.join(schema)}")
        return _kind(schema[node.name])

    def value(node: Any) -> pc.Expression:
        if isinstance(node, Column):
            return pc.field(rename.get(node.name, node.name))
        return pc.scalar(node.value)

    def describe(node: Any) -> str:
        return f"column {node.name!r}" if isinstance(node, Column) else repr(node.value)

    def build(node: Any) -> pc.Expression:
        if isinstance(node, Bool):
            args = [build(a) for a in node.args]
            if node.op == "not":
                return ~args[0]
            result = args[0]
            for arg in args[1:]:
                result = (result & arg) if node.op == "and" else (result | arg)
            return result
        if isinstance(node, Compare):
            left, right = kind_of(node.left), kind_of(node.right)
            if left and right and "null" not in (left, right) and left != right:
                raise WhereError(
                    f"cannot compare {describe(node.left)} ({left}) with {describe(node.right)} ({right})"
                )
            a, b = value(node.left), value(node.right)
            return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b, "==": a == b, "!=": a != b}[node.op]
        if isinstance(node, IsNull):
            kind_of(node.operand)
            operand = value(node.operand)
            return operand.is_valid() if node.negated else operand.is_null()
        if isinstance(node, In):
            column_kind = kind_of(node.operand)
            kinds = {_literal_kind(v.value) for v in node.values}
            if len(kinds) > 1:
                raise WhereError(
                    f"the 'in' list of {describe(node.operand)} mixes {' and '.join(sorted(kinds))}"
                )
            if column_kind and column_kind != "null" and column_kind not in kinds:
                raise WhereError(
                    f"{describe(node.operand)} ({column_kind}) is compared with {kinds.pop()} values"
                )
            operand = value(node.operand)
            # SQL: a null is in no list and in every "not in" list: unknown, so the row fails.
            test = pc.if_else(
                operand.is_null(), pa.scalar(None, pa.bool_()), operand.isin([v.value for v in node.values])
            )
            return ~test if node.negated else test
        # A bare operand: must be a boolean column (or literal).
        kind = kind_of(node)
        if kind not in (None, "bool", "null"):
            raise WhereError(
                f"{describe(node)} ({kind}) is not a condition; compare it, e.g. {node.name} > 0"
                if isinstance(node, Column)
                else f"{describe(node)} is not a condition"
            )
        return value(node)

    return build(tree)


# --------------------------------------------------------------------------- the pipeline step


def _special_columns(cfg: Any) -> dict[str, str]:
    """Input columns the read stage already exposes under the pipeline's own names."""
    special = {cfg.url_col: "url", cfg.text_col: "web_text"}
    if cfg.key_col is not None:
        special[cfg.key_col] = "key"
    return special


def where_columns(cfg: Any) -> list[str]:
    """Input columns ``cfg.where`` reads that the read stage must carry besides its usual ones."""
    if not cfg.where:
        return []
    special = _special_columns(cfg)
    return [c for c in columns_of(parse_where(cfg.where)) if c not in special]


def read_config(cfg: Any) -> Any:
    """The InputConfig to read with: ``keep_cols`` extended by the columns ``where`` reads.

    The extra columns are dropped again by :func:`apply_where`. A reader that reads only
    ``keep_cols`` therefore provides what the where step needs without knowing about it.
    """
    extra = [c for c in where_columns(cfg) if c not in cfg.keep_cols]
    clash = [c for c in extra if c in ("key", "url", "web_text")]
    if clash:
        raise UserError(
            f"input.where: column {clash[0]!r} has the name of a column the read stage writes; "
            "it can only be filtered on when it is input.url_col, text_col or key_col"
        )
    if not extra:
        return cfg
    return cfg.model_copy(update={"keep_cols": [*cfg.keep_cols, *extra]})


def apply_limit(table: pa.Table, limit: int | None) -> pa.Table:
    """``input.limit``: the first ``limit`` rows (file order, then row order)."""
    return table if limit is None or table.num_rows <= limit else table.slice(0, limit)


def apply_where(batch: pa.Table, *, cfg: Any) -> pa.Table:
    """Map step: set ``status``/``error`` of rows ``cfg.where`` rejects; drop where-only columns.

    Rows it keeps get ``status == ""`` (not decided yet: the download stage decides). Input
    ``batch``: the read stage's columns plus :func:`where_columns`. Pure and Ray-free.
    """
    expression = compile_where(cfg.where, rename=_special_columns(cfg))
    import pyarrow.dataset as ds

    try:
        mask = ds.dataset(batch).to_table(columns={"keep": expression}).column("keep")
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise UserError(
            f"input.where: cannot evaluate on the input's columns: {' '.join(str(err).split())}"
        ) from None
    keep = pc.fill_null(mask, False)
    status = pc.if_else(
        keep, pa.scalar("", pa.string()), pa.scalar(Status.filtered_metadata.value, pa.string())
    )
    error = pc.if_else(keep, pa.scalar("", pa.string()), pa.scalar(FILTERED_ERROR, pa.string()))
    drop = [c for c in where_columns(cfg) if c not in cfg.keep_cols and c in batch.column_names]
    out = batch.drop_columns(drop)
    for name, column in (("status", status), ("error", error)):
        if name in out.column_names:
            out = out.drop_columns([name])
        out = out.append_column(name, column)
    return out


def check_where_against_schema(cfg: Any, *, network: bool = False) -> None:
    """Check ``input.where`` against the input's schema (first file), where that is cheap.

    Reads a parquet file's footer, or the first block of a csv/tsv/jsonl file. Remote inputs
    (``hf://``, ``s3://``, ...) are only opened with ``network`` (a run, right before reading;
    ``--dry-run`` never touches the network). Raises :class:`UserError` naming the field.
    """
    if not cfg.where:
        return
    paths = [cfg.path] if isinstance(cfg.path, str) else list(cfg.path)
    if not network and any("://" in p and not p.startswith("file://") for p in paths):
        return
    schema = _first_file_schema(cfg)
    if schema is None:
        return
    for name in _special_columns(cfg):
        schema[name] = pa.string()  # the read stage hands these over as text
    try:
        compile_where(cfg.where, schema)
    except WhereError as err:
        raise UserError(f"input.where: {err}") from None


def _first_file_schema(cfg: Any) -> dict[str, pa.DataType] | None:
    import fsspec

    from capfilt.stages.read import list_input_files

    try:
        files = list_input_files(cfg.path, cfg.format)
    except UserError:
        return None  # a missing input is reported by the read stage, with its own message
    first = files[0]
    try:
        with fsspec.open(first, "rb", compression="infer") as stream:
            if cfg.format == "parquet":
                import pyarrow.parquet as pq

                schema = pq.ParquetFile(stream).schema_arrow
            elif cfg.format in ("csv", "tsv"):
                import pyarrow.csv as pacsv

                tsv = cfg.format == "tsv"
                options = pacsv.ParseOptions(delimiter="\t" if tsv else ",", quote_char=False if tsv else '"')
                schema = pacsv.open_csv(stream, parse_options=options).schema
            elif cfg.format == "jsonl":
                import pyarrow.json as pajson

                head = b"".join(stream.readline() for _ in range(1000))
                schema = pajson.read_json(pa.BufferReader(head)).schema
            else:
                return None  # webdataset: fields live in per-sample json; checked when evaluated
    except (OSError, pa.ArrowException) as err:
        raise UserError(
            f"input.path: cannot read the schema of {first}: {' '.join(str(err).split())[:300]}"
        ) from None
    return {field.name: field.type for field in schema}
