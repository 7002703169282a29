# The project image: every piece of compose.yaml runs from it (`channels ...`).
#   docker build -t channels .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The packages pyproject.toml ships (tests/test_compose.py checks the list).
COPY pyproject.toml README.md ./
COPY channels_core ./channels_core
COPY producer ./producer
COPY workers ./workers
COPY channels_cli ./channels_cli
RUN pip install . \
    && useradd --system --home-dir /var/lib/channels --create-home channels

# Never root at run time. CHANNELS_HOME holds beat's schedule (and, if the
# URLs were unset, the embedded servers), so it must be writable.
USER channels
ENV CHANNELS_HOME=/var/lib/channels
WORKDIR /var/lib/channels

CMD ["channels", "worker"]
