"""Small helpers shared across OpenDiT."""
