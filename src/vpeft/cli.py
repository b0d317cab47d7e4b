"""The ``vpeft`` command line: methods, params, tasks, train, train-multi, eval, bench, report, compare, push."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import vpeft
from vpeft.backbones.vit import VIT_PARTS
from vpeft.errors import ConfigError, VPeftError
from vpeft.tasks import DEFAULT_TASK_TYPE


def format_table(rows: list[list[str]], header: list[str]) -> str:
    """A GitHub-flavoured Markdown table."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def _requires_cell(method: dict) -> str:
    return ", ".join(method["requires"]) or "any"


def _cmd_methods(args: argparse.Namespace) -> int:
    methods = vpeft.list_methods()
    rows = [[m["name"], m["family"], m["paper"], _requires_cell(m), "yes" if m["mergeable"] else "no"] for m in methods]
    print(format_table(rows, ["method", "family", "paper", "backbone parts", "mergeable"]))
    if args.options:
        for m in methods:
            print(f"\n{m['name']}:")
            for name, text in m["options"].items() or {"(none)": ""}.items():
                print(f"  {name:12s} {text}")
    return 0


def _cmd_params(args: argparse.Namespace) -> int:
    import copy

    from vpeft.backbones.create import create_backbone

    base = create_backbone(args.model, args.num_classes, pretrained=False)  # built once, copied per method
    total = vpeft.count_parameters(base)
    rows = []
    for m in vpeft.list_methods():
        model = copy.deepcopy(base)
        note, data = "", None
        impl = vpeft.get_method(m["name"])
        if impl.stage is not None and not impl.prepared(vpeft.make_config(m["name"])):  # GPS, SPT, SCT read data
            from vpeft.methods.base import random_stage_data

            data = random_stage_data(model, args.num_classes)
            note = "selected on random stand-in data" + (
                " (SPT's count depends on the data)" if "spt" in m["name"] else ""
            )
        try:
            vpeft.apply(model, m["name"], **({"data": data} if data is not None else {}))
        except vpeft.UnsupportedBackboneError as exc:
            rows.append([m["name"], "-", "-", "-", f"n/a: {str(exc).split(';')[0]}"])
            continue
        without = vpeft.count_trainable(model, include_head=False)
        rows.append([m["name"], f"{without:,}", f"{without / 1e6:.3f}", f"{100 * without / total:.3f}%", note])
    print(f"trainable parameters on {args.model} (random init, num_classes={args.num_classes}), head excluded")
    print(format_table(rows, ["method", "trainable", "M", "of backbone", "note"]))
    return 0


#: extra spellings of generated flags
_FLAG_ALIASES = {"weight_decay": ["--wd"]}
#: RunSpec fields with hand-written flags (--opt, --model-arg) or none (the nested recipe)
_RUN_SPECIAL = ("options", "model_args", "train", "task_options")


def _add_dataclass_flags(
    parser: argparse.ArgumentParser, cls: type, title: str, exclude: Sequence[str] = (), prefix: str = ""
) -> list[str]:
    """One flag per dataclass field, with its type, default, choices and help from the field's metadata.

    Flags default to None so that values from a YAML config pass through; the help shows the field's
    default. Booleans get ``--x`` / ``--no-x``. Returns the field names that got a flag.
    """
    import typing

    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(title)
    names = []
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        kind = hints[f.name]
        if typing.get_origin(kind) is not None:  # X | None -> X
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        default = f.default if f.default is not dataclasses.MISSING else None
        text = f.metadata.get("help", "")
        help_text = f"{prefix}{text}" + (f" (default: {default})" if default not in (None, "") else "")
        flags = ["--" + f.name.replace("_", "-"), *_FLAG_ALIASES.get(f.name, [])]
        if kind is bool:
            group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            choices = f.metadata.get("choices")
            group.add_argument(*flags, dest=f.name, type=kind if kind in (int, float) else str, default=None,
                               choices=choices, metavar=None if choices else kind.__name__.upper(),
                               help=help_text)  # fmt: skip
        names.append(f.name)
    return names


