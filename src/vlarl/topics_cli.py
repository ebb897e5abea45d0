"""``vlarl topics``: print the topic table."""

from __future__ import annotations

import argparse

from vlarl.topics import markdown_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--markdown", action="store_true", help="markdown table (the default)")


def run(args: argparse.Namespace) -> int:
    print(markdown_table())
    return 0
