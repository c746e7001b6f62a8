"""Wire formats: client messages to core commands, core events to frames."""
