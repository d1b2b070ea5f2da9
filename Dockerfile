# One image for the six pilothouse services (and the `pilothouse` CLI). Each compose service picks its command.
FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY services ./services
COPY infra ./infra
COPY benchmarks ./benchmarks
COPY schemas ./schemas
COPY policies ./policies
# Editable: schemas/, policies/ and the catalogue are read from the source tree.
RUN pip install --no-compile -e . \
 && useradd --system --uid 10001 --no-create-home pilothouse
USER 10001
# Services read settings from PILOTHOUSE_* environment variables and expose /metrics and /health.
CMD ["pilothouse", "--help"]
