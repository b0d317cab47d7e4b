"""The ``vpeft`` command line: methods, params, train, eval."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

import vpeft
from vpeft.errors import ConfigError, VPeftError


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


#: --flag -> (section, key) of RunSpec / TrainConfig; None defaults let YAML values through
_TRAIN_FLAGS = {
    "epochs": int, "batch_size": int, "lr": float, "wd": float, "warmup_epochs": int, "warmup_lr": float,
    "min_lr": float, "label_smoothing": float, "drop_path": float, "clip_grad": float, "seed": int,
    "amp": str, "num_workers": int, "device": str, "eval_every": int,
}  # fmt: skip


def _parse_opts(pairs: list[str]) -> dict[str, str]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--opt expects key=value, got '{pair}' (e.g. --opt rank=8 --opt targets=q,v)")
        options[key.strip()] = value.strip()
    return options


def _parse_model_args(pairs: list[str]) -> dict:
    """key=value pairs for timm.create_model; values are read as YAML scalars (32 -> int, [1,2] -> list)."""
    import yaml

    return {k: yaml.safe_load(v) for k, v in _parse_opts(pairs).items()}


def _spec_from_args(args: argparse.Namespace):
    import yaml

    from vpeft.train import RunSpec, TrainConfig

    base: dict = {}
    if args.config:
        try:
            with open(args.config) as f:
                base = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file '{args.config}' does not exist") from None
        if not isinstance(base, dict):
            raise ConfigError(f"config file '{args.config}' must hold a mapping of options")
    train = dict(base.pop("train", {}) or {})
    for key in list(base):
        if key in _TRAIN_FLAGS or key == "weight_decay":
            train["weight_decay" if key == "wd" else key] = base.pop(key)
    if "wd" in train:
        train["weight_decay"] = train.pop("wd")
    for key in _TRAIN_FLAGS:
        value = getattr(args, key)
        if value is not None:
            train["weight_decay" if key == "wd" else key] = value
    if args.compile:
        train["compile"] = True
    options = dict(base.pop("options", {}) or {})
    options.update(_parse_opts(args.opt))
    for key in ("model", "data", "method", "mode", "preset", "pretrained_file", "num_classes"):
        value = getattr(args, key)
        if value is not None:
            base[key] = value
    if args.model_arg:
        base["model_args"] = {**(base.get("model_args") or {}), **_parse_model_args(args.model_arg)}
    if args.no_pretrained:
        base["pretrained"] = False
    if args.skip_bad_images:
        base["skip_bad_images"] = True
    if args.cache_images is not None:
        base["cache_images"] = args.cache_images
    known = {f.name for f in dataclasses.fields(RunSpec)}
    unknown = sorted(set(base) - known)
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; valid: {sorted(known | set(_TRAIN_FLAGS))}")
    try:
        train_cfg = TrainConfig(**train)
    except TypeError as exc:
        raise ConfigError(f"bad training option: {exc}") from None
    if not base.get("data"):
        raise ConfigError("no dataset given; pass --data kind:path (vtab1k:, fgvc:, folder:, mini:)")
    return RunSpec(**base, options=options, train=train_cfg)


def _cmd_train(args: argparse.Namespace) -> int:
    from vpeft.train import run

    spec = _spec_from_args(args)
    record = run(spec, args.out, resume=args.resume, progress=not args.quiet)
    print(
        f"{record['method']} on {record['task']} ({record['mode']}, {record['eval_split']}): "
        f"top-1 {record['top1']:.2f}%, trainable {record['trainable_params']:,} (w/o head), "
        f"PPT {record['ppt']:.3f}, {record['train_seconds']:.1f}s -> {args.out}"
    )
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from vpeft.train import evaluate_adapter

    result = evaluate_adapter(
        args.model, args.adapter, args.data, split=args.split, pretrained=not args.no_pretrained,
        pretrained_file=args.pretrained_file, batch_size=args.batch_size, device=args.device,
        model_args=_parse_model_args(args.model_arg),
    )  # fmt: skip
    print(
        f"{result['method']} on {result['task']} ({result['split']}, {result['images']} images): top-1 {result['top1']:.2f}%"
    )
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

    p = sub.add_parser("train", help="train one method on one task (tune: train->val, final: train+val->test)")
    p.add_argument("-c", "--config", help="YAML file with run options; command-line flags override it")
    p.add_argument("--model", help="timm model name or embedded vpeft/... backbone")
    p.add_argument("--data", help="vtab1k:<dir>, fgvc:<dir>, folder:<dir> or mini:<task>")
    p.add_argument("--method", help="PEFT method (see `vpeft methods`)")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="method option, repeatable")
    p.add_argument("--mode", choices=["tune", "final"], help="protocol mode (default final)")
    p.add_argument("--preset", choices=["vtab", "fgvc"], help="transform preset (default by data kind)")
    p.add_argument("--out", required=True, help="run folder: adapter, config, log, result.json")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.add_argument("--no-pretrained", action="store_true", help="random init of the same architecture (baseline)")
    p.add_argument("--pretrained-file", help="local weights (.safetensors, .pth, .npz)")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE", help="timm.create_model kwarg")
    p.add_argument("--num-classes", type=int, help="override the task's class count")
    p.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images and count them")
    p.add_argument("--cache-images", choices=["auto", "on", "off"], help="keep decoded inputs in memory")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    for key, kind in _TRAIN_FLAGS.items():
        p.add_argument("--" + key.replace("_", "-"), type=kind, default=None, help=f"training {key}")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="accuracy of a saved adapter on a task split")
    p.add_argument("--model", required=True, help="the backbone the adapter was trained on")
    p.add_argument("--adapter", required=True, help="run folder holding adapter.safetensors")
    p.add_argument("--data", required=True, help="dataset spec")
    p.add_argument("--split", default="test", choices=["train", "val", "trainval", "test"])
    p.add_argument("--no-pretrained", action="store_true")
    p.add_argument("--pretrained-file")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE", help="timm.create_model kwarg")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except VPeftError as exc:
        print(f"vpeft: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vpeft: interrupted; finished work is kept (train: rerun with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
