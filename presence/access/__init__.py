"""Who may come in: room tokens, JupyterHub, origins; at the WebSocket and HTTP doors."""
