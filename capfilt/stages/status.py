"""The one status enum of a sample: what happened to an input row.

Every input row ends up in ``samples/*.parquet`` with exactly one of these values in its
``status`` column (and a human-readable ``error``, empty when ok), so failures are data
rather than crashes or silently missing rows. The stored value is the member's string.

Decisions recorded here because the README lists them:

* Duplicate URLs are not a status. Each row downloads independently, so every row is
  accounted for on its own and the result does not depend on how rows were batched or
  distributed. Content duplicates (also across different URLs) can be found afterwards
  from the ``sha256`` column the download stage writes.
* An empty or missing web text is not a status either: the image is still worth
  captioning, and the captioner writes synthetic captions for it. The row keeps
  ``web_text == ""`` and later stages never keep an empty web text.
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    """Outcome of one sample; a ``str`` subclass, so ``Status.ok == "ok"`` as stored in parquet.

    ``Status.X.description`` is the one-line explanation the README and reports print.
    """

    ok = "ok"
    filtered_metadata = "filtered_metadata"
    invalid_url = "invalid_url"
    download_failed = "download_failed"
    blocked_address = "blocked_address"
    opted_out = "opted_out"
    decode_failed = "decode_failed"
    too_small = "too_small"
    too_large = "too_large"
    caption_failed = "caption_failed"
    filter_failed = "filter_failed"
    clip_failed = "clip_failed"

    @property
    def description(self) -> str:
        """One line saying when a row gets this status."""
        return _DESCRIPTIONS[self]


_DESCRIPTIONS: dict[Status, str] = {
    Status.ok: "image downloaded, decoded and resized; the model stages that ran succeeded",
    Status.filtered_metadata: "input.where rejected the row's metadata (or it was null); never downloaded",
    Status.invalid_url: "URL empty, null, unparsable, with credentials (user:pw@) or not http(s) "
    "(file://, ftp://, data: are refused)",
    Status.download_failed: "HTTP error status, deadline (timeout_s per request, batch_timeout_s per batch), "
    "redirect loop or too many redirects, network error, Retry-After over the cap, robots.txt unreachable",
    Status.blocked_address: "the host (or a redirect hop) resolves to a loopback, private, link-local, CGNAT or "
    "other non-global address; see download.allowed_hosts and download.allow_private_networks",
    Status.opted_out: "an X-Robots-Tag header (on any redirect hop) carries a disallowed directive (noai, "
    "noimageai, ...), or robots.txt disallows the URL (download.robots_txt: true)",
    Status.decode_failed: "body empty, not an image, truncated or corrupt",
    Status.too_small: "the image's smaller side is below download.min_image_size",
    Status.too_large: "body over download.max_bytes, more pixels than download.max_pixels (read from the "
    "header, before decoding), or out of memory while decoding",
    Status.caption_failed: "the captioner raised on this sample (its image was fine)",
    Status.filter_failed: "the filter raised on this sample (its image and captions were fine)",
    Status.clip_failed: "the CLIP scorer raised on this sample (its image and captions were fine)",
}
