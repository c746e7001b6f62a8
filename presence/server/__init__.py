"""The Starlette app: assembles a replica and routes HTTP and WebSocket paths; the views."""
