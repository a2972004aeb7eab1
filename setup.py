"""The optional C extensions; without a C compiler their pure-Python twins are used.

datasync._avrowalk: the Avro walk of datasync.avrowalk. datasync._snapblock: the snapshot block fill
of datasync.snapshotfile. datasync._keyvalue: datasync.api's KeyValue.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("datasync._avrowalk", ["service/datasync/_avrowalk.c"], optional=True),
        Extension("datasync._snapblock", ["service/datasync/_snapblock.c"], optional=True),
        Extension("datasync._keyvalue", ["service/datasync/_keyvalue.c"], optional=True),
    ]
)
