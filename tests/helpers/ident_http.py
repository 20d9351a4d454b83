"""`python3 ident_http.py PORT IDENT`: answer every GET with IDENT, on 0.0.0.0:PORT.

Standard library only, so it runs anywhere a task's command runs (inside a
sandbox, started by `mesh task run`): which task answered is what the tests of
VIP balancing and routing look at.
"""

from __future__ import annotations

import http.server
import sys


def main() -> None:
    port, ident = int(sys.argv[1]), (sys.argv[2] + "\n").encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(ident)))
            self.end_headers()
            self.wfile.write(ident)

        def log_message(self, *args: object) -> None:
            pass

    http.server.ThreadingHTTPServer.allow_reuse_address = True
    http.server.ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()


if __name__ == "__main__":
    main()
