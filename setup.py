"""Build step for the compiled pieces: the entropy coder of ``tensorpress.lossless`` and the
4/8-bit matmul kernel of ``tensorpress.parts``.

Both are plain C shared libraries (no Python API) that the package loads with ctypes; everything
else is configured in pyproject.toml. The kernel uses OpenMP: it links ``libgomp.so.1``, the
runtime torch's CPU build already loaded, so the two share one thread pool.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tensorpress.lossless._rans",
            sources=["src/tensorpress/lossless/_rans.c"],
            extra_compile_args=["-O3", "-std=c99"],
        ),
        Extension(
            "tensorpress.parts._qmatmul",
            sources=["src/tensorpress/parts/_qmatmul.c"],
            extra_compile_args=["-O3", "-std=gnu99", "-fopenmp"],
            extra_link_args=["-fopenmp"],
        ),
    ]
)
