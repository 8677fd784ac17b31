"""torch's CPU thread count is chosen on purpose (ECHOINK_THREADS, OMP_NUM_THREADS, the usable CPUs) and the
CLI applies it before any command runs."""

import pytest
import torch

from echoink_lite.cli import main
from echoink_lite.modeling import configure_torch_threads, usable_cpus


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_echoink_threads_wins_over_omp_num_threads():
    assert configure_torch_threads({"ECHOINK_THREADS": "1", "OMP_NUM_THREADS": "2"}) == (1, "ECHOINK_THREADS")
    assert torch.get_num_threads() == 1


def test_omp_num_threads_then_the_usable_cpus():
    assert configure_torch_threads({"OMP_NUM_THREADS": "1"}) == (1, "OMP_NUM_THREADS")
    assert configure_torch_threads({}) == (usable_cpus(), "usable CPUs")
    assert torch.get_num_threads() == usable_cpus()


@pytest.mark.parametrize("value", ["0", "two", "-1", "1.5"])
def test_a_bad_value_names_the_variable(value):
    with pytest.raises(ValueError, match=f"ECHOINK_THREADS='{value}'"):
        configure_torch_threads({"ECHOINK_THREADS": value})


def test_the_cli_applies_the_setting_before_the_command(monkeypatch, capsys):
    torch.set_num_threads(usable_cpus())
    monkeypatch.setenv("ECHOINK_THREADS", "1")
    assert main(["recipes", "explain"]) == 0
    assert torch.get_num_threads() == 1
    monkeypatch.setenv("ECHOINK_THREADS", "lots")
    assert main(["recipes", "explain"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ECHOINK_THREADS='lots'" in err[0]
