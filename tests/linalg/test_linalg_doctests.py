import doctest
import importlib

import pytest

# Module objects by name: ``diagnostics.linalg.lanczos`` as an attribute is the function, not the module.
NAMES = ["lanczos", "lanczos_run", "operator", "power", "rank", "slq", "subspace", "trace"]


@pytest.mark.parametrize("name", NAMES)
def test_doctests(name):
    import torch

    module = importlib.import_module(f"diagnostics.linalg.{name}")
    result = doctest.testmod(module, extraglobs={"torch": torch}, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
