"""Markers of the integration tests (registered here, next to the tests that use them)."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "chromium: renders a report's index.html in headless Chromium (Debian package `chromium`); "
        "skipped when it is not installed",
    )
