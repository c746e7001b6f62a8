# The presence service: a slim, non-root image.
#   docker build -t presence:0.1.0 .
# Two stages: the first installs presence and its dependencies into a venv; the second
# copies only that venv, so the image carries no source tree, build backend or pip cache.
FROM python:3.11-slim AS build

WORKDIR /src
# The build's context: the package, its metadata, its build hook and the Jupyter config
# file its wheel installs. tests/test_image.py lays out exactly these and runs the
# install below there. The service serves no JupyterLab: its wheel leaves the JupyterLab
# extension out (which would need Node.js to build; deploy/z2jh's images carry it).
COPY pyproject.toml README.md CHANGELOG.md hatch_build.py ./
COPY presence ./presence
COPY jupyter-config ./jupyter-config
RUN python -m venv /opt/presence \
 && PRESENCE_SKIP_LABEXTENSION=1 /opt/presence/bin/pip install --no-cache-dir .

FROM python:3.11-slim

RUN useradd --create-home --uid 10001 presence
COPY --from=build /opt/presence /opt/presence
USER presence
ENV PATH=/opt/presence/bin:$PATH \
    PRESENCE_HOST=0.0.0.0 \
    PRESENCE_PORT=8000 \
    PYTHONUNBUFFERED=1
EXPOSE 8000
# Ready on the port and under the base path the service has (503 raises: unhealthy).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('PRESENCE_PORT', '8000'); base = os.environ.get('PRESENCE_BASE_PATH', '').rstrip('/'); sys.exit(urllib.request.urlopen(f'http://127.0.0.1:{port}{base}/readyz', timeout=2).status != 200)"]
# SIGTERM: clients are closed with 1012 and the members leave everywhere at once.
STOPSIGNAL SIGTERM
CMD ["presence", "serve"]
