"""`esm-ray zoo build | lm (alias smollm2) | specs | tasks`: the offline test bed from the command line."""

from __future__ import annotations

import argparse


def cmd_build(args: argparse.Namespace) -> int:
    from esm_ray.zoo.build import DEFAULT_CONFIG, REDUCED_CONFIG, build_zoo, with_overrides

    cfg = with_overrides(REDUCED_CONFIG if args.reduced else DEFAULT_CONFIG, epochs=args.epochs, lr=args.lr,
                         max_steps=args.max_steps)
    zdir = build_zoo(args.out, args.tasks, reduced=args.reduced, seed=args.seed, config=cfg,
                     progress=not args.no_progress, threads=args.threads)
    print(zdir)
    return 0


def cmd_lm(args: argparse.Namespace) -> int:
    from esm_ray.zoo.lm_lora import LoraSettings
    from esm_ray.zoo.lm_zoo import build_lm_zoo

    lora = None
    if args.lora:
        d = LoraSettings()
        lora = LoraSettings(rank=args.rank or d.rank, alpha=args.lora_alpha or d.alpha, lr=args.lora_lr or d.lr)
    elif args.rank is not None or args.lora_alpha is not None or args.lora_lr is not None:
        from esm_ray.errors import InputError

        raise InputError("--rank, --lora-alpha and --lora-lr need --lora")
    zdir = build_lm_zoo(args.out, domains=args.domains, tasks=args.label_tasks, reduced=args.reduced,
                        seed=args.seed, progress=not args.no_progress, threads=args.threads, steps=args.steps,
                        retries=args.retries, lora=lora)
    print(zdir)
    return 0


def cmd_specs(args: argparse.Namespace) -> int:
    from esm_ray.zoo.specs import write_specs

    for p in write_specs(args.zoo, args.out, args.methods, args.merged_root, args.tasks):
        print(p)
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from esm_ray.zoo.tasks import DEFAULT_TASKS, TASKS, load_task

    for name, t in TASKS.items():
        mark = "*" if name in DEFAULT_TASKS else " "
        line = f"{mark} {name:<18} {', '.join(t.labels):<40} {t.rule}"
        if args.sizes:
            d = load_task(name, args.seed)
            line += f"  sizes={d.info['sizes']} majority={d.info['majority_rate']:.3f}"
        print(line)
    return 0


def register(subparsers) -> None:
    zoo = subparsers.add_parser("zoo", help="build the offline test bed (experts from packaged models and data)")
    sub = zoo.add_subparsers(dest="zoo_command", required=True)

    p = sub.add_parser("build", help="fine-tune MiniLM experts on the packaged classification tasks (cached)")
    p.add_argument("--out", help="zoo root (default $ESM_RAY_ZOO or ~/.cache/esm-ray/zoo); the zoo is <out>/<hash>")
    p.add_argument("--tasks", nargs="+", help="task names (default: the 8 default tasks; see `esm-ray zoo tasks`)")
    p.add_argument("--reduced", action="store_true", help="2 tasks, small splits, a few steps (CI)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, help="override the training epochs")
    p.add_argument("--lr", type=float, help="override the encoder learning rate")
    p.add_argument("--max-steps", type=int, help="cap the optimizer steps per expert")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_build)

    for name, aliases in (("lm", ["smollm2"]),):
        p = sub.add_parser(name, aliases=aliases, help="convert the packaged SmolLM2-135M GGUF and build its domain "
                           "and label-task experts, with lm-eval task files (cached, resumable)")
        p.add_argument("--out", help="zoo root (default $ESM_RAY_ZOO or ~/.cache/esm-ray/zoo)")
        p.add_argument("--domains", nargs="*", help="text domains (default: all 7; see docs/zoo.md)")
        p.add_argument("--label-tasks", nargs="*", help="instruction-style label tasks (default: 3)")
        p.add_argument("--steps", type=int, help="override the optimizer steps per expert")
        p.add_argument("--retries", type=int, help="an expert not better than the base on its validation split "
                       "trains again from the base with twice the steps, at most this many times (default 2)")
        p.add_argument("--reduced", action="store_true", help="2 domains + 1 task, tiny splits, 3 steps (CI)")
        p.add_argument("--lora", action="store_true", help="the LoRA zoo: each expert a PEFT LoRA adapter on "
                       "q/k/v/o/gate/up/down (same columns, data, base and steps; its own hash)")
        p.add_argument("--rank", type=int, help="LoRA rank (default 16; with --lora)")
        p.add_argument("--lora-alpha", type=float, help="LoRA lora_alpha (default 32; with --lora)")
        p.add_argument("--lora-lr", type=float, help="LoRA learning rate (default 2e-3; with --lora)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--no-progress", action="store_true")
        p.set_defaults(func=cmd_lm)

    p = sub.add_parser("specs", help="write one merge spec YAML per method for a built zoo")
    p.add_argument("zoo", help="a built zoo directory (the one holding zoo.json)")
    p.add_argument("--out", required=True, help="directory for the YAML files")
    p.add_argument("--methods", nargs="+", help="names from METHOD_TABLE (default: all)")
    p.add_argument("--merged-root", help="where merges write (default <out>/merged/<method>)")
    p.add_argument("--tasks", nargs="+", help="experts to merge (default: all of the zoo)")
    p.set_defaults(func=cmd_specs)

    p = sub.add_parser("tasks", help="list the packaged classification tasks")
    p.add_argument("--sizes", action="store_true", help="also load each task and print its split sizes")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tasks)
