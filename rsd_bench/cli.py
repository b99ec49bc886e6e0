"""The `rsd-bench` command: run (Hydra), collect, plot, distill."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

CONF_DIR = Path(os.environ.get("RSD_BENCH_CONF", Path(__file__).resolve().parents[1] / "conf"))

USAGE = """usage: rsd-bench <command> [args]

commands:
  run [hydra overrides]       run a job or sweep, e.g. `rsd-bench run` (the default job) or
                              `rsd-bench run -m pair=smollm2 dataset=wmt,xsum method=sd,rsd_s L=[2,3]`
  collect <sweep dir>         merge a sweep's cell files into results.parquet, cells.parquet/csv
  plot <results> [--out DIR]  render the figure grid (PNG and PDF) from results or cells
  order <results>             does RSD-S >= RSD-C >= SpecTr >= SD hold? values, standard
                              errors and z-scores per (pair, dataset, L)
  distill [options]           make a draft model for a target (see `rsd-bench distill --help`)
"""


def _hydra_main(argv: list[str]) -> None:
    import hydra

    from .config import register_configs
    from .runner import run_job

    if not CONF_DIR.is_dir():
        sys.exit(f"config directory {CONF_DIR} not found: install rsd-bench from its repository "
                 "(`pip install -e .`) or set RSD_BENCH_CONF to the conf/ folder")
    register_configs()

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
    def app(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig

        try:
            num = HydraConfig.get().job.num
        except Exception:
            num = 0
        run_job(cfg, job_num=num if isinstance(num, int) else 0)

    sys.argv = ["rsd-bench run"] + argv
    app()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command == "run":
        _hydra_main(rest)
    elif command == "collect":
        p = argparse.ArgumentParser(prog="rsd-bench collect")
        p.add_argument("sweep_dir")
        args = p.parse_args(rest)
        from .callbacks import summarize

        if summarize(Path(args.sweep_dir), None) is None and not Path(args.sweep_dir).is_dir():
            sys.exit(f"no such directory: {args.sweep_dir}")
    elif command == "plot":
        p = argparse.ArgumentParser(prog="rsd-bench plot")
        p.add_argument("results", help="cells.parquet / cells.csv / results.parquet or a sweep dir")
        p.add_argument("--out", default="plots", help="output folder (default plots/)")
        p.add_argument("--stem", default="grid")
        p.add_argument("--rows", nargs="*", help="rows as pair/dataset, in display order")
        p.add_argument("--criterion", default="block_efficiency",
                       help="per (method, L), plot the setting with the highest value of this column")
        p.add_argument("--query", default=None, help="pandas query over the cells' columns, e.g. "
                       "\"method in ['ar', 'sd'] or K == 3 or width == 3\" (one tree width)")
        args = p.parse_args(rest)
        from .plot import plot_results

        rows = [tuple(r.split("/", 1)) for r in args.rows] if args.rows else None
        try:
            paths = plot_results(args.results, args.out, stem=args.stem, row_order=rows,
                                 criterion=args.criterion, query=args.query)
        except (FileNotFoundError, ValueError, KeyError) as e:
            sys.exit(f"rsd-bench plot: {e}")
        for path in paths:
            print(path)
    elif command == "order":
        from .ordering import PAPER_ORDER

        p = argparse.ArgumentParser(prog="rsd-bench order", description="Check a claimed order of "
                                    "methods per (pair, dataset, L), with bootstrap standard errors.")
        p.add_argument("results", help="cells.parquet / cells.csv / results.parquet or a sweep dir")
        p.add_argument("--order", nargs="+", default=list(PAPER_ORDER),
                       help=f"methods, best first (default: {' '.join(PAPER_ORDER)})")
        p.add_argument("--metric", default="block_efficiency")
        p.add_argument("--best-by", default=None, help="pick each method's setting by this column "
                       "(default: the metric)")
        p.add_argument("--query", default=None, help="pandas query over the cells first (see plot)")
        p.add_argument("--csv", default=None, help="also write the table here")
        args = p.parse_args(rest)
        from .ordering import format_order, order_table
        from .plot import load_cells

        try:
            table = order_table(load_cells(args.results, args.query), args.order, args.metric,
                                args.best_by)
        except (FileNotFoundError, ValueError, KeyError) as e:
            sys.exit(f"rsd-bench order: {e}")
        if table.empty:
            sys.exit(f"rsd-bench order: no cells of methods {', '.join(args.order)} in {args.results}")
        print(format_order(table, args.order))
        if args.csv:
            table.to_csv(args.csv, index=False)
    elif command == "distill":
        from .distill import main as distill_main

        distill_main(rest)
    else:
        sys.exit(f"unknown command {command!r}\n\n{USAGE}")


if __name__ == "__main__":
    main()
