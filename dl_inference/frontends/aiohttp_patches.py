"""Workarounds for aiohttp, installed explicitly (:func:`install`, by the HTTP frontend at start-up)
rather than as import side effects. Each names what it changes and why; each checks that the aiohttp
object it wraps is there (``aiohttp`` 3.x; the floor in pyproject is 3.13.3) and leaves aiohttp alone
otherwise, so an aiohttp that changed shape degrades to its own behaviour, never to an error.

1. Client errors in one log line: aiohttp logs a request that is the client's fault (malformed HTTP,
   an undecodable body) as an ERROR with a traceback; a client could fill the log that way.
2. Its own 4xx answers as this server's JSON errors: aiohttp answers a request it cannot parse itself,
   in text/plain; tritonclient expects ``{"error": "..."}``. aiohttp has no hook for this.
3. A ``deflate`` body whose stream does not end where the body does: the error reached the parser but
   not the handler's reader, which then waited forever (not reported upstream that we know of; seen
   with aiohttp 3.13).
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import http_exceptions, http_parser, web, web_protocol

from dl_inference.protocol.http_codec import render_error

_ORIGINAL_HANDLE_ERROR = getattr(web_protocol.RequestHandler, "handle_error", None)
_installed = False


def _client_http_errors_in_one_line(record: logging.LogRecord) -> bool:
    """Filter for aiohttp's server logger: a request that is the client's fault and already answered
    4xx is logged as one INFO line, not as an ERROR with a traceback. Those are: malformed HTTP
    (bad headers, an unsupported Content-Encoding such as zstd) that aiohttp answers itself, and a
    body that does not decompress, which aiohttp drains again after the handler answered it 400
    ("Unhandled exception"). A client could otherwise fill the log with a traceback per request."""
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, web_protocol.RequestPayloadError) or (
        isinstance(exc, http_exceptions.HttpProcessingError) and 400 <= (exc.code or 0) < 500
    ):
        if isinstance(exc, web_protocol.RequestPayloadError):
            text = f"client error (answered 400): the request body could not be read: {exc}"
        else:
            text = f"client error (answered {exc.code} by aiohttp): {record.getMessage()}: {exc}"
        record.msg = " ".join(text.split())
        record.args = ()
        record.exc_info = None
        record.exc_text = None
        record.levelno = logging.INFO
        record.levelname = "INFO"
    return True


def _handle_error_as_json(
    self: web_protocol.RequestHandler,
    request: Any,
    status: int = 500,
    exc: BaseException | None = None,
    message: str | None = None,
) -> web.StreamResponse:
    """aiohttp answers a request it cannot parse (bad headers, a Content-Encoding it cannot decode
    while parsing, such as zstd without its decoder or a corrupt deflate body) itself, before any
    handler or middleware, with a text/plain body. Keep everything it does (logging, closing the
    connection) but answer 4xx like every other error of this server: ``{"error": "..."}``, which
    tritonclient parses. aiohttp offers no hook for this, so its method is wrapped."""
    assert _ORIGINAL_HANDLE_ERROR is not None  # install() wraps only when aiohttp has it
    response: web.StreamResponse = _ORIGINAL_HANDLE_ERROR(self, request, status, exc, message)
    if not 400 <= status < 500:
        return response
    detail = exc.message if isinstance(exc, http_exceptions.HttpProcessingError) else message
    if isinstance(exc, http_exceptions.ContentEncodingError):
        text = f"cannot decode the request body: {detail}"
    else:
        text = f"malformed HTTP request: {detail or status}"
    answer = web.Response(body=render_error(text), status=status, content_type="application/json")
    answer.force_close()
    return answer


def _deflate_eof_error_reaches_the_reader() -> None:
    """aiohttp workaround: a ``deflate`` body whose stream does not end where the body does fails in
    the parser only at the body's end (``DeflateBuffer.feed_eof``). When the request was already
    handed to its handler (body in a later TCP segment than the headers), that error never reached
    the handler's reader, which then waited for the rest of the body forever. Set the error on the
    reader too, as aiohttp does for errors in the middle of a body: the handler answers 400."""
    buffer_cls = getattr(http_parser, "DeflateBuffer", None)
    original = getattr(buffer_cls, "feed_eof", None)
    if original is None or getattr(original, "_dl_inference", False):
        return

    def feed_eof(self: Any) -> None:
        try:
            original(self)
        except http_exceptions.ContentEncodingError as exc:
            error = web_protocol.RequestPayloadError(str(exc))
            error.__cause__ = exc
            self.out.set_exception(error, exc)
            raise

    feed_eof._dl_inference = True  # type: ignore[attr-defined]
    setattr(buffer_cls, "feed_eof", feed_eof)  # noqa: B010


def install() -> None:
    """Apply the workarounds (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    logging.getLogger("aiohttp.server").addFilter(_client_http_errors_in_one_line)
    if _ORIGINAL_HANDLE_ERROR is not None:
        setattr(web_protocol.RequestHandler, "handle_error", _handle_error_as_json)  # noqa: B010
    _deflate_eof_error_reaches_the_reader()
