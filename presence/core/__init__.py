"""The pure core: identities, rooms, events. No I/O, no asyncio, no clock of its own."""
