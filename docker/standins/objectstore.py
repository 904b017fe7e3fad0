"""The object store's stand-in: moto's S3 server on the real store's port (8333), with its data on a volume.

moto keeps everything in memory, so a restart would lose every bucket and object. Its own request recorder
gives the stand-in the real store's contract of data on a named volume that survives `down`/`up`: with
MOTO_ENABLE_RECORDING, every request is appended to MOTO_RECORDER_FILEPATH, and at start that recording is
replayed (moto does not record the replay) into a server on a private loopback port, before the public port
opens: no client sees a half-restored store.

Credentials, as the real store checks them: moto checks SigV4 signatures against the access keys of its own IAM
users once its "initial no-auth action count" is used up. The stand-in gives the keys of its environment
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, the keys SeaweedFS makes its admin identity from) to one IAM user
allowed everything, and sets that count to 0 after the replay: a request without a signature, with another key
or with a wrong secret gets 403 (AccessDenied, InvalidAccessKeyId, SignatureDoesNotMatch). moto's own control
API (/moto-api/..., which could turn that off or reset the store) answers 403 on the public port.

moto's recorder appends an entry and its newline in two writes, from the server's request threads, so two
concurrent uploads (DVC and MLflow upload in parallel) could share a line and break the replay: the recorder is
wrapped so that one request is recorded at a time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import urllib.request
from pathlib import Path

from moto import settings
from moto.core import DEFAULT_ACCOUNT_ID
from moto.iam.models import iam_backends
from moto.moto_api._internal.recorder.models import Recorder
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from moto.server import ThreadedMotoServer
from werkzeug.serving import make_server

PORT = int(os.environ.get("OBJECTSTORE_PORT", "8333"))

_record_request = Recorder._record_request
_recording = threading.Lock()


def _record_one_at_a_time(self: Recorder, request: object, body: bytes | None = None) -> None:
    with _recording:
        _record_request(self, request, body)


Recorder._record_request = _record_one_at_a_time  # type: ignore[method-assign]


def replay(recording: Path) -> None:
    """Restore the store from the recording, through a server on a free loopback port (the servers of one
    process share moto's state)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    private = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    private.start()
    try:
        url = f"http://127.0.0.1:{port}/moto-api/recorder/replay-recording"
        urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=3600).read()
    finally:
        private.stop()
    print(f"objectstore: replayed {sum(1 for _ in recording.open())} requests from {recording}", flush=True)


def require_keys(access_key: str, secret_key: str) -> None:
    """From now on every request must be signed with these keys (see the module docstring)."""
    iam = iam_backends[DEFAULT_ACCOUNT_ID]["aws"]
    iam.create_user(region_name="us-east-1", user_name="objectstore-admin")
    key = iam.create_access_key("objectstore-admin")
    key.access_key_id, key.secret_access_key = access_key, secret_key
    everything = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
    iam.put_user_policy("objectstore-admin", "everything", json.dumps(everything))
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0


ANONYMOUS = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    b"<Message>Access Denied: this store answers signed requests only</Message></Error>"
)


def _guard(app):
    """The store's port: moto's control API closed, and a request with no signature at all refused with S3's
    403 AccessDenied (moto itself fails on some, such as an unsigned bucket listing, with a 500)."""

    def guarded(environ, start_response):
        if environ.get("PATH_INFO", "").startswith("/moto-api"):
            start_response("403 Forbidden", [("Content-Type", "text/plain")])
            return [b"moto's control API is closed on the store's port\n"]
        if "HTTP_AUTHORIZATION" not in environ and "X-Amz-Signature=" not in environ.get("QUERY_STRING", ""):
            start_response("403 Forbidden", [("Content-Type", "application/xml")])
            return [ANONYMOUS]
        return app(environ, start_response)

    return guarded


class PublicServer(ThreadedMotoServer):
    """moto's threaded server behind _guard."""

    def _server_entry(self) -> None:
        app = _guard(DomainDispatcherApplication(create_backend_app))
        self._server = make_server(self._ip_address, self._port, app, True, request_handler=MotoRequestHandler)
        self._server_ready_event.set()
        self._server.serve_forever()


def main() -> int:
    recording = Path(os.environ["MOTO_RECORDER_FILEPATH"])
    if recording.is_file() and recording.stat().st_size:
        try:
            replay(recording)
        except OSError as exc:
            print(f"objectstore: cannot replay {recording}: {exc}", file=sys.stderr, flush=True)
            return 1
    keys = (os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY"))
    if not all(keys):
        print("objectstore: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set", file=sys.stderr, flush=True)
        return 2
    require_keys(*keys)  # type: ignore[arg-type]
    # SIGTERM and SIGINT are blocked before the server's threads start (they inherit the mask) and taken by
    # sigwait: a stop that comes while the port opens is not lost, and no handler runs inside a lock. A handler
    # that set a threading.Event could deadlock on the Event's own lock, held by the main thread's wait.
    stops = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    server = PublicServer(ip_address=os.environ.get("OBJECTSTORE_HOST", "0.0.0.0"), port=PORT, verbose=False)
    server.start()
    print(f"objectstore: S3 on port {PORT}, signed requests only, recording to {recording}", flush=True)
    signal.sigwait(stops)
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
