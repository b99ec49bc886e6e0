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
        p.add_argument("--criterion", default="block_efficiency")
        args = p.parse_args(rest)
        from .plot import plot_results

        rows = [tuple(r.split("/", 1)) for r in args.rows] if args.rows else None
        for path in plot_results(args.results, args.out, stem=args.stem, row_order=rows,
                                 criterion=args.criterion):
            print(path)
    elif command == "distill":
        from .distill import main as distill_main

        distill_main(rest)
    else:
        sys.exit(f"unknown command {command!r}\n\n{USAGE}")


if __name__ == "__main__":
    main()
