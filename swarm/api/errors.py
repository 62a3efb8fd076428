"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the matching status."""

from __future__ import annotations

from starlette.responses import JSONResponse

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """A request the API answers with an OpenAI error object instead of a result."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code)

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def invalid(param: str, message: str) -> APIError:
    """A 400 that names the offending field."""
    return APIError(400, f"{param}: {message}", param=param, code="invalid_value")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "server_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(status: int, message: str, param: str | None = None, code: str | None = None):
    return JSONResponse(error_body(status, message, param, code), status_code=status)
