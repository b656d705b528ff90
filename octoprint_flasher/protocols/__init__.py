"""Byte-level wire protocols over a transport the caller opens. No OctoPrint, no threads."""
