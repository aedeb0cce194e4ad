# syntax=docker/dockerfile:1.7
# SmartEdu Tutor Chat: wheels are built in one stage, the runtime installs only those wheels.

# Python 3.12: its asyncio.wait_for no longer drops a cancellation that lands as the awaited call ends,
# which on 3.11 could keep a stopping replica waiting (server/tasks.py). .ci/run runs the whole suite on
# this minor version too, read from the FROM lines below.
FROM python:3.12.11-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# setup.cfg reads README.md as the long description; the glob keeps the build working without it.
COPY pyproject.toml setup.cfg README.m[d] ./
COPY server/ server/
COPY handlers/ handlers/
COPY storage/ storage/
COPY ai/ ai/
# The project and every dependency as wheels; the runtime stage installs from here with no index.
# The `backup` extra brings PostgreSQL 18 client binaries (pg_dump/pg_restore) for `smartedu backup`.
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[backup]"


FROM python:3.12.11-slim-bookworm AS runtime

LABEL org.opencontainers.image.title="smartedu-tutor-chat" \
      org.opencontainers.image.description="SmartEdu Tutor Chat WebSocket server" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SMARTEDU_STATIC_DIR=/app/static \
    SMARTEDU_DATA_DIR=/tmp/smartedu \
    SMARTEDU_METRICS_PORT=9100

# A fixed numeric id, so Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
RUN groupadd --system --gid 10001 smartedu \
    && useradd --system --uid 10001 --gid smartedu --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin smartedu

# The wheels are bind-mounted, so they never become a layer of this image. Installing them is the
# last use of pip: it goes, with setuptools and wheel, so the image holds no build tooling.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/*.whl \
    && pip uninstall --yes setuptools wheel pip

WORKDIR /app
# Owned by root and read-only for the app user.
COPY static/ /app/static/

USER 10001:10001

EXPOSE 8080 9100
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=2).status == 200 else 1)"]

CMD ["smartedu", "serve", "--host", "0.0.0.0", "--port", "8080"]
