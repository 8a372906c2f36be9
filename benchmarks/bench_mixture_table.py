"""The tabulated backend on a binary mixture: one merged spline against one spline per pair type.

Binary LJ mixture of the seed paper's experiment 3 (sigma_AA = 0.9, sigma_AB =
1.0, sigma_BB = 1.1 in units of sigma = 0.34 nm, epsilon = 0.996 kJ/mol,
argon masses, x_A = 0.5, rho* = 0.8, T* = 1.2, cutoff 2.5 sigma, truncated so
that OpenMM's NonbondedForce with Lorentz-Berthelot mixing is the same
model). For each size N this prints MD steps/s, all measured in this process
on the platform the Sampler picks (CPU here), and their ratios to native:

* ``native``: OpenMM's NonbondedForce (the reference);
* ``tabulated``: the sampler's backend, every pair type in one
  ``Continuous1DFunction`` (one spline lookup per pair);
* ``one table per pair type``: the layout before it (kept here as the
  reference): a ``Continuous1DFunction`` per pair type chosen by nested
  ``select``, which OpenMM evaluates in full for every pair, and a
  ``Discrete2DFunction`` for the pair type;
* ``export.tabulated_force``: the exported force (same merged layout, its
  own padding and 4000 knots);
* ``expression``: the LJ formulas compiled by OpenMM (possible here because
  the truth is closed-form; a trained spline of 3 x 33 knots is past
  ``MAX_EXPRESSION_KNOTS`` and runs on the table);

and the energy and force agreement of both table layouts with the model
(TorchForce).

    python benchmarks/bench_mixture_table.py [--sizes 256 1000] [--steps 300]
"""

from __future__ import annotations

import argparse

import numpy as np
from bench_sampling import steps_per_second  # this folder is on sys.path when run as a script

import openmm_diffsim as od
from openmm_diffsim.export import tabulated_force
from openmm_diffsim.sampling import DEFAULT_TABLE_ENERGY_CAP, Sampler, _table_grid_start, _tabulate_pairs
from openmm_diffsim.systems import StatePoint, reduced_lj_units

SIGMA, EPSILON, MASS = 0.34, 0.996, 39.948
CUTOFF = 2.5 * SIGMA


def mixture_table() -> od.PairTable:
    pairs = {
        ("A", "A"): od.LennardJones(0.9 * SIGMA, EPSILON),
        ("A", "B"): od.LennardJones(1.0 * SIGMA, EPSILON),
        ("B", "B"): od.LennardJones(1.1 * SIGMA, EPSILON),
    }
    return od.PairTable(["A", "B"], pairs, cutoff=CUTOFF, cutoff_mode="truncate")


def one_table_per_pair_type(table: od.PairTable, particle_species, n_points: int = 4096):
    """The tabulated force as it was: a spline per pair type, nested select, Discrete2DFunction."""
    import openmm

    r_min = _table_grid_start(table, DEFAULT_TABLE_ENERGY_CAP)
    values, slopes, _ = _tabulate_pairs(table, r_min, n_points)
    n_types = table.n_pair_types
    terms = [f"(u{k}(rr) + slope{k}*(r - rr))" for k in range(n_types)]
    energy = terms[-1]
    for k in range(n_types - 2, -1, -1):
        energy = f"select(pt - {k}, {energy}, {terms[k]})"
    force = openmm.CustomNonbondedForce(f"{energy}; rr = max(r, {r_min!r}); pt = pair_type(s1, s2)")
    force.addPerParticleParameter("s")
    for k in range(n_types):
        force.addTabulatedFunction(f"u{k}", openmm.Continuous1DFunction(values[k].tolist(), r_min, table.cutoff))
        force.addGlobalParameter(f"slope{k}", slopes[k])
    n_species = len(table.species)
    type_matrix = table.type_matrix.numpy().T.reshape(-1).astype(float).tolist()
    force.addTabulatedFunction("pair_type", openmm.Discrete2DFunction(n_species, n_species, type_matrix))
    for s in particle_species:
        force.addParticle([float(s)])
    force.setNonbondedMethod(openmm.CustomNonbondedForce.CutoffPeriodic)
    force.setCutoffDistance(table.cutoff)
    return force


def with_force(sampler: Sampler, force) -> Sampler:
    """Replace the sampler's pair force by ``force`` (same force group), keeping the state."""
    index = sampler._locate_force()
    force.setForceGroup(sampler.system.getForce(index).getForceGroup())
    sampler.system.removeForce(index)
    sampler._force_index = sampler.system.addForce(force)
    sampler.context.reinitialize(preserveState=True)
    return sampler


def agreement(sampler: Sampler, reference) -> tuple:
    energy, forces = sampler.energy_and_forces()
    e_ref, f_ref = reference
    rms = np.sqrt(np.mean(np.sum(f_ref**2, axis=1)))
    return abs(energy - e_ref) / abs(e_ref), np.abs(forces - f_ref).max() / rms


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1000])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    units = reduced_lj_units(SIGMA, EPSILON, MASS)
    table = mixture_table()
    for n in args.sizes:
        n_a = n // 2
        state = StatePoint(
            "mixture",
            ["A", "B"],
            [n_a, n - n_a],
            [MASS, MASS],
            units.temperature_from_reduced(1.2),
            density=units.density_from_reduced(0.8),
        )
        native = Sampler(state, table, backend="native", seed=0)
        native.minimize(200)
        native.equilibrate(500)
        positions = native.positions
        print(f"\nN = {n}, box = {state.box_lengths[0]:.3f} nm, platform {native.platform_name}")
        reference = Sampler(state, table, backend="torch", positions=positions, seed=0).energy_and_forces()
        samplers = {
            "native": native,
            "tabulated": Sampler(state, table, backend="tabulated", positions=positions, seed=0),
            "one table per pair type": with_force(
                Sampler(state, table, backend="tabulated", positions=positions, seed=0),
                one_table_per_pair_type(table, state.particle_species()),
            ),
            "export.tabulated_force": with_force(
                Sampler(state, table, backend="tabulated", positions=positions, seed=0),
                tabulated_force(table, state.particle_species()),
            ),
            "expression": Sampler(state, table, backend="expression", positions=positions, seed=0),
        }
        speed = {name: steps_per_second(sampler, args.steps) for name, sampler in samplers.items()}
        print("  speed (MD steps/s):")
        for name, value in speed.items():
            print(f"    {name:24s} {value:9.1f}   {value / speed['native']:6.3f} x native")
        print(f"  tabulated / one table per pair type: {speed['tabulated'] / speed['one table per pair type']:.2f} x")
        print("  against the model (TorchForce), same configuration:")
        for name in ("tabulated", "one table per pair type", "export.tabulated_force"):
            sampler = samplers[name]
            sampler.set_state(positions)
            de, df = agreement(sampler, reference)
            print(f"    {name:24s} |dE|/|E| = {de:.2e}   max|dF|/rms|F| = {df:.2e}")


if __name__ == "__main__":
    main()
