"""Shim for setuptools < 77 and for tools that still call setup.py; metadata is in pyproject.toml."""

import setuptools

setuptools.setup()
