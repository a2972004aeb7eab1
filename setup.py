"""The optional C parts: the Avro walk of datasync.avrowalk and the snapshot block fill of
datasync.snapshotfile; without a C compiler their pure-Python versions are used."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("datasync._avrowalk", ["service/datasync/_avrowalk.c"], optional=True),
        Extension("datasync._snapblock", ["service/datasync/_snapblock.c"], optional=True),
    ]
)
