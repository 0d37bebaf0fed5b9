"""The README starts with the two set-up commands, and CI runs the second one verbatim."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_starts_with_two_setup_commands():
    text = (ROOT / "README.md").read_text()
    head = text.split("```bash\n", 1)[0]
    assert head.strip() == "# actsparse", "nothing but the title may come before the set-up commands"
    cmds = _readme_commands()
    assert len(cmds) == 2
    assert "actsparse measure" in cmds[0] and "pytest" in cmds[1]
    for c in cmds:
        assert "pip install -q torch==2.13.0" in c  # the CPU wheel first


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _readme_commands()[1] in ci
