"""Write CurveZMQ key pairs for the relay's two sides and the workers, once (existing keys kept).

    python gen_curve_keys.py DIR  ->  DIR/prefill.public, DIR/prefill.secret,
                                      DIR/decode.public,  DIR/decode.secret,
                                      DIR/worker.public,  DIR/worker.secret   (Z85 text)

The names are those the rendered ``prfaas.env`` files point at (``/etc/prfaas/curve``): the
worker pair is what a ``prfaas worker`` signs its plan posts with (the connector's plan server
accepts ``worker.public``, ``TRTLLM_PRFAAS_PLAN_CLIENT_KEY_FILE``). The secret files are written
mode 0600. Used by the compose testbeds' one-shot ``curve-keys`` service.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import zmq


def main(key_dir: Path) -> int:
    key_dir.mkdir(parents=True, exist_ok=True)
    for role in ("prefill", "decode", "worker"):
        public_path, secret_path = key_dir / f"{role}.public", key_dir / f"{role}.secret"
        if secret_path.exists() and public_path.exists():
            continue
        public, secret = zmq.curve_keypair()
        public_path.write_bytes(public)
        fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(secret)
        print(f"wrote {public_path} and {secret_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "/etc/prfaas/curve")))
