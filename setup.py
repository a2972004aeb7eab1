"""The optional C walk of datasync.avrowalk; without a C compiler the pure-Python walk is used."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("datasync._avrowalk", ["service/datasync/_avrowalk.c"], optional=True)])
