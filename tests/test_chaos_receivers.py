"""The fault-injection receivers acknowledge only what a real server would accept."""

from __future__ import annotations

import socket
import time

from chaos.receivers import FaultySmtp


def _mail(port: int, content: bytes, *, finish: bool) -> None:
    """One SMTP transaction up to DATA's 354; then ``content`` and, if ``finish``, the dot."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
        sock.makefile("rb") as replies,
    ):
        replies.readline()  # the greeting
        for command in (b"EHLO test", b"MAIL FROM:<a@example.com>", b"RCPT TO:<ok-1@example.com>"):
            sock.sendall(command + b"\r\n")
            while replies.readline()[3:4] == b"-":
                pass
        sock.sendall(b"DATA\r\n")
        assert replies.readline().startswith(b"354")
        sock.sendall(content + (b".\r\n" if finish else b""))
        if finish:
            assert replies.readline().startswith(b"250")


def test_a_client_gone_inside_data_sent_no_mail() -> None:
    """A worker killed (or its send interrupted) after the 354 left a mail that
    was never finished: it must not count as acknowledged. Taken as a mail, the
    empty one was an acknowledged receipt without a delivery id, which the
    ledger counts in ``dup_after_dedupe`` (broker_restart, one run in sixteen)."""
    smtp = FaultySmtp().start()
    try:
        _mail(smtp.port, b"", finish=False)
        _mail(smtp.port, b"Message-ID: <dlv-7@example.com>\r\n", finish=False)
        _mail(smtp.port, b"Message-ID: <dlv-8@example.com>\r\n\r\nhello\r\n", finish=True)
        deadline = time.monotonic() + 5
        while len(smtp.snapshot()) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        got = {(r.delivery_id, r.acked) for r in smtp.snapshot()}
        assert got == {(None, False), (7, False), (8, True)}
    finally:
        smtp.stop()
