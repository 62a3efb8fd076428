"""Test harnesses that ship with the package (network namespaces for multi-host tests)."""
