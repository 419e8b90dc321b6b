#!/usr/bin/env python3
"""slowweb: an HTTP service with a real, slow warm-up.

At start it builds an in-memory index (hashing and tabulating records until
--warmup seconds of CPU work are done, about 100 MB), like an app that loads
and indexes its data before serving. Only then does it listen.

  GET /health  200 "ok"
  GET /state   JSON: nonce (random per cold start), hits (requests served so
               far), index size, warm-up time, pid
  GET /hit     increments and returns the hit counter
  GET /random  a draw from Python's `random` module (seeded once at start:
               every restore of one image draws the same, unless reseeded)
  GET /restored  the restore-info file warmer wrote (WARMER_RESTORE_INFO)
  GET /drop-secret  zero the secret read with --secret-file (what a
               before_checkpoint hook asks before a checkpoint)

SIGUSR2 reseeds `random` from the kernel: with `restore: {signal: SIGUSR2}`
every restore draws differently (see README, "Uniqueness").

Every request is logged to stdout, so a supervisor can see the service's
output before and after a restore.
"""
import argparse
import hashlib
import json
import os
import random
import secrets
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer


def warm_up(seconds, records=None):
    started = time.monotonic()
    index = {}
    i = 0
    while (i < records) if records else (time.monotonic() - started < seconds):
        for _ in range(2000):
            key = hashlib.sha256(str(i).encode()).hexdigest()
            index[key[:16]] = i
            i += 1
    return index, time.monotonic() - started


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up work")
    ap.add_argument("--records", type=int, help="a fixed amount of warm-up work instead: index this many records "
                    "(about 400000 per CPU-second), so services started together share the CPUs as real ones do")
    ap.add_argument("--child", help="also run `sleep CHILD` as a child process (a process tree)")
    ap.add_argument("--notify", action="store_true", help="send READY=1 to $NOTIFY_SOCKET when ready")
    ap.add_argument("--statefile", help="write the nonce to this file and keep it open for writing")
    ap.add_argument("--secret-file", help="read a secret from this file into memory (only there)")
    args = ap.parse_args()
    # `random` seeded itself from the kernel at import, once, as libraries
    # that seed at start do: cold starts draw differently; restores of one
    # image repeat the same draws. Restored: the same memory, the same generator state. A new seed from
    # the kernel makes this restore's draws its own.
    signal.signal(signal.SIGUSR2, lambda *_: random.seed(os.urandom(32)))
    secret = bytearray(256)
    secret_len = 0
    if args.secret_file:
        with open(args.secret_file, "rb", buffering=0) as f:
            secret_len = f.readinto(secret)
    if args.child:
        import subprocess
        subprocess.Popen(["sleep", args.child])

    nonce = secrets.token_hex(8)
    print(f"slowweb: warming up for {args.warmup:.1f}s (nonce {nonce})", flush=True)
    index, took = warm_up(args.warmup, args.records)
    statefile = None
    if args.statefile:
        statefile = open(args.statefile, "w")
        statefile.write(nonce)
        statefile.flush()
    state = {"nonce": nonce, "hits": 0, "index": len(index), "warmup_s": round(took, 3)}

    class Handler(BaseHTTPRequestHandler):
        def reply(self, code, body, ctype="application/json"):
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/health":
                self.reply(200, "ok", "text/plain")
            elif self.path == "/state":
                self.reply(200, json.dumps(dict(state, pid=os.getpid())))
            elif self.path == "/random":
                self.reply(200, json.dumps({"random": random.getrandbits(64)}))
            elif self.path == "/restored":
                path = os.environ.get("WARMER_RESTORE_INFO", "")
                try:
                    with open(path) as f:
                        self.reply(200, f.read())
                except OSError:
                    self.reply(404, "not restored", "text/plain")
            elif self.path == "/drop-secret":
                for i in range(len(secret)):
                    secret[i] = 0
                self.reply(200, json.dumps({"dropped": secret_len}))
            elif self.path == "/hit":
                state["hits"] += 1
                print(f"slowweb: hit {state['hits']} (nonce {nonce})", flush=True)
                self.reply(200, json.dumps({"hits": state["hits"]}))
            else:
                self.reply(404, "not found", "text/plain")

        def log_message(self, fmt, *a):
            pass

    server = HTTPServer((args.host, args.port), Handler)
    if args.notify and os.environ.get("NOTIFY_SOCKET"):
        import socket
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])
    print(f"slowweb: ready on {args.host}:{args.port} after {took:.2f}s, {len(index)} records", flush=True)
    print("slowweb: stderr works too", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
