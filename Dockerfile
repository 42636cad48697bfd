# One image for every paysaga service; docker-compose.yml picks the command.
FROM python:3.12-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md alembic.ini worker.py ./
COPY paysaga ./paysaga
COPY workflows ./workflows
COPY activities ./activities
COPY ledger ./ledger
COPY migrations ./migrations
COPY api ./api
COPY recon ./recon
RUN pip install . && useradd --system --no-create-home paysaga

USER paysaga
EXPOSE 8000
CMD ["paysaga", "api"]
