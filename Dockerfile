# One image for every service of docker-compose.yml: the mock API, the
# reference worker and the producer.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app

COPY pyproject.toml README.md LICENSE redis_token_bucket.py ./
COPY throttle ./throttle
COPY worker ./worker
COPY producer ./producer
# The library is installed; worker/ and producer/ run from /app (the working directory).
RUN pip install --no-cache-dir ".[metrics]"

# Celery refuses to run as root without C_FORCE_ROOT; nobody is enough.
USER nobody
CMD ["python", "-m", "worker"]
