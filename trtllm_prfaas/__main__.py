"""``python -m trtllm_prfaas`` runs the ``prfaas`` CLI."""

from __future__ import annotations

from trtllm_prfaas.cli import console

if __name__ == "__main__":
    console()
