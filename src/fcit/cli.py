"""The ``fcit`` command line: run, compare, matrix, pretrain, data build/show, methods."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fcit.errors import FcitError



def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML or JSON config file")
    p.add_argument("--preset", default="default", help="named preset the file and overrides apply on (default, smoke, llava-1.5-7b)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set scenario.beta=0.5 (repeatable)")
    p.add_argument("--seed", type=int, help="shorthand for --set seed=N")


def _load(args: argparse.Namespace, extra: dict | None = None):
    from fcit.config import load_config, parse_override

    items = dict(parse_override(o) for o in args.overrides)
    if getattr(args, "seed", None) is not None:
        items["seed"] = args.seed
    items.update(extra or {})
    return load_config(args.config, args.preset, items)


def cmd_run(args: argparse.Namespace) -> None:
    from fcit.config import Config
    from fcit.launch import run
    from fcit.report.tables import matrix_markdown

    if args.resume:
        from fcit.rundir import read_config

        _refuse_with_resume(args)
        cfg = read_config(Path(args.resume))
        run_dir = Path(args.resume)
        if args.engine or args.superlink:
            # A run may move engines when it resumes (e.g. a deployment that lost too many nodes, finished in-process).
            cfg = Config.model_validate({**cfg.model_dump(), **_engine_keys(args, cfg.model_dump())})
    else:
        extra = _engine_keys(args, {})
        if args.method:
            extra["method.name"] = args.method
        if args.out:
            extra["out_dir"] = args.out
        if args.name:
            extra["run_name"] = args.name
        cfg = _load(args, extra)
        run_dir = None
    run_dir, result = run(cfg, run_dir, progress=not args.quiet, resume=bool(args.resume))
    from fcit.methods import REGISTRY

    labels = None if REGISTRY[result.method].continual else ["Final model"]
    print(matrix_markdown(result.matrix, result.summary.to_dict(), f"{result.method} on {result.scenario}",
                          row_labels=labels))
    t = result.timing
    print(f"\ntime: setup {t.get('setup', 0):.0f}s, then {t['total']:.0f}s (train {t['train']:.0f}s, eval {t['eval']:.0f}s, "
          f"aggregation {t['aggregation']:.1f}s, other {t['other']:.0f}s)")
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"run directory: {run_dir}")


def _refuse_with_resume(args: argparse.Namespace) -> None:
    """A resumed run continues with its own config.json; options that would change it cannot be honoured, and
    ignoring them silently would report results of a run the user did not ask for."""
    given = [f"--set {o}" for o in args.overrides]
    given += [f"--{k} {getattr(args, k)}" for k in ("method", "seed", "config", "out", "name")
              if getattr(args, k) is not None]
    if args.preset != "default":
        given.append(f"--preset {args.preset}")
    if given:
        raise FcitError(f"--resume continues {args.resume} with its own config.json and cannot honour "
                        f"{', '.join(given)}; only --engine/--superlink/--insecure/--root-certificates may change "
                        f"on resume (start a new run to change anything else)")


def _engine_keys(args: argparse.Namespace, base: dict) -> dict:
    """--engine / --superlink / --insecure / --root-certificates as config keys (dotted, or nested over ``base``)."""
    flat = {}
    if args.engine:
        flat["federation.engine"] = args.engine
    if args.superlink:
        flat["flower.superlink"] = args.superlink
        flat.setdefault("federation.engine", "flower")
    if args.insecure:
        flat["flower.insecure"] = True
    if args.root_certificates:
        flat["flower.root_certificates"] = args.root_certificates
    if not base:
        return flat
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for k, v in flat.items():
        sec, key = k.split(".")
        out[sec][key] = v
    return {sec: out[sec] for sec in {k.split(".")[0] for k in flat}}


def cmd_node(args: argparse.Namespace) -> None:
    import signal

    from fcit.launch.flower import node_command, serve_node

    opts = dict(data_root=args.data_root, partitions=args.partitions, insecure=args.insecure,
                root_certificates=args.root_certificates, auth_key=args.auth_key, port=args.port,
                threads=args.threads, device=args.device)
    node_command(args.superlink, args.client_id, **opts)  # the arguments' errors before anything starts
    home = Path(args.flower_home or Path.home() / ".fcit" / f"node-{args.client_id}")
    mode = "insecure" if args.insecure else "TLS"
    print(f"fcit node: client {args.client_id} -> SuperLink {args.superlink} ({mode})", flush=True)
    # SIGTERM (a service manager, a test harness) must stop the worker too: serve_node's cleanup runs on the way out.
    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        raise SystemExit(serve_node(args.superlink, args.client_id, home, **opts))
    except KeyboardInterrupt:
        raise SystemExit(0) from None


def cmd_compare(args: argparse.Namespace) -> None:
    from fcit.compare import compare

    cfg = _load(args)
    try:
        seeds = [int(x) for x in args.seeds.split(",")]
    except ValueError:
        raise FcitError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
    aggs = args.aggregators.split(",") if args.aggregators else None
    out, table = compare(cfg, args.methods.split(","), seeds, aggs, Path(args.out) if args.out else None,
                         progress=not args.quiet)
    print(table)
    print(f"\ncomparison written to {out}")


def cmd_matrix(args: argparse.Namespace) -> None:
    from fcit.matrix import matrix, parse_axes

    axes = parse_axes(args.methods, args.settings, args.scenarios, args.betas, args.seeds)
    if args.jobs < 1:
        raise FcitError(f"--jobs: expected a number >= 1, got {args.jobs}")
    cfg = _load(args)
    res = matrix(cfg, **axes, out=Path(args.out) if args.out else None, jobs=args.jobs, progress=not args.quiet,
                 ray_address=args.ray, report_only=args.report)
    print(res.markdown)
    print(f"\nmatrix written to {res.out} ({len(res.cells)} cells, {len(res.executed)} runs trained now)")


def cmd_pretrain(args: argparse.Namespace) -> None:
    from fcit.pretrain import pretrain, tiny_spec

    cfg = _load(args)
    spec = tiny_spec(lm_hidden=args.lm_hidden, lm_intermediate=args.lm_intermediate, lm_layers=args.lm_layers,
                     lm_heads=args.lm_heads)
    out = pretrain(cfg, Path(args.out) if args.out else None, epochs=args.epochs, progress=not args.quiet, spec=spec,
                   instruct_epochs=args.instruct_epochs, binding_epochs=args.binding_epochs,
                   start=Path(args.start) if args.start else None, binding_pairs=args.binding_pairs,
                   instruct_descriptions=args.instruct_descriptions, replay_epochs=args.replay_epochs,
                   replay_descriptions=args.replay_descriptions)
    print(f"pre-trained base model written to {out}")


def cmd_data_build(args: argparse.Namespace) -> None:
    from fcit.data import synth

    cfg = _load(args)
    root = synth.build(cfg.data.synth, progress=not args.quiet)
    print(f"FCIT-Synth ready at {root}")
    if args.pretrain:
        print(f"pre-training mixture ready at {synth.build_pretrain(cfg.data.synth, progress=not args.quiet)}")


def cmd_data_show(args: argparse.Namespace) -> None:
    from fcit.data.loader import open_benchmark
    from fcit.data.show import overlap_report, scenario_for, show_scenario, task_samples

    cfg = _load(args)
    if args.identity_samples < 1:
        raise FcitError(f"data show: --identity-samples must be >= 1 (got {args.identity_samples})")
    encoder = None
    if args.identity:
        from fcit.models.identity import get_text_encoder

        encoder = get_text_encoder(args.identity)  # a bad spec or a missing encoder fails before any work
    bench = open_benchmark(cfg)
    sc = scenario_for(cfg, args.setting, args.beta, bench)
    print(show_scenario(sc, bench, Path(args.out)))
    print(f"sample grid written to {Path(args.out) / 'samples.png'}")
    if encoder is not None:
        from fcit.methods.disco.routing import task_overlap
        from fcit.models.identity import identity_token, instruction_text

        samples = task_samples(sc, args.identity_samples)
        # Each task's token is the mean feature of its instructions, as DISCO's global token of a task is the
        # sample-weighted mean of its clients' tokens.
        tokens = {task: identity_token(encoder, [instruction_text(s) for s in ss])[0]
                  for task, ss in samples.items() if ss}
        print(overlap_report(task_overlap(tokens), args.identity, args.identity_samples))


def cmd_data_check(args: argparse.Namespace) -> None:
    from fcit.data.validation import check_config

    print(check_config(_load(args), progress=not args.quiet).summary())


def cmd_methods(args: argparse.Namespace) -> None:
    from fcit.methods import REGISTRY

    width = max(map(len, REGISTRY))
    for name, cls in REGISTRY.items():
        print(f"{name:<{width}}  {cls.summary}")


def _flower_args(p: argparse.ArgumentParser, superlink_help: str, required: bool = False) -> None:
    p.add_argument("--superlink", metavar="HOST:PORT", required=required, help=superlink_help)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--root-certificates", metavar="PEM",
                   help="CA certificate that signed the SuperLink's TLS certificate")
    g.add_argument("--insecure", action="store_true", help="no TLS (a trusted network or a test only)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fcit", description="Federated Continual Instruction Tuning")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run one FCIT experiment and print its accuracy matrix")
    _config_args(p)
    p.add_argument("--method", help="continual method (see `fcit methods`)")
    p.add_argument("--out", help="parent folder of the run directory (default runs/)")
    p.add_argument("--name", help="run directory name (default: setting-mode-method-beta-seed-time)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last finished stage")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--engine", choices=["inprocess", "flower-sim", "flower"],
                   help="where clients run: this process (default), Flower's simulation (Ray), a Flower deployment")
    _flower_args(p, "flower: the SuperLink to submit the run to (implies --engine flower)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compare", help="run several methods on one setting with shared seeds and tabulate them")
    _config_args(p)
    p.add_argument("--methods", default="zeroshot,finetune,mtl", help="comma-separated (see `fcit methods`)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--aggregators", help="comma-separated server optimizers, e.g. fedavg,fedadam")
    p.add_argument("--out", help="comparison folder (default runs/compare-...)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("matrix", help="the evaluation grid: methods x settings x scenarios x betas x seeds")
    _config_args(p)
    p.add_argument("--methods", default="zeroshot,finetune,olora,moelora,disco,mtl", help="comma-separated")
    p.add_argument("--settings", default="task,capability", help="comma-separated: task, capability")
    p.add_argument("--scenarios", default="hom,het", help="comma-separated: hom, het")
    p.add_argument("--betas", default="0.5,1,5", help="comma-separated Dirichlet betas")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--jobs", type=int, default=1, help="independent runs at once, each in its own process (1 thread)")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="run on a Ray cluster instead: local (started here with --jobs CPUs), auto, ray://host:port; "
                        "one CPU (and one GPU where runs use GPUs) per run; the --out folder must be shared by all nodes")
    p.add_argument("--out", help="matrix folder (default runs/matrix-...); finished runs in it are reused")
    p.add_argument("--report", action="store_true",
                   help="train nothing: tables and plots of the runs already finished in --out, the rest listed")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_matrix)

    p = sub.add_parser("pretrain", help="pre-train the embedded tiny LLaVA base on the generic synthetic mixture")
    _config_args(p)
    p.add_argument("--out", help="output directory (default: the package's embedded model folder)")
    p.add_argument("--epochs", type=int, default=None, help="passes over the description mixture (default 4)")
    p.add_argument("--instruct-epochs", type=int, default=None,
                   help="passes over the generic instruction mixture (default 3, or 0 with --from; 0 skips that phase)")
    p.add_argument("--instruct-descriptions", type=int, default=0, metavar="N",
                   help="mix N of phase 1's descriptions into phase 2, as LLaVA-1.5 keeps detailed descriptions "
                        "(default 0)")
    p.add_argument("--replay-epochs", type=int, default=None, metavar="N",
                   help="phase 2 again with phase 1's descriptions mixed in, the embedded base's last pass (default 1 "
                        "on a new base; 0 gives the two-phase base)")
    p.add_argument("--replay-descriptions", type=int, default=None, metavar="N",
                   help="phase 1's descriptions in the replay (default half of them: 10,000)")
    p.add_argument("--binding-epochs", type=int, default=0,
                   help="passes of phase 3: yes/no minimal pairs with the instruction mixture (default 0: no phase 3)")
    p.add_argument("--binding-pairs", type=int, default=None,
                   help="use the first N of the 10,000 pairs (default all): a smaller yes/no share of phase 3")
    p.add_argument("--from", dest="start", metavar="DIR",
                   help="continue the base in DIR with phase 2 and/or phase 3 (--instruct-epochs, --binding-epochs; "
                        "--out must differ)")
    p.add_argument("--lm-hidden", type=int, default=None, metavar="N",
                   help="width of the language model (default 192); a larger base is an option, the default run's "
                        "speed assumes 192")
    p.add_argument("--lm-intermediate", type=int, default=None, metavar="N",
                   help="feed-forward width (default 512, or 8/3 of --lm-hidden rounded to 64 when that is given)")
    p.add_argument("--lm-layers", type=int, default=None, metavar="N", help="decoder layers (default 4)")
    p.add_argument("--lm-heads", type=int, default=None, metavar="N",
                   help="attention heads (default 4, or --lm-hidden / 48 when that is given)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_pretrain)

    data = sub.add_parser("data", help="build or inspect the benchmark").add_subparsers(dest="data_cmd", required=True)
    p = data.add_parser("build", help="generate and cache FCIT-Synth")
    _config_args(p)
    p.add_argument("--pretrain", action="store_true", help="also build the pre-training mixture")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_data_build)
    p = data.add_parser("show", help="stages, client-size statistics and a sample grid of a setting")
    _config_args(p)
    p.add_argument("setting", choices=["task-hom", "task-het", "cap-hom", "cap-het"])
    p.add_argument("--beta", type=float, default=None, help="Dirichlet beta (default: the config's)")
    p.add_argument("--out", default="fcit-data-show", help="folder for samples.png")
    p.add_argument("--identity", nargs="?", const="minilm", default=None, metavar="ENCODER",
                   help="also print how close the tasks' identity tokens are (DISCO's text encoder: minilm, the "
                        "default, or clip:<local path>)")
    p.add_argument("--identity-samples", type=int, default=200, metavar="N",
                   help="training instructions per task for --identity (default 200)")
    p.set_defaults(func=cmd_data_show)
    p = data.add_parser("check", help="parse every file and image header the configured run would read, then stop")
    _config_args(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_data_check)

    p = sub.add_parser("node", help="start a Flower SuperNode for one institution (one client id)")
    _flower_args(p, "the SuperLink's Fleet address HOST:PORT", required=True)
    p.add_argument("--client-id", type=int, required=True, help="this institution's client id (partition id)")
    p.add_argument("--data-root", help="this institution's data folder (default: the run config's data.root)")
    p.add_argument("--partitions", help="released partitioned_data/ folder holding this institution's shares")
    p.add_argument("--auth-key", help="SuperNode private key (SuperNode authentication, see README)")
    p.add_argument("--port", type=int, help="local port of the node's runtime API (default: a free one)")
    p.add_argument("--threads", type=int, help="torch threads per local update (default: the run's)")
    p.add_argument("--device", help="where this node's model lives: auto, cpu or cuda:N (wins over the run's)")
    p.add_argument("--flower-home", help="Flower state folder of this node (default ~/.fcit/node-<id>)")
    p.set_defaults(func=cmd_node)

    p = sub.add_parser("methods", help="list the registered continual methods")
    p.set_defaults(func=cmd_methods)
    return ap


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    args = build_parser().parse_args(argv)
    # SIGTERM stops a command as Ctrl-C does (status, message, exit code 128 + 15); the previous handler comes back
    # afterwards, since tests and embedding programs call main() in their own process.
    from fcit.rundir import raise_terminated

    previous = signal.signal(signal.SIGTERM, raise_terminated) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        args.func(args)
    except FcitError as err:
        print(f"fcit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        where = getattr(err, "run_dir", None)
        term = getattr(err, "signal", None) == "SIGTERM"
        what = "terminated (SIGTERM)" if term else "interrupted"
        if where is not None and not (Path(where) / "config.json").exists():
            # Stopped while loading, before the run wrote its config: a plain rerun takes the directory again.
            print(f"fcit: {what} before the run began; nothing to resume: run the same command again", file=sys.stderr)
        else:
            tail = f": continue with `fcit run --resume {where}`" if where is not None else ""
            print(f"fcit: {what}; finished stages are checkpointed{tail}", file=sys.stderr)
        return 143 if term else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
