"""pytest's hooks for this suite: the launcher's server imports train.py while the first tests run, and the notes
train.py itself silences (DCP's on a one-process run) stay silent under pytest, which resets warning filters."""
import launcher


def pytest_configure(config):
    config.addinivalue_line("filterwarnings", "ignore:torch.distributed is disabled, unavailable or uninitialized")


def pytest_sessionstart(session):
    launcher.start_server()
