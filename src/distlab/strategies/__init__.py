"""Parallelism strategies, one file each, looked up by name through ``registry``."""
