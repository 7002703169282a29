"""Fault injection: real processes, one fault each, three ledgers reconciled.

``make chaos`` runs every scenario at full size (at least 2,000 deliveries
each); ``make chaos-quick`` runs each at small size. A scenario starts real
workers, beat, the embedded PostgreSQL and Valkey (under a temporary
``CHANNELS_HOME`` of its own, never ``./.channels``) and receivers on
127.0.0.1 that record every delivery id they get; it injects its fault,
waits for the system to settle and then compares what was accepted, what the
database says and what the receivers saw (``chaos.ledger``).

Nothing here may listen beyond 127.0.0.1 or dial anything but loopback, and
every process started is stopped by its PID.
"""
