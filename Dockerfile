FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY channels_core ./channels_core
COPY producer ./producer
COPY workers ./workers
COPY channels_cli ./channels_cli
RUN pip install --no-cache-dir . && useradd --system channels
USER channels
ENV CHANNELS_HOME=/tmp/channels
CMD ["celery", "-A", "workers", "worker", "--loglevel", "INFO"]
