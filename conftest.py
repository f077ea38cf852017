"""pytest configuration shared by the whole suite: the real-server harness fixtures."""

pytest_plugins = ["tests.harness.fixtures"]
