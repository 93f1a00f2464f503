"""`python -m ldm.hub push FOLDER REPO_ID`: share a trained model on the Hugging Face Hub (ldm/hub/push.py)."""

from __future__ import annotations

import argparse
import sys

from ldm.config import ConfigError
from ldm.hub.push import push


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldm.hub", description="Share models on the Hugging Face Hub.")
    commands = parser.add_subparsers(dest="command", required=True)
    push_command = commands.add_parser("push", help="upload a saved pipeline, VAE or LoRA folder with a model card, "
                                                    "in one commit")
    push_command.add_argument("folder", help="a train_unet.py or train_vae.py output_dir")
    push_command.add_argument("repo_id", help="'user/name', or 'name' under your account")
    push_command.add_argument("--hub_private", action="store_true", help="create the repository private")
    push_command.add_argument("--hub_token", default=None, help="default: HF_TOKEN or the token `hf auth login` saved")
    push_command.add_argument("--hub_license", default=None, help="license id for the model card; default: the "
                                                                  "training config's, or the data's")
    args = parser.parse_args(argv)
    try:
        url = push(args.folder, args.repo_id, args.hub_token, args.hub_private, args.hub_license)
    except ConfigError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    print(url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
