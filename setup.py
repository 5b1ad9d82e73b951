"""Build of the optional compiled parts (the pgoutput decoder, the staging row parameters);
everything else is in pyproject.toml.

``optional=True``: without a C compiler (or Python headers) the extension is skipped with a
warning and the install succeeds; replicator.cdc.pgoutput and replicator.staging.values then
run their pure-Python twins.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "replicator.cdc._pgoutput",
            sources=["replicator/cdc/_pgoutput.c"],
            optional=True,
        ),
        Extension(
            "replicator.staging._rows",
            sources=["replicator/staging/_rows.c"],
            optional=True,
        ),
    ]
)
