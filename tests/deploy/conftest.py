"""Paths of the deployment artifacts under test."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REPO_DIR = ROOT / "plugins" / "triton" / "model_repository"
ENGINES_DIR = ROOT / "engines"
DOCKER_DIR = ROOT / "docker"
DEPLOYMENT_DOC = ROOT / "docs" / "deployment.md"
