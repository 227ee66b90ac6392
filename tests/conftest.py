"""Shared fixtures: a free TCP port for process groups. The suite writes nothing into the repository: no
bytecode here or in the processes it starts (pytest.ini turns off pytest's cache), and every run works in a
temporary folder."""
import os
import socket
import sys

import pytest

sys.dont_write_bytecode = True
os.environ["PYTHONDONTWRITEBYTECODE"] = "1"


@pytest.fixture
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def restore_ops(monkeypatch):
    """bind_ops() rebinds train_gpt's op names: the test's bindings are undone after it."""
    import train_gpt
    for name in ("attention_masks", "attention", "attention_inputs", "attention_block", "residual_projection",
                 "relu2_mlp", "head_loss"):
        monkeypatch.setattr(train_gpt, name, getattr(train_gpt, name))
