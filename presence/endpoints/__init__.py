"""The JSON WebSocket endpoint (``/rooms/<room>``); the Yjs one is :mod:`presence.yjs`."""
