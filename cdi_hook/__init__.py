"""cdi-hook: Container Device Interface devices for runtimes that only run OCI hooks."""

__version__ = "0.1.0"
