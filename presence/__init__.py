"""presence: a horizontally scalable awareness/presence service with anonymous identities."""

__version__ = "0.1.0"
