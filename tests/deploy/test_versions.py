"""Triton and TensorRT-LLM versions agree everywhere with ``trtllm_prfaas/deploy/versions.py``.

Every file that names a Triton tag or a TensorRT-LLM git tag is grepped: a default, a build
argument or an image name must be a supported pair (25.12 with v1.2.0, the audit's 6a, fails
here), the docs' tag table must equal the module's, and the ``trtllm`` extra must admit exactly
the supported line.
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.deploy.conftest import DEPLOYMENT_DOC, DOCKER_DIR, ROOT
from trtllm_prfaas.deploy import versions
from trtllm_prfaas.errors import ConfigError

_TAG = re.compile(r"TRITON_TAG(?:=|:-|\s*=\s*)(\d\d\.\d\d)|tritonserver:(\d\d\.\d\d)-trtllm")
_REF = re.compile(r"TRTLLM_REF(?:=|:-|\s*=\s*)(v\d+\.\d+\.\d+)")
_TABLE_ROW = re.compile(r"^\|\s*`?(\d\d\.\d\d)`?\s*\|\s*([\d.]+)\s*\|", re.MULTILINE)


def versioned_files() -> list[Path]:
    """Every file that may name a Triton or TensorRT-LLM tag."""
    files = [DEPLOYMENT_DOC, ROOT / "README.md", ROOT / "plugins" / "triton" / "README.md"]
    files += sorted(DOCKER_DIR.iterdir())
    files += sorted((ROOT / "scripts").glob("*")) + sorted((ROOT / "engines").glob("*"))
    files += sorted((ROOT / "trtllm_prfaas" / "deploy").glob("*.py"))
    return [p for p in files if p.is_file()]


def tags_and_refs(text: str) -> list[tuple[int, str | None, str | None]]:
    """(line number, Triton tag, TensorRT-LLM ref) for each line naming either."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        tags = {a or b for a, b in _TAG.findall(line)}
        refs = set(_REF.findall(line))
        assert len(tags) <= 1 and len(refs) <= 1, f"line {number}: {line}"
        if tags or refs:
            found.append((number, next(iter(tags), None), next(iter(refs), None)))
    return found


def test_the_defaults_are_a_supported_pair() -> None:
    assert versions.check_pair(versions.DEFAULT_TRITON_TAG, versions.DEFAULT_TRTLLM_REF) == "1.2.1"
    assert versions.supported_triton_tags() == ("26.03", "26.04", "26.05", "26.06", "26.07")