def _train_fields() -> list[str]:
    from vpeft.train import TrainConfig

    return [f.name for f in dataclasses.fields(TrainConfig)]


def _train_key(key: str) -> str:
    """The TrainConfig field of a YAML key (``wd`` is short for ``weight_decay``)."""
    return "weight_decay" if key == "wd" else key


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
            with open(args.config, encoding="utf-8-sig") as f:
                base = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file '{args.config}' does not exist") from None
        except IsADirectoryError:
            raise ConfigError(
                f"-c '{args.config}' is a folder; pass a YAML file (e.g. <run folder>/config.yaml)"
            ) from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file '{args.config}' is not valid YAML: {exc}") from None
        if not isinstance(base, dict):
            raise ConfigError(f"config file '{args.config}' must hold a mapping of options")
    for section in ("train", "options", "model_args", "task_options"):
        if not isinstance(base.get(section) or {}, dict):
            raise ConfigError(
                f"'{section}' in config file '{args.config}' must be a mapping (key: value lines), "
                f"got {type(base[section]).__name__}"
            )
    train_names = _train_fields()
    train = {_train_key(k): v for k, v in (base.pop("train", {}) or {}).items()}
    for key in list(base):  # recipe keys may also sit at the top level of the YAML
        if _train_key(key) in train_names:
            train[_train_key(key)] = base.pop(key)
    for key in train_names:
        value = getattr(args, key, None)
        if value is not None:
            train[key] = value
    options = dict(base.pop("options", {}) or {})
    options.update(_parse_opts(args.opt))
    for f in dataclasses.fields(RunSpec):
        value = getattr(args, f.name, None) if f.name not in _RUN_SPECIAL else None
        if value is not None:
            base[f.name] = value
    if getattr(args, "task_opt", None):
        base["task_options"] = {**(base.get("task_options") or {}), **_parse_model_args(args.task_opt)}
    if args.model_arg:
        base["model_args"] = {**(base.get("model_args") or {}), **_parse_model_args(args.model_arg)}
    known = {f.name for f in dataclasses.fields(RunSpec)}
    unknown = sorted(set(base) - known)
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; valid: {sorted(known | set(train_names))}")
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(train) - train_fields)
    if unknown:
        raise ConfigError(f"unknown training option(s) {unknown}; valid: {sorted(train_fields)}")
    train_cfg = TrainConfig(**train)
    if not base.get("data"):
        raise ConfigError("no dataset given; pass --data kind:path (vtab1k:, fgvc:, folder:, mini:)")
    return RunSpec(**base, options=options, train=train_cfg)


