"""Build of the optional compiled pgoutput decoder; everything else is in pyproject.toml.

``optional=True``: without a C compiler (or Python headers) the extension is skipped with a
warning and the install succeeds; replicator.cdc.pgoutput then runs its pure-Python decoder.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "replicator.cdc._pgoutput",
            sources=["replicator/cdc/_pgoutput.c"],
            optional=True,
        )
    ]
)
