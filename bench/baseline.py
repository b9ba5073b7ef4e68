"""The raw-ZeroMQ baseline processes: ``python -m bench.baseline proxy|worker BACKEND``.

The proxy is the C device ``zmq.proxy`` (ROUTER front-end, DEALER back-end); a worker is
a DEALER that echoes every message it gets. Each prints one JSON line when ready.
"""

from __future__ import annotations

import json
import sys

import zmq


def proxy() -> None:
    ctx = zmq.Context()
    front = ctx.socket(zmq.ROUTER)
    back = ctx.socket(zmq.DEALER)
    for sock in (front, back):
        sock.sndhwm = sock.rcvhwm = 100_000
    front_port = front.bind_to_random_port("tcp://127.0.0.1")
    back_port = back.bind_to_random_port("tcp://127.0.0.1")
    print(json.dumps({"frontend": f"tcp://127.0.0.1:{front_port}",
                      "backend": f"tcp://127.0.0.1:{back_port}"}), flush=True)
    zmq.proxy(front, back)


def worker(backend: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.sndhwm = sock.rcvhwm = 100_000
    sock.connect(backend)
    print(json.dumps({"event": "ready"}), flush=True)
    recv, send = sock.recv_multipart, sock.send_multipart
    while True:
        send(recv())


if __name__ == "__main__":
    if sys.argv[1] == "proxy":
        proxy()
    else:
        worker(sys.argv[2])
