"""Slides into the service: streamed uploads into a content-addressed store, and references by path.

Uploads are written as they arrive (never held in memory) to ``<store>/.incoming/<random>.part``
with a running sha256 and byte count; past the size cap the file is deleted and 413 is raised while
streaming; a client checksum (``X-Content-SHA256: <hex>`` or RFC 9530 ``Content-Digest:
sha-256=:<base64>:``) is verified; then the file is fsynced and atomically renamed to
``<store>/<sha[:2]>/<sha><ext>``. Any failure, a client disconnect included, deletes the part file.
Only the file's extension is kept from a client-given name: names can carry patient data.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import os
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from python_multipart import MultipartParser
from python_multipart.multipart import parse_options_header

from service.errors import (
    ChecksumMismatchUploadError,
    EmptyUploadError,
    InvalidRequestError,
    SlideReferenceError,
    UploadTooLargeError,
)
from xmag.errors import SlideNotFoundError

__all__ = [
    "IncomingFile",
    "StoredSlide",
    "expected_sha256",
    "receive_multipart",
    "receive_raw",
    "resolve_reference",
    "safe_extension",
    "stored_slide_path",
]

_EXT_RE = re.compile(r"^\.[a-z0-9]{1,8}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class StoredSlide:
    """An uploaded slide in the store.

    Attributes:
        sha256: hex digest of the bytes (the slide id).
        size_bytes: file size.
        path: where it is stored.
        ext: kept extension (``.svs``) or ``""``.
        deduplicated: True when identical bytes were already stored.
        filename: the client's file name (multipart uploads; the API keeps it per client).
    """

    sha256: str
    size_bytes: int
    path: Path
    ext: str
    deduplicated: bool
    filename: str | None = None


def safe_extension(filename: str | None) -> str:
    """The lower-cased extension of a client file name when it is short and plain, else ``""``."""
    if not filename:
        return ""
    name = filename.replace("\\", "/").rsplit("/", 1)[-1].lower()
    for compound in (".ome.tiff", ".ome.tif"):
        if name.endswith(compound):
            return compound
    ext = os.path.splitext(name)[1]
    return ext if _EXT_RE.match(ext) else ""


def stored_slide_path(store: Path, sha256: str, ext: str) -> Path:
    return store / sha256[:2] / f"{sha256}{ext}"


def expected_sha256(headers: dict[str, str]) -> str | None:
    """The client's checksum from ``X-Content-SHA256`` (hex) or ``Content-Digest`` (sha-256).

    Raises:
        InvalidRequestError: for a malformed checksum header.
    """
    hex_value = headers.get("x-content-sha256")
    if hex_value is not None:
        hex_value = hex_value.strip().lower()
        if not _HEX64.match(hex_value):
            raise InvalidRequestError("X-Content-SHA256 must be 64 hexadecimal characters.")
        return hex_value
    digest = headers.get("content-digest")
    # RFC 9530: a recipient ignores the algorithms it does not support; only sha-256 is checked.
    if digest is not None and "sha-256" in digest.lower():
        match = re.search(r"sha-256=:([A-Za-z0-9+/=]+):", digest)
        if not match:
            raise InvalidRequestError(
                "Content-Digest must hold a sha-256 entry (RFC 9530: `sha-256=:<base64>:`)."
            )
        try:
            raw = base64.b64decode(match.group(1), validate=True)
        except ValueError as exc:
            raise InvalidRequestError("Content-Digest sha-256 is not valid base64.") from exc
        if len(raw) != 32:
            raise InvalidRequestError("Content-Digest sha-256 must decode to 32 bytes.")
        return raw.hex()
    return None


class IncomingFile:
    """A part file being written: counts bytes, hashes them and enforces the cap.

    Args:
        store: the slide store folder.
        max_bytes: size cap (bytes).
    """

    def __init__(self, store: Path, max_bytes: int) -> None:
        incoming = store / ".incoming"
        incoming.mkdir(parents=True, exist_ok=True)
        self.part = incoming / f"{uuid.uuid4().hex}.part"
        self.store = store
        self.max_bytes = max_bytes
        self.size = 0
        self.sha = hashlib.sha256()
        self._file = open(self.part, "xb")  # noqa: SIM115 - closed in commit/discard

    def write(self, chunk: bytes) -> None:
        """Append a chunk. Raises UploadTooLargeError past the cap."""
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise UploadTooLargeError(
                f"The upload exceeds the {self.max_bytes}-byte limit; send a smaller slide or "
                "submit it by reference (a path under XMAG_SLIDE_ROOTS)."
            )
        self.sha.update(chunk)
        self._file.write(chunk)

    def commit(self, expected: str | None, ext: str) -> StoredSlide:
        """Verify, fsync and atomically move into the store.

        Raises:
            EmptyUploadError, ChecksumMismatchUploadError.
        """
        if self.size == 0:
            raise EmptyUploadError("The upload is empty; send the slide file's bytes as the body.")
        digest = self.sha.hexdigest()
        if expected is not None and expected != digest:
            raise ChecksumMismatchUploadError(
                f"The upload's sha256 is {digest} but the client announced {expected}; the bytes "
                "were damaged or the checksum is of another file. Upload again."
            )
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = stored_slide_path(self.store, digest, ext)
        final.parent.mkdir(parents=True, exist_ok=True)
        deduplicated = final.exists()
        if deduplicated:
            self.part.unlink()
        else:
            os.replace(self.part, final)
            dir_fd = os.open(final.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return StoredSlide(digest, self.size, final, ext, deduplicated)

    def discard(self) -> None:
        """Close and delete the part file (no partial file stays)."""
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self.part.unlink()


async def receive_raw(
    chunks: AsyncIterator[bytes],
    store: Path,
    *,
    max_bytes: int,
    expected: str | None,
    ext: str,
) -> StoredSlide:
    """Stream a raw request body into the store (PUT /v1/slides)."""
    incoming = IncomingFile(store, max_bytes)
    try:
        async for chunk in chunks:
            if chunk:
                incoming.write(chunk)
        return incoming.commit(expected, ext)
    except BaseException:
        incoming.discard()
        raise


@dataclass
class _PartState:
    """What the multipart callbacks have seen so far: the current part's headers, whether its data
    goes to the file, and the first ``file`` part's client filename (only its extension is kept)."""

    header: bytes = b""
    value: bytes = b""
    headers: dict[bytes, bytes] = field(default_factory=dict)
    in_file: bool = False
    found_file: bool = False
    filename: str | None = None


