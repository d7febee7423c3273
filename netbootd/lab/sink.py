"""A tiny HTTP receiver for the test image's event POSTs, for labs without netbootd.

It lets the image (initrd + NFS root) be tested end to end on its own: run it in the
``srv`` namespace with ``python -m netbootd.lab.sink --bind ADDR --port N --out FILE`` and
every POSTed JSON body is appended to FILE as one line. Standard library only.
"""

from __future__ import annotations

import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bind", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    out: Path = args.out

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(min(n, 65536))
            try:
                record = json.loads(body)
            except ValueError:
                record = {"raw": body.decode(errors="replace")}
            record["_path"] = self.path
            record["_peer"] = self.client_address[0]
            with out.open("a") as f:
                f.write(json.dumps(record) + "\n")
            self.send_response(202)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, fmt: str, *args: object) -> None:
            pass

    ThreadingHTTPServer((args.bind, args.port), Handler).serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
