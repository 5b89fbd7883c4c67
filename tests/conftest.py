"""Test-suite-wide plugins: the real servers some suites need."""

pytest_plugins = ["tests.servers.openbao", "tests.servers.moto", "tests.servers.databases"]
