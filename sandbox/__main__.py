"""`python -m sandbox [--host H] [--port P] [--bbmsl-public-key-file F | --bbmsl-keys-dir D]`.

Everything else comes from `REFUNDQ_SANDBOX_*` variables (see `sandbox/config.py`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sandbox.config import SandboxConfig
from sandbox.keys import PRIVATE_KEY_NAME, PUBLIC_KEY_NAME, generate_bbmsl_keypair
from sandbox.serve import DEFAULT_HOST, DEFAULT_PORT, env_lines, run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sandbox", description="Serve the four simulated refund gateways."
    )
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    keys = parser.add_mutually_exclusive_group()
    keys.add_argument(
        "--bbmsl-public-key-file", type=Path, help="the bbmsl merchant's public key (PEM)"
    )
    keys.add_argument(
        "--bbmsl-keys-dir",
        type=Path,
        help=(
            f"use {PUBLIC_KEY_NAME} from this directory, generating a key pair there if it has "
            "none, and print the REFUNDQ_* lines a worker needs"
        ),
    )
    args = parser.parse_args(argv)

    public_key_file: Path | None = args.bbmsl_public_key_file
    private_path: Path | None = None
    if args.bbmsl_keys_dir is not None:
        private_path = args.bbmsl_keys_dir / PRIVATE_KEY_NAME
        public_key_file = args.bbmsl_keys_dir / PUBLIC_KEY_NAME
        if not (private_path.exists() and public_key_file.exists()):
            private_path, public_key_file = generate_bbmsl_keypair(args.bbmsl_keys_dir)
    # An explicit option wins over REFUNDQ_SANDBOX_BBMSL_PUBLIC_KEY[_FILE]; without one, nothing
    # is passed, because passing None would silently erase what the environment says.
    config = (
        SandboxConfig(
            bbmsl_public_key=public_key_file.read_text(encoding="utf-8"),
            bbmsl_public_key_file=public_key_file,
        )
        if public_key_file is not None
        else SandboxConfig()
    )
    base_url = f"http://{args.host}:{args.port}"
    if private_path is not None:
        print("\n".join(env_lines(base_url, config, private_path)))
    print(f"refundq sandbox serving on {base_url}", file=sys.stderr)
    run(args.host, args.port, config)


if __name__ == "__main__":
    main()