async def receive_multipart(
    chunks: AsyncIterator[bytes],
    content_type: str,
    store: Path,
    *,
    max_bytes: int,
    expected: str | None,
) -> StoredSlide:
    """Stream the ``file`` part of a multipart/form-data body into the store (POST /v1/slides).

    The body is parsed incrementally, so neither the file nor the form is ever held whole.

    Raises:
        InvalidRequestError: when the body is not multipart or has no ``file`` part.
    """
    ctype, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise InvalidRequestError("POST /v1/slides needs multipart/form-data with a `file` part.")
    incoming = IncomingFile(store, max_bytes)
    part = _PartState()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        part.header += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        part.value += data[start:end]

    def on_header_end() -> None:
        part.headers[part.header.lower()] = part.value
        part.header, part.value = b"", b""

    def on_headers_finished() -> None:
        _, disp = parse_options_header(part.headers.get(b"content-disposition", b""))
        part.in_file = disp.get(b"name") == b"file" and not part.found_file
        if part.in_file:
            part.found_file = True
            name = disp.get(b"filename")
            part.filename = name.decode(errors="replace") if name else None
        part.headers = {}

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if part.in_file:
            incoming.write(data[start:end])

    def on_part_end() -> None:
        part.in_file = False

    parser = MultipartParser(
        boundary,
        {
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    try:
        async for chunk in chunks:
            if chunk:
                parser.write(chunk)
        parser.finalize()
        if not part.found_file:
            raise InvalidRequestError(
                "The multipart body has no `file` part; name the part `file`."
            )
        stored = incoming.commit(expected, safe_extension(part.filename))
        return dataclasses.replace(stored, filename=part.filename)
    except UploadTooLargeError:
        incoming.discard()
        raise
    except Exception as exc:
        incoming.discard()
        if isinstance(exc, ChecksumMismatchUploadError | EmptyUploadError | InvalidRequestError):
            raise
        raise InvalidRequestError(f"The multipart body could not be parsed: {exc}") from exc
    except BaseException:
        incoming.discard()
        raise


def resolve_reference(reference: str, roots: list[Path]) -> Path:
    """Resolve a by-reference slide (a path or ``file://`` URI) inside the allowed roots.

    Relative paths are tried against each root in order. ``..`` components, NUL bytes, schemes other
    than ``file``, and paths that leave every root once symlinks are followed are refused.

    Returns:
        The resolved real path (a file, or a folder for a DICOM set).

    Raises:
        SlideReferenceError: refused reference (422).
        SlideNotFoundError: nothing at the path (422).
    """
    if not roots:
        raise SlideReferenceError(
            "Slides by reference are disabled: set XMAG_SLIDE_ROOTS to the folders they may come "
            "from, or upload the slide with PUT /v1/slides."
        )
    if "\x00" in reference:
        raise SlideReferenceError("The slide path contains a NUL byte.")
    raw = reference
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", reference):
        parsed = urlparse(reference)
        if parsed.scheme.lower() != "file":
            raise SlideReferenceError(
                f"The scheme {parsed.scheme!r} is not supported for slide references; give a path "
                "or a file:// URI under XMAG_SLIDE_ROOTS, or upload the slide."
            )
        if parsed.netloc not in ("", "localhost"):
            raise SlideReferenceError("file:// URIs must name a local path (no host).")
        raw = unquote(parsed.path)
    candidate = Path(raw)
    if ".." in candidate.parts:
        raise SlideReferenceError(
            "The slide path contains '..'; give the path under XMAG_SLIDE_ROOTS without '..'."
        )
    real_roots = [Path(root).resolve() for root in roots]
    lexical_roots = real_roots + [Path(os.path.abspath(root)) for root in roots]
    if candidate.is_absolute() and not any(candidate.is_relative_to(r) for r in lexical_roots):
        raise SlideReferenceError(
            "The slide path is outside XMAG_SLIDE_ROOTS; give a path under an allowed root."
        )
    tries = [candidate] if candidate.is_absolute() else [root / candidate for root in real_roots]
    for path in tries:
        try:
            real = path.resolve(strict=True)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except (OSError, RuntimeError) as exc:  # symlink loops, permission errors
            raise SlideReferenceError(f"The slide path cannot be resolved: {exc}.") from exc
        if not any(real == root or real.is_relative_to(root) for root in real_roots):
            raise SlideReferenceError(
                "The slide path resolves outside XMAG_SLIDE_ROOTS (a symlink or an absolute path "
                "elsewhere); move the slide under an allowed root."
            )
        if not (real.is_file() or real.is_dir()):
            raise SlideReferenceError("The slide path is neither a file nor a folder.")
        return real
    raise SlideNotFoundError(
        "No slide at the given path under XMAG_SLIDE_ROOTS; check the path.", path=reference
    )
