"""How replicas share presence events. One small interface, one file per implementation."""
