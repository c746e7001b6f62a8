# The single-user image with presence: JupyterLab from Jupyter's docker-stacks, real-time
# collaboration (jupyter-collaboration), JupyterHub 6's jupyterhub-singleuser (it copies
# each user's face into JupyterLab) and presence-awareness[jupyter], whose server
# extension is on as soon as it is installed.
#
#   docker build -f deploy/z2jh/singleuser.Dockerfile -t <registry>/singleuser-presence:presence-0.1.0 .
#
# from the repository's root: presence is installed from that checkout (the context
# holds the package alone: .dockerignore). Pin BASE_IMAGE to a dated tag
# (quay.io/jupyter/minimal-notebook:YYYY-MM-DD) for builds that can be repeated; any
# docker-stacks image (scipy-notebook, ...) will do as well.
ARG BASE_IMAGE=quay.io/jupyter/minimal-notebook:latest

# The JupyterLab extension ("Share with collaborators…"), built with Node.js into
# presence/jupyter/labextension, where the package's build takes it from.
FROM node:20-slim AS labextension
WORKDIR /src
COPY labextension ./labextension
RUN npm ci --prefix labextension --no-audit --no-fund \
 && npm run build --prefix labextension

FROM ${BASE_IMAGE}

# The JupyterHub version presence is tested with (docs/jupyter.md). The [jupyter] extra
# pins JupyterLab 4 and the jupyter-collaboration range the extension supports.
ARG JUPYTERHUB_VERSION=6.1.1

USER root
COPY pyproject.toml README.md CHANGELOG.md hatch_build.py /tmp/presence/
COPY presence /tmp/presence/presence
COPY --from=labextension /src/presence/jupyter/labextension /tmp/presence/presence/jupyter/labextension
COPY jupyter-config /tmp/presence/jupyter-config
RUN pip install --no-cache-dir "/tmp/presence[jupyter]" "jupyterhub==${JUPYTERHUB_VERSION}" \
 && rm -rf /tmp/presence \
 && fix-permissions "${CONDA_DIR}" \
 && fix-permissions "/home/${NB_USER}"
USER ${NB_UID}

# Fail here rather than in users' servers: collaboration and presence are both enabled.
RUN jupyter server extension list 2>&1 | grep -E "jupyter_server_ydoc.*enabled" \
 && jupyter server extension list 2>&1 | grep -E "presence\.jupyter.*enabled" \
 && jupyter labextension list 2>&1 | grep -E "@presence-awareness/jupyterlab.*enabled.*OK"
