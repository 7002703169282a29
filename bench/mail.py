"""S5: email. One message to ``n`` email subscribers, delivered by the worker
to the SMTP sink (``bench.smtpsink``) until every attempt row is written,
against a naive ``smtplib`` loop opening one connection per mail to the
same sink with the same headers and body.
"""

from __future__ import annotations

import asyncio
import os
import smtplib
import time
from email.message import EmailMessage
from email.utils import formatdate

from bench.common import Figure, Machine
from bench.fanout import email_aliases, run_once

__all__ = ["email_fanout", "naive_smtplib"]


def email_fanout(machine: Machine, n: int, port: int, runs: int, concurrency: int) -> Figure:
    # Say whether the sink offered PIPELINING (see bench.smtpsink): it changes
    # how many round trips a mail costs this system, not the naive loop.
    pipelining = "off" if os.environ.get("BENCH_SMTP_PIPELINING", "1") == "0" else "on"
    figure = Figure(
        "S5",
        "channels",
        unit="mails/s",
        notes=f"n={n}, pool={concurrency}, sink PIPELINING {pipelining}",
    )
    env = {"CHANNELS_SMTP_HOST": "127.0.0.1", "CHANNELS_SMTP_PORT": str(port)}
    with machine.worker("S5", concurrency, env) as worker:
        for run in range(runs):
            meter = machine.cpu_meter(worker=[worker.pid])
            elapsed, written = asyncio.run(
                run_once(
                    n,
                    None,
                    timeout=600,
                    aliases=email_aliases,
                    transport="email",
                    observer_dsn=machine.observer_dsn,
                    before=meter.start,
                )
            )
            meter.stop()
            figure.runs.append(written / elapsed)
            figure.cpu_s_per_item = meter.per(written)
            if written < n:
                figure.notes += f"; run {run + 1} wrote {written}/{n} in the time limit"
    return figure


def naive_smtplib(machine: Machine, n: int, port: int, runs: int) -> Figure:
    """``for each mail: smtplib.SMTP(...); send_message(); quit()``, in one process."""
    figure = Figure("S5", "naive smtplib loop", unit="mails/s", notes=f"n={n}, 1 connection/mail")
    for _ in range(runs):
        meter = machine.cpu_meter(client=[os.getpid()])
        meter.start()
        started = time.perf_counter()
        deadline = started + 600
        sent = 0
        for i in range(n):
            if time.perf_counter() > deadline:
                break
            mail = EmailMessage()
            mail["From"] = "channels@localhost"
            mail["To"] = f"subscriber{i}@example.com"
            mail["Subject"] = "bench"
            mail["Date"] = formatdate(localtime=False)
            mail["Message-ID"] = f"<naive-{i}.{time.time_ns()}@localhost>"
            mail.set_content("benchmark payload " * 8)
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
                smtp.send_message(mail)
            sent += 1
        elapsed = time.perf_counter() - started
        meter.stop()
        figure.runs.append(sent / elapsed)
        figure.cpu_s_per_item = meter.per(sent)
    return figure
