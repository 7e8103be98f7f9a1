"""Error bodies in the shape of the API the client speaks, so its SDK can parse them.

Each API's shape is its dialect module's `error_body` (OpenAI-style APIs: `{"error":
{"message", "type", "param", "code"}}`; Anthropic: `{"type": "error", "error": {"type",
"message"}}`; Ollama: `{"error": "message"}`). Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from tallygate.core.dialects import ERROR_BODIES, ApiFamily


@dataclass(frozen=True, slots=True)
class ProxyError:
    """An error tallygate itself answers with, before any upstream byte reached the client."""

    status: int
    message: str
    type: str
    code: str

    def body(self, family: ApiFamily) -> bytes:
        return ERROR_BODIES[family](self.status, self.message, self.type, self.code)


def unauthorized() -> ProxyError:
    return ProxyError(
        401, "a valid API key is required", "invalid_request_error", "invalid_api_key"
    )


def cors_refused(origin: str, method: str) -> ProxyError:
    return ProxyError(
        403,
        f"cross-origin {method} from {origin} is not allowed by tallygate's `cors:` settings",
        "invalid_request_error",
        "cors_refused",
    )


def no_route(path: str) -> ProxyError:
    return ProxyError(404, f"no route for {path}", "invalid_request_error", "route_not_found")


def too_large(limit: int) -> ProxyError:
    return ProxyError(
        413, f"request body exceeds {limit} bytes", "invalid_request_error", "request_too_large"
    )


def not_a_proxy(what: str) -> ProxyError:
    return ProxyError(
        400,
        f"{what} is refused: tallygate is a reverse proxy, not an open proxy",
        "invalid_request_error",
        "not_an_open_proxy",
    )


def method_refused(method: str) -> ProxyError:
    return ProxyError(
        405,
        f"method {method} is refused: tallygate is not an open proxy",
        "invalid_request_error",
        "method_not_allowed",
    )


def upstream_unreachable(upstream: str, reason: str) -> ProxyError:
    return ProxyError(
        502,
        f"upstream '{upstream}' is unreachable: {reason}",
        "upstream_error",
        "upstream_unreachable",
    )


def upstream_invalid(upstream: str) -> ProxyError:
    return ProxyError(
        502, f"upstream '{upstream}' sent an invalid HTTP response", "upstream_error",
        "upstream_invalid_response",
    )  # fmt: skip


def upstream_timeout(upstream: str, which: str, seconds: float) -> ProxyError:
    return ProxyError(
        504,
        f"upstream '{upstream}' timed out ({which} after {seconds:g}s)",
        "upstream_error",
        "upstream_timeout",
    )


# Requests that never reached the handler (connection.py): what each refusal says.
_UNPARSED = {
    "header_timeout": "the request head did not arrive within {limit:g}s",
    "request_line_too_long": "the request line is longer than {limit:g} bytes",
    "headers_too_large": "a request header line is longer than {limit:g} bytes",
    "too_many_headers": "the request has more than {limit:g} headers",
    # The parser's own message is not repeated: it may quote a header, and so a key.
    "bad_request": "the request is not valid HTTP/1.1",
}


def unparsed(status: int, reason: str, limit: float) -> ProxyError:
    return ProxyError(
        status, _UNPARSED[reason].format(limit=limit), "invalid_request_error", reason
    )


def body_timeout(seconds: float) -> ProxyError:
    return ProxyError(
        408, f"the request body did not arrive within {seconds:g}s",
        "invalid_request_error", "body_timeout",
    )  # fmt: skip


def path_refused(why: str) -> ProxyError:
    return ProxyError(400, f"the request path is refused: {why}", "invalid_request_error",
                      "path_refused")  # fmt: skip


def overloaded(what: str, limit: int) -> ProxyError:
    return ProxyError(
        503, f"tallygate is at its limit of {limit} {what.replace('_', ' ')}; retry later",
        "server_error", f"too_many_{what}",
    )  # fmt: skip
