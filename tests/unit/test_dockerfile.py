"""The Dockerfile, without a Docker engine: what can be read from it, and its build steps run.

No engine runs on the development machines, so the image itself is never built here. Instead:
the instructions are parsed and checked (pinned base, numeric non-root user, exec-form
entrypoint, ports, labels), and the build stage's RUN steps are run as written, with its ENV, in a
fresh directory, with `python` being this interpreter, and must yield a working `leader-sidecar`.

Speed: by default the steps run with pip told (through its environment, the steps unchanged)
to build and install the package only, offline and without an isolated build environment
(PIP_NO_DEPS, PIP_NO_INDEX, PIP_NO_BUILD_ISOLATION); the venv then sees this interpreter's
installed dependencies through a .pth file. That takes seconds. LEADER_SIDECAR_TEST_IMAGE_DEPS=1
runs the steps exactly as the image build does, dependencies downloaded from the index included
(about a minute).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sidecar.cli import OPTIONS

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
FULL = os.environ.get("LEADER_SIDECAR_TEST_IMAGE_DEPS") == "1"


@dataclass
class Stage:
    base: str
    name: str
    args: dict[str, str] = field(default_factory=dict)
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    def one(self, keyword: str) -> str:
        (rest,) = self.all(keyword)
        return rest

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for rest in self.all("ENV"):
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = self.expand(value, env)
        return env

    def labels(self) -> dict[str, str]:
        labels: dict[str, str] = {}
        for rest in self.all("LABEL"):
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                labels[key] = self.expand(value)
        return labels

    def expand(self, text: str, extra: dict[str, str] | None = None) -> str:
        known = {**self.args, **(extra or {})}
        return re.sub(
            r"\$\{(\w+)\}|\$(\w+)",
            lambda m: known.get(m.group(1) or m.group(2), m.group(0)),
            text,
        )


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def build(self) -> Stage:
        return self.stages[0]

    @property
    def runtime(self) -> Stage:
        return self.stages[-1]


def parse(path: Path = DOCKERFILE) -> Dockerfile:
    """Logical instructions: comments dropped, continuation lines joined, ARGs tracked."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        if raw.lstrip().startswith("#") or (not raw.strip() and not pending):
            continue
        if raw.endswith("\\"):
            pending += raw[:-1] + " "
            continue
        lines.append(pending + raw)
        pending = ""
    assert not pending, "a continuation line ends the file"
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        keyword, _, rest = line.strip().partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            image, _, name = rest.partition(" AS ")
            base = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], image.strip())
            stages.append(Stage(base=base, name=name.strip()))
        elif keyword == "ARG":
            key, _, default = rest.partition("=")
            if not stages:
                global_args[key] = default
            else:  # a stage re-declares a global ARG, or declares its own
                stages[-1].args[key] = default or global_args.get(key, "")
        else:
            assert stages, f"{keyword} before FROM"
            stages[-1].instructions.append((keyword, rest))
    return Dockerfile(global_args, stages)


def pyproject() -> dict[str, object]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]  # type: ignore[no-any-return]


def chart_values() -> dict[str, object]:
    import yaml  # a kubernetes-asyncio dependency

    values: dict[str, object] = yaml.safe_load(
        (REPO / "charts" / "leader-sidecar" / "values.yaml").read_text()
    )
    return values


# -------------------------------------------------------------------------- the instructions


def test_the_base_is_a_slim_python_pinned_to_a_patch_release() -> None:
    dockerfile = parse()
    base = dockerfile.global_args["PYTHON_IMAGE"]
    m = re.fullmatch(r"python:(\d+)\.(\d+)\.(\d+)-slim-(bookworm|trixie)", base)
    assert m, f"not a pinned slim Python: {base}"
    assert [s.base for s in dockerfile.stages] == [base, base]
    assert dockerfile.build.name == "build"
    required = re.fullmatch(r">=(\d+)\.(\d+)", str(pyproject()["requires-python"]))
    assert required
    assert (int(m[1]), int(m[2])) >= (int(required[1]), int(required[2]))


def test_it_runs_as_a_numeric_non_root_user_the_chart_knows() -> None:
    user = parse().runtime.one("USER")
    uid, gid = (int(part) for part in user.split(":"))
    assert uid > 0 and gid > 0
    security = chart_values()["securityContext"]
    assert isinstance(security, dict)
    assert (security["runAsUser"], security["runAsGroup"]) == (uid, gid)
    assert security["runAsNonRoot"] is True


def test_the_entrypoint_needs_no_shell() -> None:
    runtime = parse().runtime
    scripts = pyproject()["scripts"]
    assert isinstance(scripts, dict)
    assert json.loads(runtime.one("ENTRYPOINT")) == ["leader-sidecar"]
    assert "leader-sidecar" in scripts
    assert json.loads(runtime.one("CMD")) == ["run"]
    assert not runtime.all("HEALTHCHECK")  # Kubernetes ignores it; the chart's probes exec python
    env = runtime.env()
    venv = runtime.args["VENV"]
    assert env["PATH"].startswith(f"{venv}/bin:")  # `python` and `leader-sidecar` are the venv's
    # Only the virtualenv comes from the build stage.
    copies = runtime.all("COPY")
    assert [runtime.expand(c) for c in copies] == [f"--from=build {venv} {venv}"]


