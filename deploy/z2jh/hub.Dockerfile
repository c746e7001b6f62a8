# The z2jh hub image with presence: the chart's own hub image (same chart version as the
# Helm release), plus presence-awareness (the post_auth_hook that hub.extraConfig imports)
# and JupyterHub 6, which keeps the faces that hook makes (user_info) and hands them to
# JupyterLab. Chart 4.4.0 ships JupyterHub 5.5.0: without the upgrade, sharing and
# presence work, but collaborators have no faces. With the chart's default sqlite-pvc
# database the hub upgrades its schema at start; with another database set
# hub.db.upgrade: true for the first start.
#
#   docker build -f deploy/z2jh/hub.Dockerfile -t <registry>/k8s-hub-presence:4.4.0-presence-0.1.0 .
#
# from the repository's root: presence is installed from that checkout (the context
# holds the package alone: .dockerignore), the version the other images carry.
ARG Z2JH_VERSION=4.4.0
FROM quay.io/jupyterhub/k8s-hub:${Z2JH_VERSION}

# The JupyterHub version presence is tested with (docs/jupyter.md).
ARG JUPYTERHUB_VERSION=6.1.1

# The chart's image installs into the system Python as root and runs as jovyan.
USER root
COPY pyproject.toml README.md CHANGELOG.md hatch_build.py /tmp/presence/
COPY presence /tmp/presence/presence
COPY jupyter-config /tmp/presence/jupyter-config
# The hub serves no JupyterLab: its presence leaves the JupyterLab extension out.
RUN PRESENCE_SKIP_LABEXTENSION=1 pip install --no-cache-dir /tmp/presence "jupyterhub==${JUPYTERHUB_VERSION}" \
 && rm -rf /tmp/presence \
 && python -c "from presence.jupyter.hub import make_post_auth_hook" \
 && jupyterhub --version
USER jovyan