def _cmd_train(args: argparse.Namespace) -> int:
    from vpeft.train import run

    spec = _spec_from_args(args)
    record = run(spec, args.out, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
        if record.get("world_size", 1) > 1 and int(os.environ.get("RANK", 0)) != 0:
            return 0
    if record.get("stage") == "search":
        print(
            f"{record['method']} search on {record['task']} (val): best subnet top-1 {record['top1']:.2f}% with "
            f"{record['trainable_params']:,} parameters (budget {record['budget']:,}) -> {args.out}"
        )
        return 0
    if record.get("reused"):
        print(f"'{args.out}' already holds this run, finished (run {record.get('run_key')}); nothing to resume")
    names = record.get("metric_names") or [record.get("primary_metric", "top1")]
    scores = ", ".join(f"top-1 {record[k]:.2f}%" if k == "top1" else f"{k} {record[k]:.2f}" for k in names)
    head = f" + head {record['head_params']:,}" if record.get("head_params") else ""
    print(
        f"{record['method']} on {record['task']} ({record.get('task_type', DEFAULT_TASK_TYPE)}, {record['mode']}, "
        f"{record['eval_split']}): {scores}, trainable {record['trainable_params']:,} (w/o head){head}, "
        f"PPT {record['ppt']:.3f}, {record['train_seconds']:.1f}s -> {args.out}"
    )
    return 0


#: MultiTaskSpec fields with hand-written flags (--data repeated, --opt, --model-arg) or none (the recipe)
_MULTI_SPECIAL = ("data", "options", "model_args", "train")


def _cmd_train_multi(args: argparse.Namespace) -> int:
    from vpeft.multi.run import MultiTaskSpec, run_multitask
    from vpeft.train import TrainConfig

    train = {k: getattr(args, k) for k in _train_fields() if getattr(args, k, None) is not None}
    base = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(MultiTaskSpec)
        if f.name not in _MULTI_SPECIAL and getattr(args, f.name, None) is not None
    }
    spec = MultiTaskSpec(**base, data=args.data, options=_parse_opts(args.opt),
                         model_args=_parse_model_args(args.model_arg), train=TrainConfig(**train))  # fmt: skip
    records = run_multitask(spec, args.out, progress=not args.quiet)
    first = records[0]
    what = "already finished" if first.get("reused") else f"{first['train_seconds']:.1f}s"
    print(f"{spec.method} multi-task run {first['multitask']['run_key']} on {len(records)} tasks ({spec.mode}, "
          f"{first['eval_split']}), {first['multitask']['trainable_params_total']:,} trainable (w/o heads), {what}:")  # fmt: skip
    for r in records:
        print(f"  {r['task']}: top-1 {r['top1']:.2f}%  (its model: {r['trainable_params']:,} trainable w/o head)")
    print(f"-> {args.out}/runs/{spec.method}+multitask/<task>/; `vpeft report {args.out}` shows delta-m beside "
          "single-task runs of the same tasks")  # fmt: skip
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from vpeft.train import evaluate_adapter

    result = evaluate_adapter(
        args.model, args.adapter, args.data, split=args.split, pretrained=not args.no_pretrained,
        pretrained_file=args.pretrained_file, batch_size=args.batch_size, device=args.device,
        model_args=_parse_model_args(args.model_arg), skip_bad_images=args.skip_bad_images,
    )  # fmt: skip
    for warning in result.get("warnings", []):
        print(f"vpeft: warning: {warning}", file=sys.stderr)
    print(
        f"{result['method']} on {result['task']} ({result['split']}, {result['images']} images): top-1 {result['top1']:.2f}%"
    )
    return 0


def _cmd_tasks(args: argparse.Namespace) -> int:
    if args.suite == "mini":
        from vpeft.data.mini import suite_sheet

        sheet = suite_sheet()
        rows = [[name, t["group"], t["num_classes"], t["sizes"]["train"], t["sizes"]["val"], t["sizes"]["test"],
                 t["description"]] for name, t in sheet["tasks"].items()]  # fmt: skip
        print(f"mini suite: {len(rows)} tasks, {sheet['image_size']}x{sheet['image_size']} px; use --data mini:<task>")
        print(format_table(rows, ["task", "group", "classes", "train", "val", "test", "what"]))
        return 0
    from vpeft.bench import load_suite
    from vpeft.tasks import get_task_type

    suite = load_suite(args.suite, args.root)
    rows = []
    for t in suite.tasks:
        task = get_task_type(t.task_type).load_task(t.data)
        sizes = [len(task.split(s)) for s in ("train", "val", "test")]
        rows.append([t.name, t.group, task.num_classes, *sizes, t.data])
    print(f"{suite.name} suite: {len(rows)} tasks" + (f" under {args.root}" if args.root else ""))
    print(format_table(rows, ["task", "group", "classes", "train", "val", "test", "data"]))
    return 0


