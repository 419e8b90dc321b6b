#!/usr/bin/env python3
"""ledger: a small stateful service that never loses an acknowledged write.

Every write is appended to DATA/ledger.log and fsync'd before the answer; the
service also counts writes in memory. At a cold start it re-reads the ledger
(after --warmup seconds of slow initialisation), so its count always equals
the lines on disk, unless something rolled the file or the memory back.

  GET /health        200 "ok"
  GET /write?v=TEXT  append TEXT, fsync, answer {"count": N}
  GET /state         {"nonce", "count", "lines", "pid"}: in-memory count and
                     the lines on disk (they must agree)

--prealloc BYTES keeps the ledger the way ZooKeeper keeps its transaction log:
a file of fixed size, zero-filled, written in place at the descriptor's
position (its size never changes). Without it the file is opened for
appending, as Prometheus keeps its WAL.
"""
import argparse
import hashlib
import json
import os
import secrets
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import parse_qs, urlparse


def read_lines(path):
    """The records on disk: lines up to the first zero byte (a preallocated
    file's unwritten rest)."""
    try:
        with open(path) as f:
            text = f.read().split("\0", 1)[0]
    except FileNotFoundError:
        return []
    return [l for l in text.split("\n")[:-1]]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8090)
    ap.add_argument("--data", required=True, help="directory of the ledger (list it under state:)")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of slow start-up work")
    ap.add_argument("--prealloc", type=int, default=0, help="a preallocated file of this size, written in place")
    args = ap.parse_args()

    nonce = secrets.token_hex(8)
    started = time.monotonic()
    work = {}
    i = 0
    while time.monotonic() - started < args.warmup:
        work[hashlib.sha256(str(i).encode()).hexdigest()[:12]] = i
        i += 1
    os.makedirs(args.data, exist_ok=True)
    path = os.path.join(args.data, "ledger.log")
    if args.prealloc:
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.truncate(args.prealloc)
                os.fsync(f.fileno())
        log = open(path, "r+")
        end = read_lines(path)
        count = len(end)
        log.seek(sum(len(l) + 1 for l in end))
    else:
        try:
            with open(path) as f:
                count = sum(1 for _ in f)
        except FileNotFoundError:
            count = 0
        log = open(path, "a")
    state = {"count": count}
    print(f"ledger: ready on {args.port}, {count} writes on disk (nonce {nonce})", flush=True)

    class Handler(BaseHTTPRequestHandler):
        def reply(self, code, body):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            url = urlparse(self.path)
            if url.path == "/health":
                self.reply(200, "ok")
            elif url.path == "/write":
                value = parse_qs(url.query).get("v", [""])[0]
                log.write(value.replace("\n", " ") + "\n")
                log.flush()
                os.fsync(log.fileno())
                state["count"] += 1
                self.reply(200, {"count": state["count"]})
            elif url.path == "/state":
                lines = read_lines(path)
                self.reply(200, {"nonce": nonce, "count": state["count"], "lines": lines, "pid": os.getpid()})
            else:
                self.reply(404, "not found")

        def log_message(self, fmt, *a):
            pass

    HTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
