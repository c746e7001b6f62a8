"""Wire formats without I/O: JSON clients, event streams, messages between replicas."""
