"""Build step for the one compiled piece: the entropy coder of ``tensorpress.lossless``.

It is a plain C shared library (no Python API) that the package loads with ctypes; everything
else is configured in pyproject.toml.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tensorpress.lossless._rans",
            sources=["src/tensorpress/lossless/_rans.c"],
            extra_compile_args=["-O3", "-std=c99"],
        )
    ]
)
