"""Everything y-websocket: the codec, the endpoint, the room as Yjs clients see it."""