def test_it_exposes_the_ports_the_sidecar_and_the_chart_use() -> None:
    exposed = {int(p) for p in parse().runtime.one("EXPOSE").split()}
    defaults = {o.flag: o.default for o in OPTIONS}
    cli_ports = {
        int(str(defaults[f]).rsplit(":", 1)[1]) for f in ("--http-address", "--grpc-address")
    }
    values = chart_values()
    chart_ports = {values["http"]["port"], values["grpc"]["port"]}  # type: ignore[index]
    assert exposed == cli_ports == chart_ports == {4040, 4041}


def test_it_carries_oci_labels() -> None:
    runtime = parse().runtime
    labels = runtime.labels()
    oci = "org.opencontainers.image."
    assert labels[oci + "title"] == "leader-sidecar"
    assert labels[oci + "version"] == pyproject()["version"]
    assert labels[oci + "licenses"] == pyproject()["license"]
    assert labels[oci + "description"]
    assert labels[oci + "base.name"] == parse().global_args["PYTHON_IMAGE"]


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics for the patterns used here: last match wins, `!` re-includes."""
    ignored = False
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(p, pattern) for p in prefixes) or (
            pattern.startswith("**/") and fnmatch.fnmatchcase(parts[-1], pattern[3:])
        ):
            ignored = not negate
    return ignored


def test_the_build_context_holds_what_the_build_copies_and_no_more() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for rest in parse().build.all("COPY"):
        *sources, _ = rest.split()
        for source in sources:
            path = source.rstrip("/")
            assert (REPO / path).exists(), path
            assert not _ignored(path, patterns), f"{path} is excluded by .dockerignore"
            assert not _ignored(f"{path}/cli.py" if path == "sidecar" else path, patterns)
    for other in ("tests/unit/test_config.py", ".git/HEAD", "charts/leader-sidecar/Chart.yaml"):
        assert _ignored(other, patterns), other
    assert _ignored("sidecar/__pycache__/cli.cpython-311.pyc", patterns)


# ------------------------------------------------------------------------ the build, for real


def _copy_context(dest: Path) -> None:
    """What the build stage's COPY instructions put into its WORKDIR."""
    for rest in parse().build.all("COPY"):
        *sources, _ = rest.split()
        for source in sources:
            src = REPO / source.rstrip("/")
            if src.is_dir():
                ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
                shutil.copytree(src, dest / src.name, ignore=ignore)
            else:
                shutil.copy2(src, dest / src.name)


@pytest.mark.timeout(600 if FULL else 120)
def test_the_build_steps_install_a_working_leader_sidecar(tmp_path: Path) -> None:
    build = parse().build
    src, venv, wheels, shim = (tmp_path / d for d in ("src", "venv", "wheels", "bin"))
    for d in (src, shim):
        d.mkdir()
    _copy_context(src)
    # `python` in the steps is this interpreter (a script, not a symlink: a venv's interpreter
    # finds its pyvenv.cfg only where it really lives).
    (shim / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    (shim / "python").chmod(0o755)
    env = {
        **os.environ,
        **build.env(),
        "VENV": str(venv),
        "WHEELS": str(wheels),
        "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}",
    }
    assert set(build.args) == {"VENV", "WHEELS"}  # the stage's paths, all swapped for temp dirs
    if not FULL:
        env.update(PIP_NO_DEPS="1", PIP_NO_INDEX="1", PIP_NO_BUILD_ISOLATION="0")
    for step in build.all("RUN"):
        result = subprocess.run(
            ["/bin/sh", "-c", step], cwd=src, env=env, capture_output=True, text=True
        )
        assert result.returncode == 0, f"{step}\n{result.stdout}\n{result.stderr}"

    site = Path(
        subprocess.check_output(
            [
                venv / "bin" / "python",
                "-c",
                "import sysconfig; print(sysconfig.get_path('purelib'))",
            ],
            text=True,
        ).strip()
    )
    assert not (venv / "bin" / "pip").exists() and not (site / "pip").exists()
    if not FULL:  # the dependencies this interpreter has, after the venv's own packages
        paths = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
        (site / "zz_test_dependencies.pth").write_text("\n".join(sorted(paths)) + "\n")

    # Every module has bytecode that is used without checking the source (flags: hash-based,
    # unchecked), so a read-only image never compiles at start.
    tag = sys.implementation.cache_tag
    modules = list((site / "sidecar").rglob("*.py"))
    assert len(modules) > 10
    for module in modules:
        pyc = module.parent / "__pycache__" / f"{module.stem}.{tag}.pyc"
        assert pyc.exists(), pyc
        assert int.from_bytes(pyc.read_bytes()[4:8], "little") == 0b01, pyc

    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LEADER_SIDECAR_", "PYTHON"))}
    run = [venv / "bin" / "leader-sidecar"]

    def outside(*args: str | Path) -> subprocess.CompletedProcess[str]:
        # Not from the checkout, where `import sidecar` would find the source instead.
        return subprocess.run(args, env=clean, cwd=tmp_path, capture_output=True, text=True)

    version = outside(*run, "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"leader-sidecar {pyproject()['version']}"
    helped = outside(*run, "run", "--help")
    assert helped.returncode == 0, helped.stderr
    assert "--election" in helped.stdout and "--http-address" in helped.stdout
    where = outside(venv / "bin" / "python", "-c", "import sidecar; print(sidecar.__file__)")
    assert Path(where.stdout.strip()).is_relative_to(site), where  # the wheel's, not the source
