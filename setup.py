"""Declares and builds the Cython extensions; all metadata lives in pyproject.toml."""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("INGESTD_CYTHON_DEBUG") == "1"

extensions = [
    Extension("ingestd._codec", ["ext/ingestd/_codec.pyx"]),
    Extension("ingestd._trie", ["ext/ingestd/_trie.pyx"]),
    Extension("ingestd._copy", ["ext/ingestd/_copy.pyx"]),
    Extension("ingestd._message", ["ext/ingestd/_message.pyx"]),
    Extension("ingestd._inbound", ["ext/ingestd/_inbound.pyx"]),
    Extension("ingestd._rows", ["ext/ingestd/_rows.pyx"]),
    Extension("ingestd._session", ["ext/ingestd/_session.pyx"]),
    # Linux only (epoll): the plain-TCP transport (ingestd.transport.epoll).
    Extension("ingestd._epoll", ["ext/ingestd/_epoll.pyx"]),
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["ext"],
        compiler_directives={
            "language_level": "3",
            "boundscheck": DEBUG,
            "wraparound": False,
            "initializedcheck": DEBUG,
            "cdivision": True,
            "embedsignature": True,
        },
        annotate=DEBUG,
    ),
)
