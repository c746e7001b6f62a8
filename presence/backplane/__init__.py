"""How replicas share rooms: an interface, replication over a transport (memory, Redis)."""
