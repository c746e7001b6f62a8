"""RFC 6455 on asyncio: frames and protocol without I/O, the connection, the HTTP guard."""
