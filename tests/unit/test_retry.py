"""`--retry` row selection (capfilt/retry.py) and the crash-safe shard rewrite, without Ray."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt import retry
from capfilt.errors import UserError
from capfilt.rundir import ROW_COLUMN, SHARD_COLUMN, RunDir
from capfilt.stages import write


@pytest.mark.parametrize(
    ("status", "error", "expected"),
    [
        ("download_failed", "deadline: no complete response within timeout_s=10s (connect, ...)", True),
        ("download_failed", "deadline: batch not finished within 60s", True),
        ("download_failed", "cannot connect to example.com: [Errno 111] Connection refused", True),
        ("download_failed", "cannot resolve example.com: [Errno -2] Name or service not known", True),
        ("download_failed", "HTTP 503: Service Unavailable", True),
        ("download_failed", "HTTP 500: Internal Server Error", True),
        ("download_failed", "HTTP 429: Too Many Requests", True),
        ("download_failed", "HTTP 408: Request Timeout", True),
        ("download_failed", "HTTP 429: x; Retry-After 7200s exceeds download.retry_after_max_s=60", True),
        ("download_failed", "connection closed 100 bytes short", True),
        ("download_failed", "[Errno 104] Connection reset by peer", True),
        ("download_failed", "unreachable (HTTP 503: x), so nothing is fetched from this host", True),
        ("download_failed", "HTTP 404: Not Found", False),
        ("download_failed", "HTTP 403: Forbidden", False),
        ("download_failed", "HTTP 301 redirect without a Location", False),
        ("download_failed", "redirect loop", False),
        ("download_failed", "too many redirects (more than 10)", False),
        ("download_failed", "response headers exceed max_header_bytes=65536", False),
        ("decode_failed", "deadline: whatever", False),
        ("ok", "", False),
    ],
)
def test_is_transient(status: str, error: str, expected: bool) -> None:
    assert retry.is_transient(status, error) is expected


def test_parse_statuses() -> None:
    assert retry.parse_statuses("transient") == (frozenset(), True)
    assert retry.parse_statuses(" decode_failed, transient ,too_small") == (
        frozenset({"decode_failed", "too_small"}),
        True,
    )
    for bad in ("", "ok", "filtered_metadata", "nope", "transient,nope"):
        with pytest.raises(UserError):
            retry.parse_statuses(bad)


def test_retry_mask_combines_statuses_and_transient() -> None:
    status = ["ok", "download_failed", "download_failed", "decode_failed", "too_small"]
    error = ["", "HTTP 503: x", "HTTP 404: x", "not an image", "small"]
    assert retry.retry_mask(status, error, frozenset(), True).tolist() == [False, True, False, False, False]
    assert retry.retry_mask(status, error, frozenset({"decode_failed"}), False).tolist() == [
        False, False, False, True, False,
    ]  # fmt: skip
    both = retry.retry_mask(status, error, frozenset({"download_failed", "too_small"}), True)
    assert both.tolist() == [False, True, True, False, True]


def _rows(statuses: list[str], errors: list[str], images: list[bytes], rows: list[int]) -> pa.Table:
    return pa.table(
        {
            "key": [f"k{r}" for r in rows],
            "url": [f"http://h/{r}" for r in rows],
            "web_text": [f"text {r}" for r in rows],
            "status": statuses,
            "error": errors,
            "image": pa.array(images, type=pa.binary()),
            "web_kept": [s == "ok" for s in statuses],
            ROW_COLUMN: pa.array(rows, type=pa.int64()),
        }
    )


def _files(run: Path, shard: int) -> list[bytes]:
    return [
        p.read_bytes()
        for p in (
            write.images_path(run, shard),
            write.dataset_path(run, shard),
            write.samples_path(run, shard),
        )
    ]


def _setup(tmp_path: Path) -> tuple[RunDir, Path, list[str]]:
    """Shard 1 (rows 4-7) with two failed rows, and a part file holding their new rows."""
    root = tmp_path / "run"
    run = RunDir(root)
    old = _rows(["ok", "download_failed", "ok", "download_failed"], ["", "HTTP 503: x", "", "HTTP 404: y"],
                [b"img4", b"", b"img6", b""], [4, 5, 6, 7])  # fmt: skip
    write.write_shard(run, 1, old)
    new = _rows(["ok", "download_failed"], ["", "HTTP 404: y"], [b"new5", b""], [5, 7])
    new = new.append_column(SHARD_COLUMN, pa.array([1, 1], type=pa.int64()))
    part = write.write_parts(new, run=run).column("part").to_pylist()
    return run, root, part


def test_commit_retry_merges_and_keeps_untouched_rows(tmp_path: Path) -> None:
    run, root, parts = _setup(tmp_path)
    before = pq.read_table(write.samples_path(root, 1)).drop_columns(["web_itm"]).to_pylist()
    summary = retry.commit_retry(run, 1, parts, expected=2, rows_per_shard=4)
    assert summary["rows"] == 4 and summary["status"] == {"ok": 3, "download_failed": 1}
    after = pq.read_table(write.samples_path(root, 1)).drop_columns(["web_itm"]).to_pylist()
    assert [r["key"] for r in after] == ["k4", "k5", "k6", "k7"]
    assert after[0] == before[0] and after[2] == before[2]
    assert after[1]["status"] == "ok" and after[3]["error"] == "HTTP 404: y"
    members = write.read_dataset(root, with_images=True).to_pylist()
    assert {m["key"]: m["image"] for m in members} == {"k4": b"img4", "k5": b"new5", "k6": b"img6"}
    # The new commit record verifies (resume trusts the rewritten shard).
    from capfilt.rundir import verify_shard

    assert verify_shard(run, 1, 4) is None
    assert not (root / "_retry" / "shard-00001").exists() and not any(Path(p).exists() for p in parts)
    # A repeated commit (Ray retried the task after it finished) only reports.
    again = retry.commit_retry(run, 1, parts, expected=2, rows_per_shard=4)
    assert again["status"] == summary["status"]


def test_crash_leaves_old_or_new_shard_and_converges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Reference: an uninterrupted retry.
    run, root, parts = _setup(tmp_path / "a")
    retry.commit_retry(run, 1, parts, expected=2, rows_per_shard=4)
    reference = _files(root, 1)

    # Crash while staging (before the staged samples file): the old shard stays, staging is dropped.
    run, root, parts = _setup(tmp_path / "b")
    old_files = _files(root, 1)
    real_write = run.write_atomic

    def failing(path: str, write_fn):  # noqa: ANN001, ANN202
        if "/_retry/" in path and "/samples/" in path:
            raise OSError("killed")
        return real_write(path, write_fn)

    monkeypatch.setattr(run, "write_atomic", failing)
    with pytest.raises(OSError):
        retry.commit_retry(run, 1, parts, expected=2, rows_per_shard=4)
    monkeypatch.undo()
    assert retry.finish_staged(run) == []
    assert _files(root, 1) == old_files and not (root / "_retry").exists()
    retry.commit_retry(run, 1, parts, expected=2, rows_per_shard=4)  # the rerun converges
    assert _files(root, 1) == reference

    # Crash while publishing (tar moved, samples not yet): recovery finishes the moves.
    run, root, parts = _setup(tmp_path / "c")
    real_publish = retry._publish

    def half_publish(run_: RunDir, shard: int) -> None:
        run_.fs.mv(retry._stage_path(run_, shard, "images"), run_.shard_path("images", shard))
        raise OSError("killed")

    monkeypatch.setattr(retry, "_publish", half_publish)
    with pytest.raises(OSError):
        retry.commit_retry(run, 1, parts, expected=2, rows_per_shard=4)
    monkeypatch.setattr(retry, "_publish", real_publish)
    assert retry.finish_staged(run) == [1]
    assert _files(root, 1) == reference
    assert hashlib.sha256(_files(root, 1)[0]).digest() == hashlib.sha256(reference[0]).digest()
