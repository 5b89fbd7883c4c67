"""OpenBao dev server fixtures (written with the vault backend)."""
