"""What a request must be before `daulat serve` reads it: the Host check of a keyless server (against
DNS rebinding), the API key (constant-time), JSON bodies only, the size limit, and JSON that parses
to usable text (no lone surrogates, bounded nesting)."""

import hmac
import ipaddress
import json
from dataclasses import dataclass

from daulat.infer.api import APIError, ServerState, bad_value, error_response


@dataclass(frozen=True)
class HostCheck:
    """The `Host` headers a keyless server answers, against DNS rebinding (as Jupyter checks them).

    A web page from another site can make the browser send requests to 127.0.0.1, but they carry
    its own host name in `Host` (after the attacker's DNS points that name here). Accepted: localhost
    names and IP literals that are loopback or the bound address (any IP literal when bound to every
    interface: a literal cannot be rebound), with the bound port or none, and the names in `names`.
    """

    bound_host: str
    port: int
    names: frozenset[str] = frozenset()

    def allows(self, header: bytes | None) -> bool:
        host = (header or b"").decode("latin-1").strip().lower()
        if host.startswith("["):  # [v6]:port
            name, _, rest = host[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else None
        else:
            name, _, port = host.partition(":") if host.count(":") == 1 else (host, "", "")
            port = port or None
        name = name.rstrip(".")
        if name in self.names:
            return True
        if port is not None and port != str(self.port):
            return False
        if name in ("localhost", self.bound_host.lower()) or name.endswith(".localhost"):
            return True
        address, bound = _ip(name), _ip(self.bound_host)
        if address is None:
            return False
        return address.is_loopback or address == bound or (bound is not None and bound.is_unspecified)


def _ip(text: str):
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


class Guard:
    """ASGI middleware: the Host check of a keyless server; for /v1/*, the API key (constant-time
    compare), JSON bodies only (a cross-site form or `text/plain` POST is refused) and the size limit."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            error = self._check_host(headers.get(b"host"))
            if error is None and scope["path"].startswith("/v1/"):
                error = (self._check_key(headers.get(b"authorization"))
                         or self._check_type(scope["method"], headers.get(b"content-type"))
                         or self._check_size(headers.get(b"content-length")))
            if error is not None:
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _check_host(self, header: bytes | None) -> APIError | None:
        hosts = self.state.hosts
        if self.state.api_keys or hosts is None or hosts.allows(header):
            return None
        return APIError(403, f"this server does not answer for the host {(header or b'').decode('latin-1')!r}: "
                             "use localhost or its address, set an API key, or name the host with --allowed-host",
                        type="permission_error", code="host_not_allowed")

    @staticmethod
    def _check_type(method: str, header: bytes | None) -> APIError | None:
        if method != "POST":
            return None
        media_type = (header or b"").split(b";")[0].strip().lower()
        if media_type != b"application/json":
            return APIError(415, "the request body must be JSON, sent with 'Content-Type: application/json'",
                            code="unsupported_media_type")
        return None

    def _check_key(self, header: bytes | None) -> APIError | None:
        keys = self.state.api_keys
        if not keys:
            return None
        scheme, _, given = (header or b"").partition(b" ")
        if scheme.lower() != b"bearer" or not given.strip():
            return APIError(401, "missing API key: send the header 'Authorization: Bearer KEY'", code="invalid_api_key")
        given = given.strip()
        matched = False
        for key in keys:  # compare with every key, so the time taken says nothing about which matched
            matched |= hmac.compare_digest(given, key)
        if not matched:
            return APIError(401, "incorrect API key provided", code="invalid_api_key")
        return None

    def _check_size(self, header: bytes | None) -> APIError | None:
        try:
            size = int(header) if header is not None else 0
        except ValueError:
            return APIError(400, "invalid Content-Length header")
        if size > self.state.limits.max_body_bytes:
            return _too_large(self.state.limits.max_body_bytes)
        return None


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body is larger than the limit of {limit} bytes", code="request_too_large")


async def read_json(request, state: ServerState) -> dict:
    limit, chunks, size = state.limits.max_body_bytes, [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, f"the request body nests deeper than {MAX_DEPTH} levels", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    check_json_text(body)
    return body


MAX_DEPTH = 64  # nesting levels a request body may have (a chat request needs 5)


def check_json_text(body) -> None:
    """Refuse what JSON allows but the server cannot use: strings with lone surrogates (`"\\ud800"` is
    valid JSON but not Unicode, and cannot be tokenized) and nesting beyond MAX_DEPTH. Iterative,
    so no body can exhaust the stack."""
    stack = [("", body, 0)]
    while stack:
        path, value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise APIError(400, f"the request body nests deeper than {MAX_DEPTH} levels", code="invalid_json")
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise bad_value(path or None, f"{path or 'a key'} contains a lone UTF-16 surrogate, which is not "
                                              "valid Unicode text") from None
        elif isinstance(value, dict):
            keys = {k: k.encode("utf-8", "backslashreplace").decode("utf-8") for k in value}  # printable paths
            stack += [(f"{path}.{keys[k]}" if path else keys[k], v, depth + 1) for k, v in value.items()]
            stack += [(path or "a key", k, depth + 1) for k in value]
        elif isinstance(value, list):
            stack += [(f"{path}[{i}]", v, depth + 1) for i, v in enumerate(value)]
