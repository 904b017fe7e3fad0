"""The object store's stand-in: moto's S3 server on the real store's port (8333), with its data on a volume.

moto keeps everything in memory, so a restart would lose every bucket and object. Its own request recorder
gives the stand-in the real store's contract of data on a named volume that survives `down`/`up`: with
MOTO_ENABLE_RECORDING, every request is appended to MOTO_RECORDER_FILEPATH, and at start that recording is
replayed (moto does not record the replay) into a server on a private loopback port, before the public port
opens: no client sees a half-restored store. moto accepts any credentials, so it cannot catch a wrong key:
only the real store (SeaweedFS, docker/compose.yaml) checks them.

moto's recorder appends an entry and its newline in two writes, from the server's request threads, so two
concurrent uploads (DVC and MLflow upload in parallel) could share a line and break the replay: the recorder is
wrapped so that one request is recorded at a time.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import urllib.request
from pathlib import Path

from moto.moto_api._internal.recorder.models import Recorder
from moto.server import ThreadedMotoServer

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


def main() -> int:
    recording = Path(os.environ["MOTO_RECORDER_FILEPATH"])
    if recording.is_file() and recording.stat().st_size:
        try:
            replay(recording)
        except OSError as exc:
            print(f"objectstore: cannot replay {recording}: {exc}", file=sys.stderr, flush=True)
            return 1
    server = ThreadedMotoServer(ip_address=os.environ.get("OBJECTSTORE_HOST", "0.0.0.0"), port=PORT, verbose=False)
    server.start()
    print(f"objectstore: S3 on port {PORT}, recording to {recording}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
