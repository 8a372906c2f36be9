"""Training on several processes (torch.distributed, gloo) equals training in one process.

The two-process runs are spawned once per module (``torch.multiprocessing``,
gloo over a loopback TCP port, the environment that ``torchrun`` would set);
each scenario is also run in this process with the same states and seeds,
and the parameters, the per-state records and the checkpoints are compared.
"""

import contextlib
import io
import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

import openmm_diffsim as od
from openmm_diffsim import distributed
from openmm_diffsim.systems import StatePoint
from openmm_diffsim.targets import Target
from openmm_diffsim.training import Trainer

SIGMA, EPSILON, MASS = 0.34, 0.996, 39.948
N = 64
CUTOFF = 0.75
WORLD = 2
# One OpenMM thread in every process: the CPU platform's force sums need not
# be bitwise equal between thread counts, and the test wants equal trajectories.
SAMPLER = {"platform": "CPU", "platform_properties": {"Threads": "1"}}


def gas_target():
    """Dilute-gas g(r) = exp(-u/kT) of the true LJ potential (cheap and smooth)."""
    r = np.linspace(0.005, 0.745, 75)
    kT = 0.0083144626 * 150.0
    table = od.PairTable(["Ar"], od.LennardJones(SIGMA, EPSILON), cutoff=CUTOFF, cutoff_mode="shift")
    u, _ = table.evaluate(np.maximum(r, 0.2))
    return Target(r, np.exp(-u / kT), pair=("Ar", "Ar"))


def states(n):
    return [
        StatePoint(
            name=f"T{temperature:.0f}",
            species=["Ar"],
            counts=[N],
            masses=[MASS],
            temperature=temperature,
            box=[1.6, 1.6, 1.6],
            targets=[gas_target()],
        )
        for temperature in (150.0, 120.0, 180.0)[:n]
    ]


def make_trainer(scenario, output_dir):
    estimator, n_states, extra = {
        # Rollout on fresh snapshots, reweighting on reused ones: both estimators and both seed streams.
        "hybrid": ("hybrid", 2, {}),
        "gauss-newton": ("reweighting", 2, {"optimizer": "gauss-newton", "n_snapshots": 10}),
        # IMC steps with the noise shrinkage, the line search and the undo rule (a factor near 1,
        # so that it judges against the loss noise): sums over ranks of JᵀJ, Jᵀρ, the noise
        # covariance, the line search's quartic and the loss noise, and the final check.
        "imc-line": (
            "reweighting",
            2,
            {
                "optimizer": "imc",
                "n_snapshots": 10,
                "imc_noise_shrink": True,
                "imc_line_search": True,
                "imc_reject_factor": 1.01,
            },
        ),
        # One state, two processes: rank 1 holds nothing and only joins the collectives.
        "idle": ("reweighting", 1, {}),
        # Fresh snapshots every epoch; state T120's second sampling run fails (see failing_sampler).
        "rollback": ("reweighting", 2, {}),
    }[scenario]
    options = dict(
        learning_rate=0.01,
        learning_rate_scales={"sigma": 0.2},
        max_epochs=2,
        n_snapshots=6,
        snapshot_interval=10,
        equilibration_steps=50,
        sampler_options=SAMPLER,
        estimator_options=dict(r_range=(0.0, 0.75), n_bins=25, smearing=0.01),
        progress=False,
        plot_every=0,
        seed=3,
    )
    if estimator == "hybrid":
        options["estimator_options"].update(n_steps=4, record_every=2, n_replicas=2)
    if scenario == "rollback":
        options["estimator_options"]["n_eff_threshold"] = 1.0
    options.update(extra)
    table = od.PairTable(["Ar"], od.LennardJones(0.32, EPSILON), cutoff=CUTOFF, cutoff_mode="shift")
    return Trainer(table, states(n_states), estimator, output_dir=output_dir, **options)


def summary(trainer):
    """What must agree between runs: parameters and the per-epoch records (timings excluded)."""
    keep = ("epoch", "loss", "state_losses", "rdf_rmse", "n_eff", "resampled", "grad_norm", "gauss_newton", "imc")
    return {
        "params": {k: v.detach().clone() for k, v in trainer.table.named_parameters()},
        "history": [{k: h[k] for k in keep if k in h} for h in trainer.history],
        "md_steps": trainer.md_steps,
        "rollout_steps": trainer.rollout_steps,
        "rank_seconds": [h.get("rank_seconds") for h in trainer.history],
        "events": [h["events"] for h in trainer.history],
        "learning_rate": trainer.learning_rate,
    }


