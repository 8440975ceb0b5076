"""The README opens with the two commands users run, and CI runs the second."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_two_commands_and_ci_runs_the_test_one():
    commands = readme_commands()
    assert len(commands) == 2
    assert all(c.startswith('pip install -e ".[dev]" && ') for c in commands)
    assert "pytest" in commands[1]
    assert commands[1] in (ROOT / ".ci" / "run").read_text().splitlines()
    for config in commands[0].split():
        if config.endswith(".toml"):
            assert (ROOT / config).is_file(), config