@pytest.mark.parametrize(
    ("tag", "ref", "message"),
    [
        ("25.12", "v1.2.0", "carries TensorRT-LLM 1.1.0"),  # the old defaults (audit 6a)
        ("26.03", "v1.2.1", "use v1.2.0"),
        ("26.07", "v1.2.0", "use v1.2.1"),
        ("27.01", "v1.2.1", "not in the compatibility table"),
    ],
)
def test_a_mismatched_pair_is_refused_naming_both(tag: str, ref: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        versions.check_pair(tag, ref)


@pytest.mark.parametrize("path", versioned_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_named_tag_is_supported_and_pairs_agree(path: Path) -> None:
    for number, tag, ref in tags_and_refs(path.read_text()):
        where = f"{path.relative_to(ROOT)}:{number}"
        if tag is not None and ref is not None:
            versions.check_pair(tag, ref)
        elif tag is not None:
            assert tag in versions.supported_triton_tags(), where
        else:
            refs = {versions.trtllm_ref(v) for v in versions.SUPPORTED_TRTLLM_VERSIONS}
            assert ref in refs, where


def test_dockerfile_and_compose_default_to_the_module_defaults() -> None:
    dockerfile = (DOCKER_DIR / "triton.Dockerfile").read_text()
    assert f"ARG TRITON_TAG={versions.DEFAULT_TRITON_TAG}\n" in dockerfile
    assert f"ARG TRTLLM_REF={versions.DEFAULT_TRTLLM_REF}\n" in dockerfile
    compose = (DOCKER_DIR / "compose.gpu.yml").read_text()
    assert f"${{TRITON_TAG:-{versions.DEFAULT_TRITON_TAG}}}" in compose
    assert f"${{TRTLLM_REF:-{versions.DEFAULT_TRTLLM_REF}}}" in compose


def test_the_deployment_guide_table_is_the_module_table() -> None:
    rows = dict(_TABLE_ROW.findall(DEPLOYMENT_DOC.read_text()))
    assert rows == dict(versions.TRITON_TRTLLM_VERSIONS)
    guide = DEPLOYMENT_DOC.read_text()
    assert f"TRITON_TAG={versions.DEFAULT_TRITON_TAG}" in guide
    assert f"TRTLLM_REF={versions.DEFAULT_TRTLLM_REF}" in guide


def test_the_trtllm_extra_admits_exactly_the_supported_line() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["optional-dependencies"]["trtllm"] == [versions.TRTLLM_EXTRA]
    spec = Requirement(versions.TRTLLM_EXTRA).specifier
    for version in versions.SUPPORTED_TRTLLM_VERSIONS:
        assert spec.contains(version)
    for version in {*versions.TRITON_TRTLLM_VERSIONS.values()} - {
        *versions.SUPPORTED_TRTLLM_VERSIONS
    }:
        assert not spec.contains(version), version


def test_the_finder_sees_an_old_pair() -> None:
    found = tags_and_refs("x\n  --build-arg TRITON_TAG=25.12 --build-arg TRTLLM_REF=v1.2.0 .\n")
    assert found == [(2, "25.12", "v1.2.0")]
    with pytest.raises(ConfigError):
        versions.check_pair("25.12", "v1.2.0")


@pytest.mark.parametrize(
    ("ref", "installed", "tag", "message"),
    [
        ("v1.2.1", "1.2.1", "26.07", None),
        ("v1.2.1", "1.2.1+cu13", None, None),
        ("v1.1.0", "1.1.0", "25.12", "not supported"),  # a consistent but unsupported pair
        ("v1.2.1", "1.2.0", "26.03", "but tensorrt_llm 1.2.0 is installed"),
        ("v1.2.0", "1.2.0", "26.07", "use v1.2.1"),
    ],
)
def test_the_image_build_check(ref: str, installed: str, tag: str | None, message: str) -> None:
    if message is None:
        assert versions.check_installed(ref, installed, tag) == installed.split("+")[0]
    else:
        with pytest.raises(ConfigError, match=message):
            versions.check_installed(ref, installed, tag)


def test_the_image_build_runs_the_check_as_a_command(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    dockerfile = (DOCKER_DIR / "triton.Dockerfile").read_text()
    assert 'RUN python3 -m trtllm_prfaas.deploy.versions "${TRTLLM_REF}"' in dockerfile
    assert versions.main([]) == 2

    def installed(version: str | None):
        def lookup(name: str) -> str:
            assert name == "tensorrt_llm"
            if version is None:
                raise importlib.metadata.PackageNotFoundError(name)
            return version

        return lookup

    monkeypatch.setattr(importlib.metadata, "version", installed(None))
    assert versions.main(["v1.2.1"], {}) == 1
    assert "tensorrt_llm is not installed" in capsys.readouterr().err
    monkeypatch.setattr(importlib.metadata, "version", installed("1.2.1"))
    assert versions.main(["v1.2.1"], {"NVIDIA_TRITON_SERVER_VERSION": "26.07"}) == 0
    assert versions.main(["v1.2.1"], {"NVIDIA_TRITON_SERVER_VERSION": "26.03"}) == 1
    assert "26.03" in capsys.readouterr().err


MATRIX_FEATURES = (
    "connector load", "layer-wise save", "block reuse with a cached prefix", "TP>1",
    "plan carrier", "hybrid", "prompt-plus-first-token", "Curve", "streaming via the decoupled",
    "unary prefill",
)  # fmt: skip
STATUSES = ("verified on CPU contract", "needs a GPU", "not supported")


def test_the_support_matrix_gives_each_feature_a_status_per_version_and_its_sources() -> None:
    guide = DEPLOYMENT_DOC.read_text()
    table = guide[guide.index("## Support matrix") :].split("\n## ")[0]
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in table.splitlines()
        if line.startswith("| ") and not line.startswith("| feature")
    ]
    for feature in MATRIX_FEATURES:
        matching = [row for row in rows if feature in row[0]]
        assert len(matching) == 1, feature
        _, v12, v2026, sources, _ = matching[0]
        assert v12.startswith(STATUSES) and v2026.startswith(STATUSES), feature
        assert "`" in sources, feature  # names the upstream file
    hybrid = next(row for row in rows if "hybrid" in row[0])
    assert hybrid[1].startswith("not supported") and hybrid[2].startswith("not supported")