@contextlib.contextmanager
def failing_sampler(state_name="T120", failing_call=2):
    """Make one state's ``failing_call``-th sampling run blow up (in this process)."""
    from openmm_diffsim import sampling

    original = sampling.Sampler.run
    calls = {}

    def run(self, n_snapshots, interval):
        calls[self.state.name] = calls.get(self.state.name, 0) + 1
        if self.state.name == state_name and calls[self.state.name] == failing_call:
            raise sampling.SamplingError(self.state.name, 123, "energy is NaN")
        return original(self, n_snapshots, interval)

    sampling.Sampler.run = run
    try:
        yield
    finally:
        sampling.Sampler.run = original


# -- the spawned processes -----------------------------------------------------------------------


def _worker(rank, port, folder):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    folder = Path(folder)
    assert distributed.init(timeout_minutes=2)
    try:
        out = {}
        for scenario in ("hybrid", "gauss-newton", "imc-line", "idle"):
            trainer = make_trainer(scenario, folder / f"{scenario}-dist")
            trainer.fit()
            out[scenario] = summary(trainer)
        with failing_sampler():  # fails on rank 1 only (T120's owner)
            trainer = make_trainer("rollback", None)
            trainer.fit()
            out["rollback"] = summary(trainer)
        # Any other error on one rank stops every rank instead of leaving them waiting.
        original = Trainer._state_gradient

        def broken(self, state, fresh_needed):
            if state.name == "T120":
                raise KeyError("boom")
            return original(self, state, fresh_needed)

        Trainer._state_gradient = broken
        try:
            make_trainer("rollback", None).fit()
        except Exception as exc:  # noqa: BLE001 - recorded for the parent to check
            out["fatal"] = (type(exc).__name__, str(exc))
        finally:
            Trainer._state_gradient = original
        # Resume a two-process checkpoint with two processes (from a copy:
        # the one-process resume in the parent needs the original).
        if rank == 0:
            shutil.copytree(folder / "hybrid-dist", folder / "hybrid-dist-copy")
        distributed.barrier()
        resumed = Trainer.resume(folder / "hybrid-dist-copy", max_epochs=3)
        resumed.fit()
        out["dist->dist"] = summary(resumed)
        # ... and a one-process checkpoint (written by the parent beforehand).
        resumed = Trainer.resume(folder / "hybrid-single-copy", max_epochs=3)
        resumed.fit()
        out["single->dist"] = summary(resumed)
        torch.save(out, folder / f"rank{rank}.pt")
        # The command line in a process group, as under torchrun.
        from openmm_diffsim.cli import main

        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            status = main(["fit", str(folder / "cli" / "run.toml"), "--output", str(folder / "cli" / "dist")])
        (folder / f"cli-rank{rank}.txt").write_text(f"{status}\n{printed.getvalue()}")
    finally:
        distributed.shutdown()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed")
    single = {}
    for scenario in ("hybrid", "gauss-newton", "imc-line", "idle"):
        trainer = make_trainer(scenario, folder / f"{scenario}-single")
        trainer.fit()
        single[scenario] = summary(trainer)
    with failing_sampler():
        trainer = make_trainer("rollback", None)
        trainer.fit()
        single["rollback"] = summary(trainer)
    shutil.copytree(folder / "hybrid-single", folder / "hybrid-single-copy")
    resumed = Trainer.resume(folder / "hybrid-single", max_epochs=3)
    resumed.fit()
    single["single->single"] = summary(resumed)
    write_cli_config(folder / "cli")
    with one_openmm_thread():
        from openmm_diffsim.cli import main

        assert main(["fit", str(folder / "cli" / "run.toml"), "--output", str(folder / "cli" / "single")]) == 0

    torch.multiprocessing.spawn(_worker, args=(_free_port(), str(folder)), nprocs=WORLD, join=True)
    ranks = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    resumed = Trainer.resume(folder / "hybrid-dist", max_epochs=3)
    resumed.fit()
    single["dist->single"] = summary(resumed)
    return {"folder": folder, "single": single, "ranks": ranks}


def assert_same(a, b, what):
    assert a["params"].keys() == b["params"].keys()
    for name in a["params"]:
        torch.testing.assert_close(a["params"][name], b["params"][name], rtol=1e-10, atol=1e-12, msg=what)
    assert len(a["history"]) == len(b["history"]), what
    for ra, rb in zip(a["history"], b["history"], strict=True):
        assert ra.keys() == rb.keys(), what
        for key in ra:
            np.testing.assert_allclose(
                np.asarray(_flat(ra[key])), np.asarray(_flat(rb[key])), rtol=1e-9, atol=1e-12, err_msg=f"{what}: {key}"
            )


def _flat(value):
    if isinstance(value, dict):
        return [x for k in sorted(value) for x in _flat(value[k])]
    if isinstance(value, (bool, int, float)):
        return [float(value)]
    if value is None:  # e.g. no noise estimate or model ratio yet: must be None in both
        return [float("nan")]
    return [float(v) for v in value]


