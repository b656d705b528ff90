"""Shim for setuptools < 77 and tools that still call setup.py; metadata: pyproject.toml."""

import setuptools

setuptools.setup()
