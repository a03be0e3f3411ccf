"""pytest's hooks for this suite: the launcher's server imports train.py while the first tests run, and the notes
train.py silences (train.SILENCED, each with its reason) stay silent under pytest, which resets warning filters."""
import launcher
import train


def pytest_configure(config):
    for message in train.SILENCED:
        config.addinivalue_line("filterwarnings", f"ignore:{message}")


def pytest_sessionstart(session):
    launcher.start_server()
