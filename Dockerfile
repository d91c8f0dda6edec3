# One image for every refundq process: docker-compose.yml runs it as migrate, web, worker, beat,
# flower and sandbox with different commands (the Procfile's, see docs/operations.md).
#   docker build -t refundq .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The dependencies first, read from pyproject.toml, so a code change does not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(deps))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Then refundq itself (the `refundq` console script, migrations included). The source stays in
# /app for flowerconfig.py, which Flower reads by path.
COPY . .
RUN pip install --no-deps . \
    && python -c "import worker.app, worker.api, worker.cli, flower"

# Never root: Celery warns against it, and nothing here needs it. /var/lib/refundq holds what
# the processes write (the sandbox's throwaway bbmsl key pair, the API keys file).
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /var/lib/refundq refundq \
    && mkdir -p /var/lib/refundq/sandbox-keys /var/lib/refundq/api-keys \
    && chown -R refundq:refundq /var/lib/refundq
USER refundq

EXPOSE 8000 5555 8099
CMD ["uvicorn", "worker.api:app", "--host", "0.0.0.0", "--port", "8000"]
