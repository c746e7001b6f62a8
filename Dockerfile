# A slim, non-root image of the presence service.
FROM python:3.11-slim

RUN useradd --create-home --uid 10001 presence
WORKDIR /app
COPY pyproject.toml README.md ./
COPY presence ./presence
COPY jupyter-config ./jupyter-config
RUN pip install --no-cache-dir . && rm -rf /root/.cache

USER presence
ENV PRESENCE_HOST=0.0.0.0 \
    PRESENCE_PORT=8000 \
    PYTHONUNBUFFERED=1
EXPOSE 8000
# The port the service listens on, wherever PRESENCE_PORT moves it (503 raises: unhealthy).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('PRESENCE_PORT', '8000'); sys.exit(urllib.request.urlopen(f'http://127.0.0.1:{port}/readyz', timeout=2).status != 200)"]
# SIGTERM: clients are closed with 1012 and the members leave everywhere at once.
STOPSIGNAL SIGTERM
CMD ["presence", "serve"]
