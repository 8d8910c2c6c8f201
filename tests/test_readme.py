"""The README's usage example runs as written."""
import re

from helpers import REPO

README = REPO / "README.md"


def test_readme_op_example_runs():
    text = README.read_text()
    section = text.split("## The op from plain PyTorch", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    out = namespace["out"]
    assert out.n_ce.item() == 2 * 64 and out.n_nitp.item() == 2 * 63
    assert namespace["hidden"].grad is not None and namespace["projector"].w_gate.grad is not None
