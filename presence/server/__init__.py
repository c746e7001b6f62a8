"""The asyncio edge: Starlette routes, the hub, connections."""
