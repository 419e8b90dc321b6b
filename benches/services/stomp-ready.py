#!/usr/bin/env python3
"""Exit 0 if a STOMP broker at HOST:PORT answers CONNECT with CONNECTED."""
import socket
import sys

host, port = (sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:61613").rsplit(":", 1)
try:
    with socket.create_connection((host, int(port)), timeout=2) as s:
        s.sendall(b"CONNECT\naccept-version:1.2\nhost:/\n\n\0")
        s.settimeout(2)
        sys.exit(0 if s.recv(64).startswith(b"CONNECTED") else 1)
except OSError:
    sys.exit(1)
