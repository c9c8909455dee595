"""placeholder"""
from .base import Method


class ESNAC(Method):
    name = "esnac"