def _csv(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


def _cmd_bench(args: argparse.Namespace) -> int:
    from vpeft.bench import SweepPlan, choose_lr_wd, load_suite, run_jobs, write_manifest
    from vpeft.bench.sweep import parse_method_options
    from vpeft.report import write_report

    suite = load_suite(args.suite, args.root, _csv(args.tasks) or None)
    methods = _csv(args.methods) or suite.defaults["methods"]
    if methods == ["all"]:  # every registered method a timm ViT (the suites' models) has the parts for
        methods = [
            m["name"]
            for m in vpeft.list_methods()
            if set(m["requires"]) <= VIT_PARTS and vpeft.get_method(m["name"]).single_run
        ]
    for m in methods:
        vpeft.get_method(m)  # unknown method: error listing the valid ones
    train = {k: getattr(args, k) for k in _train_fields() if getattr(args, k, None) is not None}
    try:
        seeds = [int(s) for s in _csv(args.seeds)] or [0]
    except ValueError:
        raise ConfigError(f"--seeds expects comma-separated integers, got '{args.seeds}'") from None
    out = Path(args.out or f"results/bench-{args.suite}")
    plan = SweepPlan(
        suite=suite, model=args.model or suite.defaults["model"], methods=methods, seeds=seeds, mode=args.mode,
        out=out, train_overrides=train, option_overrides=parse_method_options(args.opt, methods),
        pretrained=not args.no_pretrained, pretrained_file=args.pretrained_file, skip_bad_images=args.skip_bad_images,
        model_args={} if args.model else dict(suite.defaults.get("model_args") or {}),
    )  # fmt: skip
    final_jobs = plan.final_jobs()  # validates every method's options and reads every task before running anything
    executor = None
    if args.executor == "ray":
        from vpeft.bench.executors import ray_executor

        executor = ray_executor(args.address, cpus_per_job=args.cpus_per_job)
    elif args.jobs > 1:
        from vpeft.bench.executors import process_executor

        executor = process_executor(args.jobs)
    n_tasks, n_runs = len(suite.tasks), len(methods) * len(suite.tasks) * len(seeds)
    print(f"V-PEFT Bench: suite {suite.name} ({n_tasks} tasks), model {plan.model}, {len(methods)} methods, "
          f"seeds {seeds}, mode {args.mode}: {n_runs} runs -> {out}")  # fmt: skip
    try:
        if args.tune:
            print(f"tuning lr/wd on val: grid {plan.tune_grid()}")
            run_jobs(plan.tune_jobs(), executor)
            final_jobs = plan.final_jobs(choose_lr_wd(plan))
        write_manifest(plan, final_jobs)
        counts = run_jobs(final_jobs, executor)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished runs are kept in {out}; run the same command again to resume", file=sys.stderr)
        return 130
    busy = f", {counts['busy']} running in another process" if counts.get("busy") else ""
    print(f"sweep: {counts['done']} run, {counts['skipped']} already finished, {counts['failed']} failed{busy}")
    if counts["done"] + counts["skipped"] == 0:
        print("no finished runs to report", file=sys.stderr)
        return 1
    paths = write_report(out)
    print()
    print(paths["markdown"].read_text())
    plot = f"; Pareto plot: {paths['plot']}" if "plot" in paths else ""
    print(f"leaderboard: {paths['markdown']} and {paths['csv']}{plot}")
    return 0 if counts["failed"] == 0 else 1


def _cmd_report(args: argparse.Namespace) -> int:
    from vpeft.report import write_report

    paths = write_report(args.out, html=args.html, curves=not args.no_curves, delta_m_baseline=args.delta_m_baseline)
    print(paths["markdown"].read_text())
    plot = f"; Pareto plot: {paths['plot']}" if "plot" in paths else ""
    print(f"leaderboard: {paths['markdown']} and {paths['csv']}{plot}")
    if "curves" in paths:
        print(f"training curves: {paths['curves']}/<task>.png")
    if "html" in paths:
        print(f"HTML leaderboard (self-contained): {paths['html']}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from vpeft.report.compare import compare_runs, format_comparison, plot_comparison

    comparison = compare_runs(args.run_a, args.run_b)
    print(format_comparison(comparison, all_options=args.all_options), end="")
    if args.plot:
        print(f"\ncurves side by side: {plot_comparison(comparison, args.plot)}")
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from vpeft.hub import push_adapter

    result = push_adapter(args.folder, args.repo_id, private=args.private, token=args.token,
                          commit_message=args.message, dry_run=args.dry_run)  # fmt: skip
    total = sum(size for _, size in result["files"])
    verb = "would upload" if args.dry_run else "uploaded"
    print(f"{verb} {len(result['files'])} files ({total / 2**20:.2f} MB) from {args.folder} to {result['repo_id']}:")
    for name, size in result["files"]:
        print(f"  {name:40s} {size:>12,} bytes")
    if result["url"]:
        print(f"-> {result['url']}; load it with vpeft.load_adapter(model, 'hf-hub:{result['repo_id']}')")
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

    p = sub.add_parser("tasks", help="list a suite's tasks with classes and split sizes")
    p.add_argument("suite", nargs="?", default="mini",
                   help="mini (embedded, default), vtab1k, fgvc, mini-dense (embedded) or ade20k")  # fmt: skip
    p.add_argument("--root", help="folder holding the suite's tasks (vtab1k, fgvc)")
    p.set_defaults(func=_cmd_tasks)

    p = sub.add_parser("train", help="train one method on one task (tune: train->val, final: train+val->test)")
    p.add_argument("-c", "--config", help="YAML file with run options; command-line flags override it")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, repeatable (each method's options: `vpeft methods --options`)")  # fmt: skip
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE", help="timm.create_model kwarg")
    p.add_argument("--task-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="task-type option, repeatable (segmentation: channels, inference, crop_size, augment, ...)")  # fmt: skip
    p.add_argument("--out", required=True, help="run folder: adapter, config, log, result.json")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.add_argument(
        "--overwrite", action="store_true", help="replace the run in --out (kept until the new run succeeds)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar and no per-epoch lines")
    from vpeft.train import RunSpec, TrainConfig

    _add_dataclass_flags(p, RunSpec, "run options (YAML top-level keys)", exclude=_RUN_SPECIAL)
    _add_dataclass_flags(p, TrainConfig, "training recipe (YAML key `train:`)")
    p.set_defaults(func=_cmd_train)

    from vpeft.multi.run import MultiTaskSpec

    p = sub.add_parser("train-multi", help="train one adapter per task jointly on one backbone (mixed batches)")
    p.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="SPEC",
        help="a task's dataset spec, repeat per task (vtab1k:<dir>, fgvc:<dir>, folder:<dir>, mini:<task>)",
    )
    p.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method option, repeatable, the same for every task (`vpeft methods --options`)",
    )
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE", help="timm.create_model kwarg")
    p.add_argument(
        "--out",
        required=True,
        help="output folder (a bench folder: its report then shows delta-m); runs go to runs/<method>+multitask/",
    )
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines")  # fmt: skip
    _add_dataclass_flags(p, MultiTaskSpec, "multi-task run options", exclude=_MULTI_SPECIAL)
    _add_dataclass_flags(p, TrainConfig, "training recipe (batch-size: the mixed batch, split equally over the tasks)")
    p.set_defaults(func=_cmd_train_multi)

    p = sub.add_parser("bench", help="a resumable sweep over methods x tasks x seeds, then the leaderboard")
    p.add_argument("--suite", default="mini",
                   help="mini (embedded, default), vtab1k, fgvc, mini-dense (embedded, dense tasks) or ade20k")  # fmt: skip
    p.add_argument("--root", help="folder holding the suite's tasks (vtab1k, fgvc)")
    p.add_argument("--model", help="backbone (default: the suite's, vpeft/vit-mini for mini)")
    p.add_argument("--methods", help="comma-separated methods, or all (default: the suite's list)")
    p.add_argument("--tasks", help="comma-separated subset of the suite's tasks")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    p.add_argument("--mode", default="final", choices=["tune", "final"], help="protocol mode of the runs")
    p.add_argument("--tune", action="store_true", help="first pick lr/wd per (method, task) on val")
    p.add_argument("--opt", action="append", default=[], metavar="METHOD.KEY=VALUE", help="method option, repeatable")
    p.add_argument("--out", help="output folder (default results/bench-<suite>)")
    p.add_argument("--executor", default="local", choices=["local", "ray"], help="where runs execute")
    p.add_argument("--jobs", type=int, default=1, help="local runs in parallel, in worker processes (CPU: cores)")
    p.add_argument("--address", help="Ray cluster: auto or HOST:PORT (default: start a local Ray instance)")
    p.add_argument("--cpus-per-job", type=float, default=1.0, help="Ray: CPUs per run where there is no GPU")
    p.add_argument("--no-pretrained", action="store_true", help="random-init backbone (baseline)")
    p.add_argument("--pretrained-file", help="local backbone weights")
    p.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images and count them")
    _add_dataclass_flags(p, TrainConfig, "training recipe (overrides the suite's)", exclude=("seed",))
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("report", help="leaderboard (Markdown, CSV, HTML), Pareto plot and curves of a bench folder")
    p.add_argument("out", help="the bench output folder")
    p.add_argument("--delta-m-baseline", metavar="METHOD",
                   help="single-task method that multi-task runs' delta-m is relative to (default: their own method)")  # fmt: skip
    p.add_argument("--html", action="store_true", help="also leaderboard.html: one self-contained interactive page")
    p.add_argument("--no-curves", action="store_true", help="skip the per-task training curves (curves/<task>.png)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("compare", help="two run folders side by side: differing options, metrics, curves")
    p.add_argument("run_a", metavar="RUN_A", help="run folder (or its result.json)")
    p.add_argument("run_b", metavar="RUN_B", help="run folder (or its result.json)")
    p.add_argument("--all-options", action="store_true", help="also list the options the two runs share")
    p.add_argument("--plot", metavar="PNG", help="also write both runs' curves side by side to this PNG")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser(
        "push", help="upload a saved adapter folder (weights, config, model card) to the Hugging Face Hub"
    )
    p.add_argument("folder", help="a run folder or a folder written by vpeft.save_adapter (with its README.md card)")
    p.add_argument("repo_id", help="Hub repository: <user or organisation>/<name> (created if absent)")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--token", help="Hub token (default: the login of `hf auth login` or HF_TOKEN)")
    p.add_argument("--message", help="commit message")
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded; contact nothing")
    p.set_defaults(func=_cmd_push)

    p = sub.add_parser("eval", help="accuracy of a saved adapter on a task split")
    p.add_argument("--model", required=True, help="the backbone the adapter was trained on")
    p.add_argument("--adapter", required=True, help="run folder holding adapter.safetensors, or hf-hub:<repo id>")
    p.add_argument("--data", required=True, help="dataset spec")
    p.add_argument("--split", default="test", choices=["train", "val", "trainval", "test"], help="split to score")
    p.add_argument("--no-pretrained", action="store_true", help="the adapter was trained on a random-init backbone")
    p.add_argument("--pretrained-file", help="local backbone weights the adapter was trained on")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE", help="timm.create_model kwarg")
    p.add_argument("--batch-size", type=int, default=64, help="evaluation batch size (default 64)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images and count them")
    p.set_defaults(func=_cmd_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (VPeftError, FileNotFoundError) as exc:
        print(f"vpeft: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a read-only folder, a full disk: the message names the path
        print(f"vpeft: error: {exc}; check that the path exists, is writable and its disk has space", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vpeft: interrupted; finished work is kept (train: rerun with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