@pytest.mark.parametrize("scenario", ["hybrid", "gauss-newton", "imc-line", "idle"])
def test_two_processes_equal_one_process(runs, scenario):
    one = runs["single"][scenario]
    for rank, out in enumerate(runs["ranks"]):
        assert_same(out[scenario], one, f"{scenario}, rank {rank}")
        # The work is counted as one process counts it.
        assert out[scenario]["md_steps"] == one["md_steps"]
        assert out[scenario]["rollout_steps"] == one["rollout_steps"]
        assert all(len(seconds) == WORLD for seconds in out[scenario]["rank_seconds"])
    assert one["params"]["pair_potentials.0.sigma"].item() != pytest.approx(0.32, abs=1e-6)  # it trained
    # The paths the scenario is meant to cover were taken.
    resampled = [set(h["resampled"].values()) for h in one["history"]]
    if scenario in ("hybrid", "idle"):
        assert resampled == [{True}, {False}]  # fresh snapshots (rollout for hybrid), then reweighting
    if scenario == "hybrid":
        assert one["rollout_steps"] > 0
    if scenario == "gauss-newton":
        assert any(h["gauss_newton"]["accepted"] for h in one["history"])
    if scenario == "imc-line":
        assert all(0.25 <= h["imc"]["line_scale"] <= 1.0 for h in one["history"] if h["imc"]["max_change_kT"] > 0)
        assert any("line_scale" in h["imc"] for h in one["history"])
        assert all(h["imc"]["loss_noise"] > 0 for h in one["history"][1:])


def test_a_failure_on_one_rank_rolls_every_rank_back_as_one_process_does(runs):
    one = runs["single"]["rollback"]
    (event,) = [e for events in one["events"] for e in events]
    assert event["event"] == "rollback" and "energy is NaN" in event["reason"] and event["epoch"] == 1
    for rank, out in enumerate(runs["ranks"]):
        assert_same(out["rollback"], one, f"rollback, rank {rank}")
        assert out["rollback"]["events"] == one["events"]
        assert out["rollback"]["learning_rate"] == one["learning_rate"] == pytest.approx(0.005)
        assert out["rollback"]["md_steps"] == one["md_steps"]


def test_an_unexpected_error_on_one_rank_stops_every_rank(runs):
    owner, other = runs["ranks"][1]["fatal"], runs["ranks"][0]["fatal"]
    assert owner == ("KeyError", "'boom'")
    assert other[0] == "RuntimeError" and "rank 1 failed on state 'T120': KeyError: 'boom'" in other[1]


def test_only_rank_zero_writes_and_the_log_matches_one_process(runs):
    folder = runs["folder"]
    single = [json.loads(x) for x in (folder / "gauss-newton-single" / "log.jsonl").read_text().splitlines()]
    dist = [json.loads(x) for x in (folder / "gauss-newton-dist" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in dist] == [0, 1]
    for a, b in zip(single, dist, strict=True):
        assert a["state_losses"] == pytest.approx(b["state_losses"], rel=1e-9)
        assert a["md_steps"] == b["md_steps"]
    assert sorted(p.name for p in (folder / "gauss-newton-dist").iterdir()) == ["checkpoint.pt", "log.jsonl", "plots"]
    # The checkpoint holds every state's last configuration, not only rank 0's.
    data = torch.load(folder / "gauss-newton-dist" / "checkpoint.pt", weights_only=False)
    assert sorted(data["sampler_states"]) == ["T120", "T150"]


@pytest.mark.parametrize("route", ["dist->dist", "single->dist", "dist->single"])
def test_checkpoints_resume_in_either_mode(runs, route):
    reference = runs["single"]["single->single"]
    if route == "dist->single":
        assert_same(runs["single"][route], reference, route)
    else:
        for rank, out in enumerate(runs["ranks"]):
            assert_same(out[route], reference, f"{route}, rank {rank}")
    assert len(reference["history"]) == 3


# -- no processes needed --------------------------------------------------------------------------


def test_partition_balances_cost_and_is_round_robin_for_equal_states():
    assert distributed.partition([1.0] * 5, 2) == [[0, 2, 4], [1, 3]]
    assert distributed.partition([1.0, 1.0], 3) == [[0], [1], []]
    # Largest first onto the least loaded rank: 10 | 6 + 3 + 1.
    assert distributed.partition([3.0, 10.0, 1.0, 6.0], 2) == [[1], [0, 2, 3]]
    with pytest.raises(ValueError, match="n_ranks"):
        distributed.partition([1.0], 0)
    with pytest.raises(ValueError, match="non-negative"):
        distributed.partition([-1.0], 2)


def test_one_process_needs_nothing(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.init() is False
    assert not distributed.is_distributed()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main_process()) == (0, 1, True)
    x = torch.arange(3.0)
    assert distributed.all_reduce(x) is x
    assert distributed.all_gather_objects({"a": 1}) == [{"a": 1}]


def test_incomplete_environment_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="RANK"):
        distributed.init()
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="outside"):
        distributed.init()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        distributed.init()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(ValueError, match="backend"):
        distributed.init(backend="mpi")


