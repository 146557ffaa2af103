"""Read ``multipart/form-data`` uploads into memory as they stream in; nothing touches disk.

Starlette's form parser spools files over 1 MiB to temporary files, and uploaded X-rays must
never be written to disk, so the body is fed to python-multipart's streaming parser here and
only the parts of the wanted field are kept, as bytes. The body size is bounded upstream by
:class:`pneumonia.serve.middleware.BodyLimitMiddleware`, so memory is bounded too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import anyio
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from pneumonia.serve.errors import ApiError

#: File names are echoed back, shortened to this many characters.
MAX_FILENAME_CHARS = 255
#: Status recorded when the client disconnects mid-upload (nginx's non-standard 499).
CLIENT_CLOSED_REQUEST = 499
# Parts of other fields are skipped but still counted, so a body of many tiny parts is bounded.
_EXTRA_PARTS = 16
# Control characters (C0, DEL and C1), Unicode line and paragraph separators, and the
# bidirectional controls that make "x\u202egpj.exe" display as "xexe.jpg".
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


@dataclass(frozen=True)
class Upload:
    """One uploaded file: the name the client gave it (base name only) and its bytes."""

    filename: str
    data: bytes


@dataclass
class _Part:
    name: str = ""
    filename: str = ""
    keep: bool = False
    data: bytearray = field(default_factory=bytearray)


def clean_filename(raw: str) -> str:
    """The base name of a client-supplied file name, shortened, without control or
    bidirectional-control characters, and never ``..``."""
    name = PurePosixPath(_UNSAFE.sub("", raw).replace("\\", "/")).name[:MAX_FILENAME_CHARS]
    return "" if name == ".." else name


def _usage(field_name: str) -> str:
    return (
        f'send multipart/form-data with the image in the field "{field_name}", '
        f'e.g. curl -F "{field_name}=@chest_xray.jpeg"'
    )


class _Collector:
    """python-multipart callbacks that keep the wanted field's parts in memory."""

    def __init__(self, field_name: str, max_files: int) -> None:
        self.field_name = field_name
        self.max_files = max_files
        self.kept: list[_Part] = []
        self.other_names: list[str] = []
        self.parts = 0
        self.complete = False
        self._part = _Part()
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition = b""

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > self.max_files + _EXTRA_PARTS:
            raise ApiError(
                400, "too_many_parts", "the form has too many fields; " + _usage(self.field_name)
            )
        self._part = _Part()
        self._disposition = b""

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if bytes(self._header_name).lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name", b"").decode("utf-8", errors="replace")
        self._part.name = name
        self._part.filename = clean_filename(
            options.get(b"filename", b"").decode("utf-8", errors="replace")
        )
        if name == self.field_name:
            if len(self.kept) >= self.max_files:
                raise ApiError(
                    400,
                    "too_many_files",
                    f'at most {self.max_files} file(s) in the field "{self.field_name}" per request'
                    + (
                        "; use POST /predict/batch for several images"
                        if self.max_files == 1
                        else ""
                    ),
                )
            self._part.keep = True
            self.kept.append(self._part)
        elif name and len(self.other_names) < 5:
            self.other_names.append(name[:40])

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part.keep:
            self._part.data += data[start:end]

    def on_end(self) -> None:
        self.complete = True


async def read_uploads(
    request: Request, field_name: str, max_files: int, timeout_s: float
) -> list[Upload]:
    """Stream the request body through a multipart parser, keeping ``field_name``'s files.

    Args:
        request: The incoming request (its body is consumed).
        field_name: The form field holding the images.
        max_files: Most parts of that field accepted; one more is an error straight away.
        timeout_s: Longest the client may take to send the whole body.

    Returns:
        The files in the order sent; at least one (an upload may still be empty).

    Raises:
        ApiError: not multipart or no such field (400 ``missing_file``), malformed (400
            ``invalid_multipart``),
            too many files (400 ``too_many_files``), too slow (408 ``upload_timeout``), the
            client went away (499 ``client_disconnected``).
    """
    ctype, options = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data":
        raise ApiError(400, "missing_file", f"no file in the request; {_usage(field_name)}")
    boundary = options.get(b"boundary")
    if not boundary:
        raise ApiError(
            400, "invalid_multipart", f"the multipart body has no boundary; {_usage(field_name)}"
        )
    collector = _Collector(field_name, max_files)
    try:
        parser = MultipartParser(
            boundary,
            {
                "on_part_begin": collector.on_part_begin,
                "on_part_data": collector.on_part_data,
                "on_header_field": collector.on_header_field,
                "on_header_value": collector.on_header_value,
                "on_header_end": collector.on_header_end,
                "on_headers_finished": collector.on_headers_finished,
                "on_end": collector.on_end,
            },
        )
        with anyio.fail_after(timeout_s):
            async for chunk in request.stream():
                parser.write(chunk)
        parser.finalize()
    except TimeoutError:
        raise ApiError(
            408,
            "upload_timeout",
            f"the upload took longer than {timeout_s:g} s; retry on a faster connection",
        ) from None
    except FormParserError:
        raise ApiError(
            400, "invalid_multipart", f"the multipart body is malformed; {_usage(field_name)}"
        ) from None
    except ClientDisconnect:
        # Nobody is left to answer. Counted and logged as 499 (nginx's "client closed request"),
        # not as an unhandled server error with a traceback.
        raise ApiError(
            CLIENT_CLOSED_REQUEST,
            "client_disconnected",
            "the client closed the connection before the upload was complete",
        ) from None
    if not collector.complete:
        # A body cut off before the closing boundary would otherwise yield a truncated file.
        raise ApiError(
            400,
            "invalid_multipart",
            "the multipart body ended before its closing boundary (upload interrupted?); "
            + _usage(field_name),
        )
    if not collector.kept:
        found = (
            f" (found fields: {', '.join(repr(n) for n in collector.other_names)})"
            if collector.other_names
            else ""
        )
        raise ApiError(
            400, "missing_file", f'no file in the field "{field_name}"{found}; {_usage(field_name)}'
        )
    return [Upload(p.filename, bytes(p.data)) for p in collector.kept]
