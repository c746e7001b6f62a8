# A slim, non-root image of the presence service.
FROM python:3.11-slim

RUN useradd --create-home --uid 10001 presence
WORKDIR /app
COPY pyproject.toml README.md ./
COPY presence ./presence
RUN pip install --no-cache-dir . && rm -rf /root/.cache

USER presence
ENV PRESENCE_HOST=0.0.0.0 \
    PRESENCE_PORT=8000 \
    PYTHONUNBUFFERED=1
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status != 200)"]
# SIGTERM: clients are closed with 1012 and the members leave everywhere at once.
STOPSIGNAL SIGTERM
CMD ["presence", "serve"]
