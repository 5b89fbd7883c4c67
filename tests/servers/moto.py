"""moto server fixtures (written with the aws backend)."""
