"""Errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, for every way a request can
fail: the API's own errors, FastAPI's validation errors (its 422 becomes OpenAI's 400), unknown routes, and
bugs (a 500 that is logged; the server keeps serving)."""

from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from chattune.serving.schemas import RequestError

log = logging.getLogger("chattune")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)


def from_validation(exc: RequestValidationError) -> APIError:
    """FastAPI's 422 as OpenAI's 400, naming the first bad field as `param` (e.g. messages.0.role)."""
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON")
    param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    msg = first.get("msg", "invalid value")
    return APIError(400, f"{param}: {msg}" if param else msg, param=param)


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(request, exc: APIError):
        return error_response(exc)

    async def invalid(request, exc: RequestValidationError):
        return error_response(from_validation(exc))

    async def bad_request(request, exc: RequestError):
        return error_response(APIError(400, str(exc), param=exc.param, code=exc.code))

    async def http_error(request, exc: StarletteHTTPException):
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(APIError(exc.status_code, str(exc.detail), type_))

    async def crash(request, exc: Exception):  # a bug must not take the server down: log it, answer 500
        log.error("unexpected %s answering %s: %s", type(exc).__name__, request.url.path, exc)
        return error_response(APIError(500, f"internal error: {type(exc).__name__}", "server_error"))

    for cls, handler in ((APIError, api_error), (RequestValidationError, invalid), (RequestError, bad_request),
                         (StarletteHTTPException, http_error), (Exception, crash)):
        app.add_exception_handler(cls, handler)
