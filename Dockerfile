# syntax=docker/dockerfile:1
# The base image by tag. A release pins it by digest, which this repository cannot look up
# offline: `docker buildx imagetools inspect python:3.11-slim` prints it, then build with
# `--build-arg PYTHON_IMAGE=python:3.11-slim@sha256:<digest>` (README, Deploying to Cloud Run).
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PORT=8080

WORKDIR /app

# Dependencies first, in their own cached layer: code changes do not reinstall them. Exactly the
# files requirements.lock names (`make lock`), each checked against its hash, setuptools (the
# build backend) included; pip refuses anything unpinned or unhashed.
COPY requirements.lock ./
RUN pip install --require-hashes -r requirements.lock

# gunicorn puts /app first on sys.path, so a source tree left here would shadow the installed
# package and be recompiled on every cold start (PYTHONDONTWRITEBYTECODE). Install it, which
# compiles its bytecode, drop the sources, and compile wsgi.py too. --no-deps: nothing beyond the
# lock; --no-build-isolation: built with the locked setuptools, not one fetched unpinned; pip check:
# the lock holds every dependency the package declares.
COPY setup.cfg pyproject.toml README.md wsgi.py gunicorn.conf.py ./
COPY pyloto_corp ./pyloto_corp
RUN pip install --no-deps --no-build-isolation . \
    && pip check \
    && rm -rf pyloto_corp build ./*.egg-info setup.cfg pyproject.toml README.md requirements.lock \
    && python -m compileall -q wsgi.py \
    && useradd --system --uid 10001 --no-create-home app

USER 10001
EXPOSE 8080

CMD ["gunicorn", "--config", "gunicorn.conf.py", "wsgi:app"]