# -- the command line under torchrun ------------------------------------------------------------------

CLI_CONFIG = """
[potential]
species = ["Ar"]
cutoff = 0.75

[potential.pairs."Ar-Ar"]
type = "lennard-jones"
sigma = 0.32
epsilon = 0.996

[[state]]
name = "cold"
counts = [64]
masses = [39.948]
temperature = 120.0
box = [1.6, 1.6, 1.6]

[[state.target]]
pair = "Ar-Ar"
file = "gas.dat"

[[state]]
name = "warm"
counts = [64]
masses = [39.948]
temperature = 150.0
box = [1.6, 1.6, 1.6]

[[state.target]]
pair = "Ar-Ar"
file = "gas.dat"

[training]
method = "reweighting"
max_epochs = 2
seed = 4

[sampling]
platform = "CPU"
n_snapshots = 4
interval = 10
equilibration = 20

[estimator]
r_range = [0.0, 0.7]
n_bins = 70

[output]
directory = "run"
plot_every = 0

[export]
formats = ["lammps"]
"""


def write_cli_config(folder):
    from openmm_diffsim.targets import write_rdf

    folder.mkdir(parents=True, exist_ok=True)
    target = gas_target()
    write_rdf(folder / "gas.dat", target.r, target.g, pair=("Ar", "Ar"))
    (folder / "run.toml").write_text(CLI_CONFIG)
    return folder / "run.toml"


@contextlib.contextmanager
def one_openmm_thread():
    """This process's OpenMM CPU platform on one thread (as each spawned rank on this 2-core box)."""
    import openmm

    cpu = openmm.Platform.getPlatformByName("CPU")
    before = cpu.getPropertyDefaultValue("Threads")
    cpu.setPropertyDefaultValue("Threads", "1")
    try:
        yield
    finally:
        cpu.setPropertyDefaultValue("Threads", before)


def compare_cli_runs(single, dist):
    from openmm_diffsim.cli import load_table

    tables = load_table(single), load_table(dist)
    for (name, a), (_, b) in zip(tables[0].named_parameters(), tables[1].named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    assert a.item() != pytest.approx(0.996, abs=1e-6)  # epsilon trained
    logs = [
        [json.loads(x)["state_losses"] for x in (run / "log.jsonl").read_text().splitlines()] for run in (single, dist)
    ]
    assert len(logs[0]) == len(logs[1]) == 2
    for a, b in zip(*logs, strict=True):
        assert a == pytest.approx(b, rel=1e-9)


def test_cli_fit_in_a_process_group_reports_and_exports_once(runs):
    folder = runs["folder"]
    status, printed = (folder / "cli-rank0.txt").read_text().split("\n", 1)
    assert status == "0"
    assert printed.count("finished 2 epoch(s)") == 1 and printed.count("exported lammps") == 1
    assert "2 processes; rank 0: cold; rank 1: warm" in printed
    assert (folder / "cli-rank1.txt").read_text() == "0\n"  # rank 1 printed nothing
    assert (folder / "cli" / "dist" / "export" / "pair_table.lammps").is_file()
    compare_cli_runs(folder / "cli" / "single", folder / "cli" / "dist")


@pytest.mark.slow
def test_cli_fit_runs_unchanged_under_torchrun(tmp_path):
    """The real launcher: ``torchrun --standalone --nproc-per-node 2 -m openmm_diffsim.cli fit run.toml``."""
    import subprocess
    import sys

    config = write_cli_config(tmp_path)
    # Fresh processes with one OpenMM CPU thread each, so both runs sum forces alike.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OPENMM_CPU_THREADS"] = "1"
    fit = ["-m", "openmm_diffsim.cli", "fit", str(config), "--output"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    two = subprocess.run(
        torchrun + fit + [str(tmp_path / "dist")], capture_output=True, text=True, env=env, timeout=600
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("finished 2 epoch(s)") == 1, two.stdout
    assert two.stdout.count("exported lammps") == 1
    assert "2 processes; rank 0: cold; rank 1: warm" in two.stdout
    one = subprocess.run([sys.executable] + fit + [str(tmp_path / "single")], capture_output=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    compare_cli_runs(tmp_path / "single", tmp_path / "dist")
