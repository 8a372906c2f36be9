"""The ``openmm-diffsim`` command.

Subcommands::

    openmm-diffsim init   run.toml                      # write a commented example configuration
    openmm-diffsim fit    run.toml [--resume] [--output DIR] [--max-epochs N]
    openmm-diffsim sample run.toml --state NAME --steps N --dcd out.dcd
    openmm-diffsim rdf    traj.dcd --top top.pdb [--pair A B | --selection SEL [SEL]] -o rdf.dat
    openmm-diffsim export model.pt --format FORMAT -o PATH [--config run.toml --state NAME]
    openmm-diffsim demo   [--output DIR] [--quick]

Bad input (a malformed configuration, a missing file, an impossible option)
prints ``openmm-diffsim: error: <message>`` to stderr and exits with status 2,
without a traceback; ``--debug`` shows the traceback instead. Failures while
running (e.g. a simulation that blows up) exit with status 1.

``fit`` also runs on several processes, unchanged, under ``torchrun``
(``torchrun --nproc-per-node K --no-python openmm-diffsim fit run.toml``):
the state points are split between the processes and only rank 0 prints,
writes and exports (see :mod:`openmm_diffsim.distributed`). Other
subcommands launched that way run on rank 0 only.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .config import EXPORT_FORMATS, ConfigError, RunConfig, example_config, load_config

__all__ = ["main", "build_parser", "load_table", "export_table"]

PROG = "openmm-diffsim"


class UsageError(ValueError):
    """Bad command-line input that argparse cannot catch by itself."""


# -- loading a trained table ----------------------------------------------------------------------


def _table_from_scripted(module: Any, metadata: Dict[str, Any], n_points: int = 1000) -> Any:
    """Rebuild a (frozen, tabulated) PairTable from a TorchScript pair table.

    The scripted module evaluates u(r) with its cutoff convention already
    applied, so splines through it with ``cutoff_mode="truncate"`` reproduce it.
    """
    import numpy as np
    import torch

    from .potentials import CubicSpline, PairTable

    table_module = getattr(module, "table", module)
    species = list(metadata["species"])
    cutoff = float(metadata["cutoff_nm"])
    grid = np.linspace(1e-3 * cutoff, cutoff * (1 - 1e-9), n_points)
    potentials = {}
    k = 0
    for a in range(len(species)):
        for b in range(a, len(species)):
            r = torch.as_tensor(grid)
            with torch.no_grad():
                u = table_module.forward(r, torch.full_like(r, k, dtype=torch.long)).numpy()
            finite = np.isfinite(u) & (np.abs(u) < 1e6)
            first = int(np.argmax(finite))
            potentials[(species[a], species[b])] = CubicSpline(grid[first:], u[first:], trainable=False)
            k += 1
    return PairTable(species, potentials, cutoff=cutoff, cutoff_mode="truncate")


def _table_from_state_dict(state_dict: Dict[str, Any], config: Optional[RunConfig], source: Path) -> Any:
    if config is None:
        raise UsageError(
            f"{source} holds parameters only (a state dict); pass --config with the run configuration "
            "that defines the potential so the table can be rebuilt"
        )
    import copy

    table = copy.deepcopy(config.table)
    try:
        table.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise UsageError(f"{source} does not match the potential in {config.path}: {exc}") from exc
    return table


def load_table(path: Path, config: Optional[RunConfig] = None) -> Any:
    """Load a trained :class:`~openmm_diffsim.potentials.PairTable` from a file or a run folder.

    Accepts a pickled ``PairTable`` (``torch.save(table)``), a checkpoint
    dict holding one (under ``table``, ``model`` or ``potential``) or its
    parameters (under ``table_state``, ``model_state`` or ``state_dict``,
    rebuilt with the potential of ``config``), a plain state dict (with
    ``config``), a TorchScript file from
    :func:`~openmm_diffsim.export.save_torchscript` (rebuilt as frozen
    splines), or a training output folder (its newest ``*.pt`` checkpoint).

    Raises
    ------
    UsageError
        When the file holds none of these.
    """
    import torch

    from .potentials import PairTable

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.is_dir():
        candidates = sorted(path.glob("*.pt"), key=lambda p: p.stat().st_mtime) + sorted(
            path.glob("checkpoints/*.pt"), key=lambda p: p.stat().st_mtime
        )
        if not candidates:
            raise UsageError(f"{path} is a folder without a checkpoint (*.pt)")
        preferred = [p for p in candidates if p.stem in ("final", "best", "latest", "checkpoint")]
        path = (preferred or candidates)[-1]
    try:
        extra = {"openmm_diffsim.json": ""}
        module = torch.jit.load(str(path), _extra_files=extra)
    except Exception:  # noqa: BLE001 - not a TorchScript archive: try a pickle next
        module = None
    if module is not None:
        import json

        if not extra["openmm_diffsim.json"]:
            raise UsageError(f"{path} is a TorchScript file without openmm-diffsim metadata")
        return _table_from_scripted(module, json.loads(extra["openmm_diffsim.json"]))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a non-checkpoint file
        raise UsageError(f"cannot read {path} as a PyTorch file: {exc}") from exc
    if isinstance(obj, PairTable):
        return obj
    if isinstance(obj, dict):
        for key in ("table", "model", "potential"):
            if isinstance(obj.get(key), PairTable):
                return obj[key]
        for key in ("table_state", "model_state", "state_dict", "table_state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                return _table_from_state_dict(obj[key], config, path)
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return _table_from_state_dict(obj, config, path)
    raise UsageError(f"{path} holds a {type(obj).__name__}, not a PairTable, a checkpoint or a TorchScript pair table")


# -- export ---------------------------------------------------------------------------------------------


def export_table(
    table: Any,
    fmt: str,
    output: Path,
    state: Any = None,
    r_min: Optional[float] = None,
    r_max: Optional[float] = None,
    dr: float = 0.002,
    n_points: int = 2000,
) -> List[Path]:
    """Write ``table`` in one of :data:`~openmm_diffsim.config.EXPORT_FORMATS`.

    Parameters
    ----------
    table : PairTable
        The model.
    fmt : str
        ``torchscript`` (with ``state``: the full energy module for that
        composition), ``openmm-xml`` and ``tabulated-xml`` (need ``state`` for
        composition, masses and box), ``gromacs`` (``output`` is a folder),
        ``lammps``.
    output : Path
        File (or folder for ``gromacs``).
    state : StatePoint, optional
        Composition, masses and box for system XML.
    r_min, r_max, dr, n_points
        Table range (nm), GROMACS spacing (nm), LAMMPS points. ``r_min=None``
        lets the exporter choose where u(r) becomes finite and moderate.

    Returns
    -------
    list of Path
        Files written.
    """
    from . import export

    output = Path(output)
    if fmt not in EXPORT_FORMATS:
        raise UsageError(f"unknown export format {fmt!r}; formats: {', '.join(EXPORT_FORMATS)}")
    if fmt in ("openmm-xml", "tabulated-xml") and state is None:
        raise UsageError(f"format {fmt} needs a composition, masses and a box: pass --config and --state")
    if fmt != "gromacs":
        output.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "torchscript":
        species = None if state is None else state.particle_species_names()
        return [Path(export.save_torchscript(table, output, species=species))]
    if fmt == "openmm-xml":
        written = export.torchforce_system_xml(
            table, state.particle_species_names(), state.particle_masses(), state.box_lengths, output
        )
        return [Path(p) for p in (written if isinstance(written, (tuple, list)) else [written])]
    if fmt == "tabulated-xml":
        options: Dict[str, Any] = {"r_min": r_min}
        return [
            Path(
                export.tabulated_system_xml(
                    table, state.particle_species_names(), state.particle_masses(), state.box_lengths, output, **options
                )
            )
        ]
    if fmt == "gromacs":
        output.mkdir(parents=True, exist_ok=True)
        r_max = table.cutoff + 1.0 if r_max is None else r_max
        written = export.write_gromacs_tables(table, output, r_max=r_max, dr=dr, r_min=r_min)
        return [Path(p) for p in written]
    # lammps
    if r_min is None:
        r_min = export._auto_r_min(table, export.DEFAULT_ENERGY_CAP)
    r_max = table.cutoff if r_max is None else r_max
    return [Path(export.write_lammps_table(table, output, r_min=r_min, r_max=r_max, n=n_points))]


# -- subcommands ------------------------------------------------------------------------------------------


def _cmd_init(args: argparse.Namespace) -> int:
    path = Path(args.config)
    if path.exists() and not args.force:
        raise UsageError(f"{path} exists; pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(example_config())
    print(f"wrote {path}; edit it, then run: {PROG} fit {path}")
    return 0


def _run_ibi(config: RunConfig, args: argparse.Namespace) -> int:
    try:
        ibi = importlib.import_module("openmm_diffsim.ibi")
    except ImportError as exc:
        raise UsageError(
            'training.method = "ibi" (iterative Boltzmann inversion) is not available yet in this version; '
            "use reweighting, rollout, adjoint or hybrid"
        ) from exc
    entry = getattr(ibi, "run_from_config", None)
    if entry is None:
        raise UsageError("openmm_diffsim.ibi has no run_from_config(config, ...) entry point for the command line")
    entry(config, resume=args.resume, max_epochs=args.max_epochs)
    return 0


def _cmd_fit(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.output is not None:
        output = Path(args.output).expanduser().resolve()
        if config.export["directory"] == config.output_dir / "export":
            config.export["directory"] = output / "export"
        config.output_dir = output
        config.trainer["output_dir"] = output
    if args.max_epochs is not None:
        if args.max_epochs < 1:
            raise UsageError(f"--max-epochs must be at least 1, got {args.max_epochs}")
        config.trainer["max_epochs"] = args.max_epochs
    from . import distributed

    if config.method == "ibi":
        if distributed.launched_by_torchrun():
            raise UsageError('training.method = "ibi" runs in one process: launch it without torchrun')
        return _run_ibi(config, args)
    # Under torchrun: join the other processes (one process: nothing happens).
    joined = distributed.is_distributed()  # a caller's group is used and left alone
    distributed.init()
    try:
        return _fit_and_export(config, args)
    finally:
        if not joined:
            distributed.shutdown()


def _fit_and_export(config: RunConfig, args: argparse.Namespace) -> int:
    from . import distributed
    from .training import Trainer

    is_main = distributed.is_main_process()
    if args.resume:
        overrides = {} if args.max_epochs is None else {"max_epochs": args.max_epochs}
        trainer = Trainer.resume(config.output_dir, **overrides)
    else:
        pending = config.pending_reference_targets()
        if pending and is_main:
            print(f"simulating {len(pending)} reference target(s) (cached in {config.output_dir / 'targets'}) ...")
        _resolve_targets(config)
        trainer = config.make_trainer()
    start = time.perf_counter()
    history = trainer.fit()
    elapsed = time.perf_counter() - start
    if not is_main:
        return 0  # rank 0 reports and exports
    if history:
        last = history[-1]
        print(f"finished {len(history)} epoch(s) in {elapsed:.1f} s; final loss {last.get('loss'):.4g}")
    table = getattr(trainer, "table", config.table)
    formats = config.export["formats"]
    if formats:
        state = config.state(config.export["state"])
        directory = Path(config.export["directory"])
        for fmt in formats:
            target = directory / _default_export_name(fmt)
            written = export_table(
                table,
                fmt,
                target,
                state=state,
                r_min=config.export["r_min"],
                dr=config.export["dr"],
                n_points=config.export["n_points"],
            )
            print(f"exported {fmt}: {', '.join(str(p) for p in written)}")
    print(f"results in {config.output_dir}")
    return 0


def _resolve_targets(config: RunConfig) -> None:
    """Simulate reference targets; with several processes rank 0 simulates and writes, the others read."""
    from . import distributed

    if not distributed.is_distributed():
        config.resolve_targets()
        return
    failure = None
    if distributed.is_main_process():
        try:
            config.resolve_targets()
        except Exception as exc:
            failure = exc
    # Every rank waits for rank 0's cache and hears if it failed (no rank waits forever).
    message = distributed.broadcast_object(None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    if message is not None:
        raise RuntimeError(f"rank 0 could not prepare the reference targets: {message}")
    if not distributed.is_main_process():
        config.resolve_targets()  # reads rank 0's cached files


def _default_export_name(fmt: str) -> str:
    return {
        "torchscript": "model.pt",
        "openmm-xml": "system_torchforce.xml",
        "tabulated-xml": "system_tabulated.xml",
        "gromacs": "gromacs",
        "lammps": "pair_table.lammps",
    }[fmt]


def _cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from .observables import compute_partial_rdfs
    from .sampling import Sampler
    from .targets import write_rdf

    config = load_config(args.config, read_targets=False)
    if args.state is None:
        if len(config.states) > 1:
            names = [s.name for s in config.states]
            raise UsageError(f"the configuration has {len(names)} states; choose one with --state ({', '.join(names)})")
        state = config.states[0]
    else:
        state = config.state(args.state)
    table = load_table(Path(args.table), config) if args.table else config.table
    if args.steps < 1 or args.interval < 1:
        raise UsageError(f"--steps and --interval must be positive, got {args.steps} and {args.interval}")
    n_frames = args.steps // args.interval
    if n_frames < 1:
        raise UsageError(f"--steps {args.steps} is shorter than one --interval {args.interval}")
    equilibration = args.equilibrate
    if equilibration is None:
        equilibration = int(config.trainer.get("equilibration_steps", 1000))
    options = config.sampler_options
    sampler = Sampler(state, table, seed=args.seed, **options)
    sampler.minimize()
    if equilibration > 0:
        sampler.equilibrate(equilibration)
    snapshots = sampler.run(n_frames, args.interval)
    dcd = Path(args.dcd)
    dcd.parent.mkdir(parents=True, exist_ok=True)
    traj = snapshots.to_mdtraj(timestep=sampler.timestep)
    traj.save_dcd(str(dcd))
    pdb = dcd.with_suffix(".pdb")
    traj[0].save_pdb(str(pdb))
    r_max = args.r_max if args.r_max is not None else 0.5 * float(min(state.box))
    with torch.no_grad():
        r, g = compute_partial_rdfs(
            torch.as_tensor(snapshots.positions),
            torch.as_tensor(snapshots.boxes),
            torch.as_tensor(state.particle_species()),
            state.n_species,
            (0.0, r_max),
            args.bins,
            args.smearing or None,
        )
    pairs = [(a, b) for i, a in enumerate(state.species) for b in state.species[i:]]
    rdf_path = Path(args.rdf) if args.rdf else dcd.with_name(dcd.stem + "_rdf.dat")
    g = np.asarray(g)
    write_rdf(
        rdf_path,
        np.asarray(r),
        g[0] if len(pairs) == 1 else g,
        pair=pairs[0] if len(pairs) == 1 else pairs,
        state=state.name,
    )
    print(f"wrote {n_frames} frames to {dcd} (topology {pdb}) and the RDF to {rdf_path}")
    return 0


def _cmd_rdf(args: argparse.Namespace) -> int:
    import mdtraj

    from .targets import target_from_trajectory, write_rdf

    traj_path = Path(args.trajectory)
    if not traj_path.exists():
        raise FileNotFoundError(f"no such trajectory: {traj_path}")
    if args.top is not None and not Path(args.top).exists():
        raise FileNotFoundError(f"no such topology: {args.top}")
    if args.stride < 1:
        raise UsageError(f"--stride must be at least 1, got {args.stride}")
    traj = mdtraj.load(str(traj_path), top=args.top, stride=args.stride)
    if traj.unitcell_lengths is None:
        raise UsageError(f"{traj_path} has no periodic box; an RDF needs one")
    if args.pair is not None and args.selection is not None:
        raise UsageError("give --pair or --selection, not both")
    if args.selection is not None:
        selections = (args.selection[0], args.selection[-1])
        pair = ("A", "A") if len(args.selection) == 1 else ("A", "B")
    elif args.pair is not None:
        pair = (args.pair[0], args.pair[1])
        selections = (f"name {pair[0]}", f"name {pair[1]}")
    else:
        names = sorted({atom.name for atom in traj.topology.atoms})
        label = names[0] if len(names) == 1 else "A"
        pair, selections = (label, label), ("all", "all")
    for selection in selections:
        try:
            selected = traj.topology.select(selection)
        except Exception as exc:  # noqa: BLE001 - mdtraj raises several kinds for a bad selection
            raise UsageError(f"bad selection {selection!r}: {exc}") from exc
        if selected.size == 0:
            raise UsageError(f"selection {selection!r} matches no atoms in {args.top or traj_path}")
    half_box = 0.5 * float(traj.unitcell_lengths.min())
    r_max = min(1.0, half_box) if args.r_max is None else args.r_max
    if not 0 <= args.r_min < r_max:
        raise UsageError(f"need 0 <= --r-min < --r-max, got {args.r_min} and {r_max}")
    target = target_from_trajectory(
        traj,
        pair=pair,
        r_range=(args.r_min, r_max),
        n_bins=args.bins,
        selections=selections,
        smearing=args.smearing,
        state=args.state,
    )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_rdf(output, target.r, target.g, pair=target.pair, state=args.state, comment=f"from {traj_path}")
    print(f"wrote g(r) of {target.pair[0]}-{target.pair[1]} over {traj.n_frames} frames to {output}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    config = load_config(args.config, read_targets=False) if args.config else None
    state = None
    if args.state is not None:
        if config is None:
            raise UsageError("--state needs --config")
        state = config.state(args.state)
    elif config is not None and args.format in ("openmm-xml", "tabulated-xml"):
        state = config.state(config.export["state"])
    table = load_table(Path(args.input), config)
    r_min = args.r_min if args.r_min is not None else (config.export["r_min"] if config else None)
    written = export_table(
        table,
        args.format,
        Path(args.output),
        state=state,
        r_min=r_min,
        r_max=args.r_max,
        dr=args.dr,
        n_points=args.n_points,
    )
    for path in written:
        print(f"wrote {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    try:
        demo = importlib.import_module("openmm_diffsim.demo")
    except ImportError as exc:
        raise UsageError("the demo is not available in this installation (openmm_diffsim.demo is missing)") from exc
    demo.run_demo(
        Path(args.output),
        quick=args.quick,
        estimator=getattr(args, "estimator", "reweighting"),
        max_epochs=getattr(args, "max_epochs", None),
        resume=getattr(args, "resume", False),
        pressure_weight=getattr(args, "pressure_weight", None),
        energy_weight=getattr(args, "energy_weight", None),
        optimizer=getattr(args, "optimizer", None),
        final_snapshots=getattr(args, "final_snapshots", None),
    )
    print(f"demo results in {args.output}")
    return 0


# -- parser -------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``openmm-diffsim`` command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log progress (INFO level)"
    )

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Learn pair potentials from radial distribution functions by differentiable simulation on OpenMM.",
    )
    parser.add_argument("--debug", action="store_true", default=False, help="show tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", default=False, help="log progress (INFO level)")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("init", parents=[common], help="write a commented example configuration")
    p.add_argument("config", metavar="CONFIG.toml")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=_cmd_init)

    p = sub.add_parser("fit", parents=[common], help="train a potential as the configuration says")
    p.add_argument("config", metavar="CONFIG.toml")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the output folder")
    p.add_argument("--output", metavar="DIR", help="output folder (overrides [output] directory)")
    p.add_argument("--max-epochs", type=int, metavar="N", help="overrides [training] max_epochs")
    p.set_defaults(func=_cmd_fit)

    p = sub.add_parser("sample", parents=[common], help="run MD with the configured (or a trained) potential")
    p.add_argument("config", metavar="CONFIG.toml")
    p.add_argument("--state", metavar="NAME", help="state point to simulate (default: the only one)")
    p.add_argument("--steps", type=int, required=True, metavar="N", help="production MD steps")
    p.add_argument("--interval", type=int, default=100, metavar="K", help="steps between frames (default 100)")
    p.add_argument("--equilibrate", type=int, metavar="N", help="steps before production (default: from config)")
    p.add_argument(
        "--dcd", required=True, metavar="OUT.dcd", help="trajectory file (a PDB topology is written next to it)"
    )
    p.add_argument("--rdf", metavar="OUT.dat", help="RDF file (default: <dcd stem>_rdf.dat)")
    p.add_argument("--table", metavar="MODEL", help="trained model (checkpoint or TorchScript) instead of the config's")
    p.add_argument("--r-max", type=float, metavar="NM", help="RDF range (default: half the shortest box edge)")
    p.add_argument("--bins", type=int, default=200, help="RDF bins (default 200)")
    p.add_argument("--smearing", type=float, default=0.0, metavar="NM", help="Gaussian smearing (default 0)")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("rdf", parents=[common], help="radial distribution function of a trajectory")
    p.add_argument("trajectory", metavar="TRAJ")
    p.add_argument("--top", metavar="TOP", help="topology (PDB, ...) for formats without one")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--pair", nargs=2, metavar=("A", "B"), help="atom names of the two species")
    group.add_argument(
        "--selection", nargs="+", metavar="SEL", help="one or two mdtraj selections (default: all atoms)"
    )
    p.add_argument("--r-min", type=float, default=0.0, metavar="NM", help="default 0")
    p.add_argument("--r-max", type=float, metavar="NM", help="default: min(1 nm, half the shortest box edge)")
    p.add_argument("--bins", type=int, default=200, help="number of bins (default 200)")
    p.add_argument(
        "--smearing", type=float, default=0.0, metavar="NM", help="Gaussian smearing (default 0: mdtraj's histogram)"
    )
    p.add_argument("--stride", type=int, default=1, help="use every k-th frame")
    p.add_argument("--state", metavar="NAME", help="state-point name stored in the file")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help=".dat, .xvg, .csv or .npz")
    p.set_defaults(func=_cmd_rdf)

    p = sub.add_parser("export", parents=[common], help="write a trained model for production MD")
    p.add_argument("input", metavar="CHECKPOINT_OR_PT", help="checkpoint, saved table, TorchScript file or run folder")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    p.add_argument("-o", "--output", required=True, metavar="PATH", help="file (folder for gromacs)")
    p.add_argument("--config", metavar="CONFIG.toml", help="run configuration (potential form, states)")
    p.add_argument("--state", metavar="NAME", help="state whose composition, masses and box to use")
    p.add_argument("--r-min", type=float, metavar="NM", help="start of tables (default: automatic)")
    p.add_argument("--r-max", type=float, metavar="NM", help="end of tables (default: cutoff; gromacs cutoff + 1)")
    p.add_argument("--dr", type=float, default=0.002, metavar="NM", help="GROMACS table spacing (default 0.002)")
    p.add_argument("--n-points", type=int, default=2000, metavar="N", help="LAMMPS table points (default 2000)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("demo", parents=[common], help="learn argon's LJ potential back from its RDF")
    p.add_argument("--output", default="demo-output", metavar="DIR", help="output folder (default demo-output)")
    p.add_argument("--quick", action="store_true", help="a small, fast version")
    p.add_argument(
        "--estimator",
        default="reweighting",
        choices=["reweighting", "rollout", "adjoint", "hybrid"],
        help="gradient estimator (default reweighting)",
    )
    p.add_argument(
        "--optimizer",
        choices=["imc", "natural", "gauss-newton", "adam", "sgd"],
        help="default: imc (10 Newton steps) with reweighting, adam (150 steps) with the rollout family",
    )
    p.add_argument(
        "--max-epochs", type=int, metavar="N", help="optimiser steps (default 10 with imc, 20 with natural, else 150)"
    )
    p.add_argument("--resume", action="store_true", help="continue from the output folder's checkpoint")
    p.add_argument(
        "--pressure-weight", type=float, metavar="W", help="weight of the pressure term, 1/bar^2 (0 turns it off)"
    )
    p.add_argument(
        "--energy-weight", type=float, metavar="W", help="weight of the energy term, (kJ/mol)^-2 (0 turns it off)"
    )
    p.add_argument(
        "--final-snapshots",
        type=int,
        metavar="N",
        help="imc: snapshots per step for the last steps, once the RDF error nears its noise (default 600; "
        "more: a steadier u(r) for ~50 MD steps per snapshot)",
    )
    p.set_defaults(func=_cmd_demo)
    return parser


def _other_torchrun_rank() -> bool:
    # From the environment alone: importing torch here would slow every command.
    return os.environ.get("WORLD_SIZE", "1").strip() not in ("", "1") and os.environ.get("RANK", "0").strip() != "0"


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 run failure, 2 bad input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help, --version, usage errors (already printed)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        if args.command != "fit" and _other_torchrun_rank():
            return 0  # under torchrun only fit uses every process; rank 0 runs the rest
        return int(args.func(args) or 0)
    except (ConfigError, UsageError, FileNotFoundError, ValueError, TypeError, ImportError) as exc:
        if args.debug:
            raise
        _error(str(exc))
        return 2
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - a run failed: report it without a traceback
        if args.debug:
            raise
        _error(f"{type(exc).__name__}: {exc}")
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
