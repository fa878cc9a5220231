# syntax=docker/dockerfile:1
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PORT=8080

WORKDIR /app

# Dependencies first, in their own cached layer: code changes do not reinstall them.
COPY setup.cfg pyproject.toml README.md ./
RUN mkdir pyloto_corp && touch pyloto_corp/__init__.py \
    && pip install . \
    && pip uninstall -y pyloto_corp

# gunicorn puts /app first on sys.path, so a source tree left here would shadow the installed
# package and be recompiled on every cold start (PYTHONDONTWRITEBYTECODE). Install it, which
# compiles its bytecode, drop the sources, and compile wsgi.py too.
COPY pyloto_corp ./pyloto_corp
COPY wsgi.py gunicorn.conf.py ./
RUN pip install --no-deps . \
    && rm -rf pyloto_corp build ./*.egg-info setup.cfg pyproject.toml README.md \
    && python -m compileall -q wsgi.py \
    && useradd --system --uid 10001 --no-create-home app

USER 10001
EXPOSE 8080

CMD ["gunicorn", "--config", "gunicorn.conf.py", "wsgi:app"]
