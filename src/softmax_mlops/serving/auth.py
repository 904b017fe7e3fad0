"""An optional bearer token for the inference service (RFC 6750): with one set, every route but the health
routes needs `Authorization: Bearer <token>`; without one, the service answers anyone, as it binds 127.0.0.1 by
default.

The token comes from the environment (SOFTMAX_MLOPS_SERVE_TOKEN) or from a file (serve.token_file: a compose or
Kubernetes secret mounted as a file), never from params.yaml, so that it is never committed, logged with the
params, or put in an image. It is compared in constant time.

Health routes stay open, for the probes of an orchestrator that holds no token: /health, /ping (MLflow's),
/v2/health/live and /v2/health/ready (the Open Inference Protocol's, which KServe probes).
"""

from __future__ import annotations

import hmac
import json
import os
from pathlib import Path

from ..config import SERVE_TOKEN_ENV, ServeConfig
from ..errors import PipelineError

OPEN_PATHS = frozenset({"/health", "/ping", "/v2/health/live", "/v2/health/ready"})


def token(limits: ServeConfig) -> str | None:
    """The token the service requires: the environment's, else the first line of serve.token_file; None when
    neither is set. An unreadable or empty token file is one error naming it (the service must not start open
    when a token was asked for)."""
    if from_env := os.environ.get(SERVE_TOKEN_ENV, "").strip():
        return from_env
    if not limits.token_file:
        return None
    path = Path(limits.token_file)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path}: cannot read the serve token: {exc.__class__.__name__}: {exc}") from None
    value = lines[0].strip() if lines else ""
    if not value:
        raise PipelineError(f"{path}: the serve token file is empty")
    return value


class BearerAuth:
    """ASGI middleware: 401 with a JSON error and `WWW-Authenticate: Bearer` for a request to a closed route
    without the right token. It runs before any route reads the body."""

    def __init__(self, app, token: str) -> None:  # noqa: ANN001 - an ASGI app
        self.app = app
        self.expected = token.encode()

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001 - ASGI
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization")
        scheme, _, credentials = (given or b"").partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self.expected):
            await self.app(scope, receive, send)
            return
        if given is None:
            message, challenge = "this service needs a bearer token: send Authorization: Bearer <token>", b"Bearer"
        else:
            message, challenge = "the bearer token is not valid", b'Bearer error="invalid_token"'
        body = json.dumps({"error": message}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", challenge),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
