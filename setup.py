"""Builds the optional C accelerator of the receiver's fast path (pathwatch/receiver/_wirescan.c).

Everything else is declared in pyproject.toml. The extension is optional: where no C compiler
is found the build goes on without it and pathwatch runs on pure Python (same results,
slower ingest); `pathwatch check-config` and /metrics say which path is in use.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "pathwatch.receiver._wirescan",
            sources=["service/pathwatch/receiver/_wirescan.c"],
            optional=True,
            extra_compile_args=["-O2"],
        )
    ]
)
