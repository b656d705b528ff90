"""Firmware files: the image model and one loader per file format, checked before any board is
touched."""
