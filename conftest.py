"""pytest's hook for this suite: train.launch's server imports train.py (4 s) while the first tests run."""
import train


def pytest_sessionstart(session):
    train.start_launcher()
