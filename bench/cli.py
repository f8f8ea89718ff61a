"""Command line: python -m bench <command> [key=value ...]

    run      compose a config and run it (seeds=[0,1,2] for several seeds)
    list     the registered methods, datasets and backbones
    data     describe a dataset: files found, images per split, classes, or what is missing
    table    aggregate run records into a paper-style table
    config   print the composed config without running it
    sweep / status / cancel / report   (see their --help)
"""

from __future__ import annotations

import argparse
import sys

from bench.errors import BenchError

COMMANDS = ("run", "list", "data", "table", "config", "sweep", "status", "cancel", "report")


def _split_list(value: str) -> list[str]:
    value = value.strip()
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
    return [v.strip() for v in value.split(",") if v.strip()]


def _pop(args: list[str], key: str) -> tuple[str | None, list[str]]:
    found, rest = None, []
    for a in args:
        if a.startswith(key + "="):
            found = a.partition("=")[2]
        else:
            rest.append(a)
    return found, rest


def cmd_run(args: list[str]) -> int:
    from bench.launch import launch_runs

    seeds, args = _pop(args, "seeds")
    force, args = _pop(args, "force")
    launcher, args = _pop(args, "launcher")
    if launcher:
        args.append(f"launcher.name={launcher}")
    ablation, args = _pop(args, "ablation")
    seed_list = [int(s) for s in _split_list(seeds)] if seeds else None
    arg_sets = [args]
    if (ablation or "").lower() in ("1", "true", "yes"):
        from methods.conr import ABLATIONS

        if not any(a == "method=conr" for a in args):
            raise BenchError("ablation=true needs method=conr (the ablation switches are CoNR's)")
        arg_sets = [[*args, f"conr.ablation={v}"] for v in ABLATIONS]
    records = launch_runs(arg_sets, seeds=seed_list, force=(force or "").lower() in ("1", "true", "yes"))
    failed = [r for r in records if r.get("status") != "completed"]
    from bench.table import print_summary

    print_summary(records)
    if len(arg_sets) > 1:
        from bench.table import table_command

        print()
        table_command(["rows=ablation", "reported=false",
                       f"results_dir={records[0]['config']['results_dir'] if records and records[0].get('config') else 'results'}"])
    return 1 if failed else 0


def cmd_config(args: list[str]) -> int:
    from omegaconf import OmegaConf

    from bench.config import compose, config_hash

    cfg = compose(args)
    print(OmegaConf.to_yaml(cfg, resolve=True), end="")
    print(f"# config hash: {config_hash(cfg)}")
    return 0


def cmd_list(args: list[str]) -> int:
    from bench.config import list_cards, load_card
    from methods import BACKBONES, METHODS

    print("methods:   " + ", ".join(METHODS.names()))
    print("datasets:  " + ", ".join(list_cards()))
    print("backbones: " + ", ".join(BACKBONES.names()))
    if "-v" in args or "verbose=true" in args:
        for name in list_cards():
            c = load_card(name)
            print(f"  {name:14s} {c.get('num_classes')} classes, {c.get('image_size')} px, {c.get('description', '')}")
    return 0


def cmd_data(args: list[str]) -> int:
    import json

    from bench.config import compose
    from bench.data import describe

    as_json = "--json" in args
    cfg = compose([a for a in args if a != "--json"])
    from bench.config import to_container

    info = describe(to_container(cfg.dataset))
    print(f"dataset {info['dataset']} (loader {info['kind']}), data root {info['root']}")
    for f in info["files"]:
        print(f"  {'found  ' if f['exists'] else 'MISSING'} {f['path']}")
    for split, s in info["splits"].items():
        print(f"  split {split:10s} {s['images']:>8d} images  {'x'.join(map(str, s['shape']))}  ({s['labelled']} labelled)")
    if info.get("classes"):
        cl = info["classes"]
        print(f"  {len(cl)} classes: {', '.join(cl[:20])}{' ...' if len(cl) > 20 else ''}")
    for p in info["problems"]:
        print(f"  PROBLEM: {p}")
    if as_json:
        print(json.dumps(info, indent=2))
    return 1 if info["problems"] else 0


def cmd_table(args: list[str]) -> int:
    from bench.table import table_command

    return table_command(args)


def cmd_sweep(args: list[str]) -> int:
    from bench.launch import sweep_command

    return sweep_command(args)


def cmd_status(args: list[str]) -> int:
    from bench.launch import status_command

    return status_command(args)


def cmd_cancel(args: list[str]) -> int:
    from bench.launch import cancel_command

    return cancel_command(args)


def cmd_report(args: list[str]) -> int:
    from bench.report import report_command

    return report_command(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=COMMANDS, metavar="command", help=" | ".join(COMMANDS))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="key=value arguments")
    parser.add_argument("-v", "--verbose", action="store_true")
    ns = parser.parse_args(argv)
    from bench.runner import setup_logging

    setup_logging(ns.verbose)
    handler = globals()[f"cmd_{ns.command}"]
    try:
        return int(handler(list(ns.args)) or 0)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
