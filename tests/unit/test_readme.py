"""The README documents the public contract: every flag and env var, and the test command."""

from pathlib import Path

from sidecar.cli import OPTIONS

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_flag_is_in_the_readme_table() -> None:
    missing = [o.flag for o in OPTIONS if f"`{o.flag}`" not in README]
    assert not missing, f"document these flags in README.md: {missing}"


def test_the_readme_names_the_ci_test_command() -> None:
    assert "bash .ci/run" in README
    assert "leader-sidecar run --election demo" in README
