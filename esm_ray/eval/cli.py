"""`esm-ray eval`: score a model against a zoo, or sweep merge specs into one table."""

from __future__ import annotations

import argparse
import json


def _is_routed(model: str) -> bool:
    from esm_ray.eval.routed import is_routed_dir

    return is_routed_dir(model)


def _is_harness_zoo(zoo) -> bool:
    from esm_ray.eval.lm_report import is_harness_zoo

    return is_harness_zoo(zoo)


def cmd_eval(args: argparse.Namespace) -> int:
    from esm_ray.errors import InputError
    from esm_ray.eval.report import ReportTable, combine, to_markdown, write_report

    if args.combine:
        tables = []
        for p in args.combine:
            try:
                tables.append(ReportTable.from_dict(json.loads(open(p).read())))
            except (OSError, ValueError, KeyError) as e:
                raise InputError(f"{p}: not a readable report.json ({e})") from None
        try:
            table = combine(tables)
        except ValueError as e:
            raise InputError(str(e)) from None
    else:
        table = _table(args)
    print(to_markdown(table))
    if args.out:
        paths = write_report(table, args.out, title=args.title)
        for kind, p in paths.items():
            print(f"{kind}: {p}")
    return 0


def _table(args: argparse.Namespace):
    from esm_ray.errors import SpecError
    from esm_ray.eval.metrics import evaluate_encoder, evaluate_lm
    from esm_ray.eval.report import ReportTable, row_from_result, write_report
    from esm_ray.eval.sweep import baseline_rows, search_alpha, sweep
    from esm_ray.zoo.layout import open_zoo

    if not args.zoo:
        raise SpecError("--zoo is required (except with --combine)")
    zoo = open_zoo(args.zoo)
    if args.sweep:
        def progress(t) -> None:  # rewrite the report after every row
            if args.out:
                write_report(t, args.out, title=args.title)

        table = sweep(args.sweep, zoo, args.merge_fn, split=args.split, tasks=args.tasks, select=args.select,
                      on_row=progress)
    elif args.model and _is_routed(args.model):  # ESM++ / SiM directory: rows per router (LM: + oracle)
        from esm_ray.eval.routed import routed_rows
        from esm_ray.eval.routed_lm import is_routed_lm_dir, routed_lm_rows

        names = list(args.tasks or zoo.tasks)
        if is_routed_lm_dir(args.model):  # a routed causal LM: each item routed on its own text
            rows = routed_lm_rows(args.name or args.model, args.model, zoo, args.split, args.tasks,
                                  prefix_tokens=args.route_prefix or None, stride=args.stride)
        else:
            rows = routed_rows(args.name or args.model, args.model, zoo, args.split, args.tasks)
        if _is_harness_zoo(zoo):
            from esm_ray.eval.lm_report import units

            table = ReportTable(names, metric="lm", split=args.split,
                                meta={"zoo": str(zoo.root), "zoo_hash": zoo.manifest.get("hash"),
                                      "units": units(zoo, names), "scorer": "esm_ray.models.lm_items"})
        else:
            table = ReportTable(names, split=args.split, meta={"zoo": str(zoo.root)})
        for row in baseline_rows(zoo, args.split, args.tasks) + rows:
            table.add(row)
    elif args.model and _is_harness_zoo(zoo) and not args.search_alpha:  # LM zoo: lm-eval's local tasks
        from esm_ray.eval.lm_report import evaluate_lm_harness, lm_baseline_rows, row_from_items, units

        names = list(args.tasks or zoo.tasks)
        res = evaluate_lm_harness(args.model, zoo, args.split, names)
        table = ReportTable(names, metric="lm", split=args.split,
                            meta={"zoo": str(zoo.root), "zoo_hash": zoo.manifest.get("hash"), "units": units(zoo, names),
                                  "scorer": "lm-evaluation-harness"})
        for row in lm_baseline_rows(zoo, args.split, names):
            table.add(row)
        table.add(row_from_items(zoo, args.name or args.model, res["items"], args.split, "model",
                                 {"model": args.model}))
    else:
        if not args.model:
            raise SpecError("give MODEL_DIR to evaluate, or --sweep SPEC ...")
        if args.search_alpha:
            res = search_alpha(zoo.base_dir, args.model, None, None, zoo, args.tasks)
            print(json.dumps({k: v for k, v in res.items() if k != "test"}, indent=2))
            result = {**res["test"], "model": args.model}
            name = f"{args.name or args.model} [α={res['alpha']:.3f} on val]"
            split = "test"
        else:
            split = args.split
            result = (evaluate_encoder(args.model, zoo, split, args.tasks) if zoo.kind == "encoder"
                      else evaluate_lm(args.model, zoo, split, args.tasks))
            name = args.name or args.model
        table = ReportTable(list(args.tasks or zoo.tasks), metric="accuracy" if zoo.kind == "encoder" else "perplexity",
                            split=split, meta={"zoo": str(zoo.root)})
        for row in baseline_rows(zoo, split, args.tasks):
            table.add(row)
        table.add(row_from_result(name, result, "model"))
    return table


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model (or sweep merge specs) against a built zoo")
    p.add_argument("model", nargs="?", help="HF model directory to evaluate")
    p.add_argument("--zoo", help="a built zoo directory (holding zoo.json); required except with --combine")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--tasks", nargs="+", help="subset of the zoo's tasks")
    p.add_argument("--sweep", nargs="+", metavar="SPEC", help="merge each spec, evaluate, one table")
    p.add_argument("--select", action="store_true",
                   help="with --sweep: choose ESM α / task-arithmetic λ on validation, then test once")
    p.add_argument("--search-alpha", action="store_true",
                   help="MODEL is an ESM merge: golden-section search of α on validation, then test once")
    p.add_argument("--name", help="row name for MODEL (default: its path)")
    p.add_argument("--route-prefix", type=int, default=32, metavar="N",
                   help="a routed LM on an LM zoo: also route each item on its first N tokens, a served "
                        "prompt's length (default 32; 0: only on the whole passage or prompt)")
    p.add_argument("--stride", type=int, default=1, metavar="N",
                   help="a routed LM on an LM zoo: route and score every N-th test item of each column only")
    p.add_argument("--title", help="title of the Markdown table and chart")
    p.add_argument("--combine", nargs="+", metavar="REPORT_JSON",
                   help="join report.json files of one zoo (a sweep run in parts) into one report")
    p.add_argument("--out", help="report directory: report.json, report.md, report.png")
    p.set_defaults(func=cmd_eval)
