"""Inside a network namespace: 127.0.0.1:PORT forwarded to a Unix socket outside.

``python -m chaos.nsrelay DIR PORT [PORT ...]`` listens on 127.0.0.1:PORT in
the namespace it runs in and forwards each connection to ``DIR/PORT.sock``,
where the host side (``chaos.proxy.ResetProxy`` on a Unix socket) forwards
to the real server. So a worker "host" keeps the same URLs as everyone
else, and the host side can cut it off. Stops with its process group.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
from pathlib import Path


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _serve(port: int, path: Path) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(256)
    while True:
        client, _ = listener.accept()
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.connect(str(path))
        except OSError:
            client.close()
            upstream.close()
            continue
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=_pump, args=(a, b), daemon=True).start()


def main(argv: list[str]) -> None:
    folder = Path(argv[0])
    threads = [
        threading.Thread(target=_serve, args=(int(p), folder / f"{p}.sock"), daemon=True)
        for p in argv[1:]
    ]
    for thread in threads:
        thread.start()
    print("nsrelay ready", flush=True)
    for thread in threads:
        thread.join()


if __name__ == "__main__":
    main(sys.argv[1:])
