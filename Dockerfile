# syntax=docker/dockerfile:1
# amqpsched: one image for the scheduler and the workers (the resize capability's Pillow included).
#   docker build -t amqpsched:0.1.0 .
#   docker run --rm -e AMQPSCHED_AMQP_URL=amqp://... amqpsched:0.1.0 scheduler --metrics-port 9100
#   docker run --rm -e AMQPSCHED_AMQP_URL=amqp://... amqpsched:0.1.0 worker --capability resize
# On Kubernetes the Deployments run `python -m amqpsched.scheduler` and
# `python -m amqpsched.worker --capability resize` (deploy/base).

ARG PYTHON_IMAGE=python:3.11-slim

# -- build: the amqpsched wheel and the wheels of its dependencies -----------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY amqpsched ./amqpsched
# Every dependency has binary wheels (Pillow included): no compiler is needed here either.
RUN python -m pip wheel --wheel-dir /wheels .

# -- runtime: the wheels installed, nothing to build with, a user without privileges ----------
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 amqpsched \
    && useradd --system --uid 10001 --gid amqpsched --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin amqpsched
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m pip install --no-index --find-links=/wheels amqpsched
WORKDIR /tmp
USER 10001:10001
EXPOSE 9100
# Exec form: Python is PID 1 and gets SIGTERM itself, so a stopping worker drains (running tasks
# finish or go back to their queue) before Kubernetes' grace period ends.
ENTRYPOINT ["python", "-m", "amqpsched"]
CMD ["--help"]
