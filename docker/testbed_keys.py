"""Write the CPU compose testbed's Curve key files once (existing files are kept).

    python testbed_keys.py DIR  ->  DIR/relay-sender.json   (PrfaaS prefill workers)
                                    DIR/relay-both.json     (local PD workers: either relay role)
                                    DIR/relay-receiver.json
                                    DIR/router.json         (the router's control-plane pair)

The files are ``config.write_testbed_keyset``'s, as ``prfaas up`` writes them: JSON, mode 0600.
Every worker's control socket admits only the router's key. Kept when present, so a restarted
one-shot ``curve-keys`` service does not lock out workers holding the first keys. Run by the
compose testbed's ``curve-keys`` service into a volume the others mount read-only.
"""

from __future__ import annotations

import sys
from dataclasses import astuple
from pathlib import Path

from trtllm_prfaas.config import write_testbed_keyset


def main(key_dir: Path) -> int:
    if (key_dir / "router.json").exists():
        print(f"keys kept: {key_dir}")
        return 0
    keys = write_testbed_keyset(key_dir)
    print(f"wrote {', '.join(str(path) for path in astuple(keys))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "/etc/prfaas/keys")))
