"""pytest's hook for this suite: the launcher's server imports train.py while the first tests run."""
import launcher


def pytest_sessionstart(session):
    launcher.start_server()
