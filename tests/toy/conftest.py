import pytest


@pytest.fixture(scope="session")
def toy_out(tmp_path_factory):
    """One quick-mode folder for the demo and the appendix: the toy bases are trained once."""
    return str(tmp_path_factory.mktemp("toy"))
