"""The ``vpeft`` command line: ``vpeft methods``, ``vpeft params``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import vpeft
from vpeft.errors import VPeftError


def format_table(rows: list[list[str]], header: list[str]) -> str:
    """A GitHub-flavoured Markdown table."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def _cmd_methods(args: argparse.Namespace) -> int:
    methods = vpeft.list_methods()
    rows = [
        [m["name"], m["family"], m["paper"], ", ".join(m["backbones"]), "yes" if m["mergeable"] else "no"]
        for m in methods
    ]
    print(format_table(rows, ["method", "family", "paper", "backbones", "mergeable"]))
    if args.options:
        for m in methods:
            print(f"\n{m['name']}:")
            for name, text in m["options"].items() or {"(none)": ""}.items():
                print(f"  {name:12s} {text}")
    return 0


def _cmd_params(args: argparse.Namespace) -> int:
    import timm

    rows = []
    for m in vpeft.list_methods():
        model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes)
        total = vpeft.count_parameters(model)
        try:
            vpeft.apply(model, m["name"])
        except vpeft.UnsupportedBackboneError as exc:
            rows.append([m["name"], "-", "-", "-", f"n/a: {str(exc).split(';')[0]}"])
            continue
        without = vpeft.count_trainable(model, include_head=False)
        rows.append([m["name"], f"{without:,}", f"{without / 1e6:.3f}", f"{100 * without / total:.3f}%", ""])
    print(f"trainable parameters on {args.model} (random init, num_classes={args.num_classes}), head excluded")
    print(format_table(rows, ["method", "trainable", "M", "of backbone", "note"]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vpeft", description=vpeft.__doc__)
    parser.add_argument("--version", action="version", version=f"vpeft {vpeft.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("methods", help="list the registered PEFT methods")
    p.add_argument("--options", action="store_true", help="also list each method's options with their help")
    p.set_defaults(func=_cmd_methods)
    p = sub.add_parser("params", help="trainable-parameter count of every method, with defaults, on one timm model")
    p.add_argument("--model", default="vit_base_patch16_224", help="timm model name (built from random weights)")
    p.add_argument("--num-classes", type=int, default=100, help="classes of the classifier head")
    p.set_defaults(func=_cmd_params)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except VPeftError as exc:
        print(f"vpeft: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
