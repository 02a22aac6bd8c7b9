r"""The one bridge to ArviZ: draws from a trained guide as an ArviZ posterior object.

:func:`to_inference_data` draws ``S`` independent samples from the variational posterior
for a chosen subset of each compressed tensor's weights,

.. math::

    z_j \sim \mathrm{Bernoulli}(g_j),\quad a_j \sim \mathrm{Categorical}(\phi_j),\quad
    w_j = z_j\,(\mu_{a_j} + s_{a_j} \varepsilon_j),\ \varepsilon_j \sim \mathcal N(0, 1),

with the learned inclusion probabilities ``g_j = sigmoid(theta_j)`` (not the frozen 0/1 mask,
which is the greedy decision ``g_j > 0.5``), and builds these groups (xarray Datasets):

* ``posterior`` (dims ``chain`` = 1, ``draw`` = S): for every compressed tensor with slug
  ``s`` (its site name with every non-alphanumeric character replaced by ``_``),
  ``w_s``, ``gate_s`` (0/1) and ``code_s`` (the level index ``a_j``) on dim ``s_index``, whose
  coordinate holds the chosen flat indices; ``locs_s``, ``scales_s``, ``mix_s`` on dim
  ``s_level``: the codebook, a point estimate of the variational family, so it is constant
  over draws (sd 0). ``attrs["layers"]`` maps slugs to site names and shapes (JSON);
  ``attrs["objective_kind"]`` names what the run optimised (e.g. ``surrogate+elbo``) and
  ``attrs["scales_and_mix"]`` whether the scales and mixing weights were fitted to the data in the
  posterior phase (:func:`scales_provenance`).
* ``sample_stats`` (dim ``step``, the logged SVI steps, *not* draws): ``objective`` (what SVI
  maximised; ``attrs["objective"]`` lists its kinds, ``attrs["phase_objectives"]`` (JSON) maps each
  phase to its kinds, e.g. ``{"prune": ["surrogate"], "posterior": ["elbo"]}``), ``elbo`` (sampled runs
  only), ``data_term`` (``E_q log p(D | W) / N``), ``kl`` (nats), ``kl_per_datum``, ``beta``,
  ``sparsity``, ``phase``.
* ``observed_data``: each given observed array with at most ``max_observed`` values.

Diagnostics: the draws are independent samples from ``q``, not a Markov chain, so R-hat,
MCSE from autocorrelation and the other chain diagnostics do not apply (one chain, no
mixing to check; ``az.rhat`` returns NaN for one chain); ``S`` independent draws carry an
ESS of ``S`` (``az.ess`` estimates scatter around it), so ESS only sizes Monte-Carlo errors.
Use summary statistics (:func:`posterior_summary`, i.e. ``az.summary(kind="stats")``),
``az.plot_posterior`` and ``az.plot_forest``. The draws say nothing about how well ``q``
approximates the true posterior.

Backends: everything above is built as plain xarray Datasets; a
:class:`PosteriorBackend` turns them into the container of the installed ArviZ:
:class:`InferenceDataBackend` (``arviz.InferenceData``, arviz < 1) or
:class:`DataTreeBackend` (``xarray.DataTree``, arviz >= 1). Files are netCDF-4 (h5netcdf).
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
import pandas as pd
import torch
import xarray as xr

from sqs_pyro.format.atomic import atomic_path

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # arviz 0.x announces its 1.0 refactor on import
    import arviz as az

ENGINE = "h5netcdf"
HISTORY_STATS = ("objective", "kl", "kl_per_datum", "beta", "sparsity")


class PosteriorBackend(Protocol):
    """What the rest of the package needs from an ArviZ data container."""

    def build(self, groups: Mapping[str, xr.Dataset]) -> Any:
        """The container holding ``groups`` (name -> Dataset)."""

    def group(self, data: Any, name: str) -> xr.Dataset:
        """One group as an in-memory Dataset."""

    def group_names(self, data: Any) -> list[str]:
        """Names of the groups present."""

    def save(self, data: Any, path: Path) -> None:
        """Write ``data`` to the netCDF file ``path``."""

    def load(self, path: Path) -> Any:
        """Read a container written by :meth:`save`, fully into memory."""

    def summary(self, data: Any, var_names: list[str] | None, hdi_prob: float) -> pd.DataFrame:
        """Mean, sd and HDI per scalar of the posterior (no chain diagnostics)."""


class InferenceDataBackend:
    """``arviz.InferenceData`` (arviz 0.x)."""

    def build(self, groups: Mapping[str, xr.Dataset]) -> Any:
        return az.InferenceData(**groups)

    def group(self, data: Any, name: str) -> xr.Dataset:
        return data[name]

    def group_names(self, data: Any) -> list[str]:
        return list(data.groups())

    def save(self, data: Any, path: Path) -> None:
        data.to_netcdf(str(path), engine=ENGINE)

    def load(self, path: Path) -> Any:
        with az.rc_context(rc={"data.load": "eager"}):
            return az.from_netcdf(str(path), engine=ENGINE)

    def summary(self, data: Any, var_names: list[str] | None, hdi_prob: float) -> pd.DataFrame:
        return az.summary(data, var_names=var_names, kind="stats", hdi_prob=hdi_prob)


class DataTreeBackend:
    """``xarray.DataTree`` with one child per group (the container of arviz >= 1)."""

    def build(self, groups: Mapping[str, xr.Dataset]) -> Any:
        return xr.DataTree.from_dict(dict(groups))

    def group(self, data: Any, name: str) -> xr.Dataset:
        return data[name].to_dataset()

    def group_names(self, data: Any) -> list[str]:
        return list(data.children)

    def save(self, data: Any, path: Path) -> None:
        data.to_netcdf(str(path), engine=ENGINE)

    def load(self, path: Path) -> Any:
        return xr.load_datatree(str(path), engine=ENGINE)

    def summary(self, data: Any, var_names: list[str] | None, hdi_prob: float) -> pd.DataFrame:
        return az.summary(data, var_names=var_names, kind="stats", ci_kind="hdi", ci_prob=hdi_prob)


def default_backend() -> PosteriorBackend:
    """The container of the installed ArviZ: InferenceData before 1.0, DataTree from 1.0."""
    major = int(az.__version__.split(".")[0])
    return InferenceDataBackend() if major < 1 else DataTreeBackend()


def slug(name: str) -> str:
    """A netCDF-safe variable stem for a site name (``features.0.weight`` -> ``features_0_weight``)."""
    return re.sub(r"[^0-9A-Za-z]", "_", name)


def choose_indices(numel: int, count: int, seed: int) -> np.ndarray:
    """``min(count, numel)`` sorted flat indices drawn without replacement."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(numel, size=min(count, numel), replace=False))


@torch.no_grad()
def posterior_groups(result: Any, num_samples: int = 200, weights_per_layer: int = 32,
                     indices: Mapping[str, Sequence[int]] | None = None,
                     observed: Mapping[str, Any] | None = None, max_observed: int = 100_000,
                     seed: int = 0) -> dict[str, xr.Dataset]:
    """The groups of :func:`to_inference_data` as plain xarray Datasets (backend-independent)."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    layers = list(result.guide.layers)
    chosen = {}
    for i, layer in enumerate(layers):
        name, n = layer.site_name, layer.latent.numel()
        idx = (np.asarray(indices[name], dtype=np.int64) if indices and name in indices
               else choose_indices(n, weights_per_layer, seed + i))
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(f"indices for {name} must lie in [0, {n})")
        chosen[name] = idx
    draws = result.guide.draw(num_samples, torch.Generator().manual_seed(seed),
                              {name: torch.as_tensor(idx) for name, idx in chosen.items()})
    data_vars: dict[str, tuple[tuple[str, ...], np.ndarray]] = {}
    coords: dict[str, np.ndarray] = {"chain": np.array([0]), "draw": np.arange(num_samples)}
    layers_meta = {}
    for layer in layers:
        name, s = layer.site_name, slug(layer.site_name)
        idx, (w, gate, code) = chosen[name], draws[name]
        locs, scales = layer.locs.detach().double().cpu(), layer.scales.detach().double().cpu()
        k = locs.numel()
        per_weight, per_level = ("chain", "draw", f"{s}_index"), ("chain", "draw", f"{s}_level")
        coords[f"{s}_index"], coords[f"{s}_level"] = idx, np.arange(k)
        data_vars[f"w_{s}"] = (per_weight, w.float().cpu().numpy()[None])
        data_vars[f"gate_{s}"] = (per_weight, gate.to(torch.int8).cpu().numpy()[None])
        data_vars[f"code_{s}"] = (per_weight, code.to(torch.int16).cpu().numpy()[None])
        mix = layer.log_mix().detach().exp().double().cpu()
        for key, values in (("locs", locs), ("scales", scales), ("mix", mix)):
            data_vars[f"{key}_{s}"] = (per_level, np.broadcast_to(values.float().numpy(), (1, num_samples, k)).copy())
        layers_meta[s] = {"site": name, "shape": list(layer.latent.shape)}
    attrs = {"inference_library": "pyro", "inference_method": "mean-field variational inference (SVI)",
             "draws": "independent draws from the variational posterior q; R-hat and other chain "
                      "diagnostics do not apply", "arviz_version": az.__version__,
             "objective_kind": result.objective_kind, "scales_and_mix": scales_provenance(result.config)}
    posterior = xr.Dataset(data_vars, coords=coords, attrs={**attrs, "layers": json.dumps(layers_meta)})
    groups = {"posterior": posterior, "sample_stats": history_dataset(result.history, attrs)}
    small = {k: np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v)
             for k, v in (observed or {}).items()}
    small = {k: v for k, v in small.items() if v.size <= max_observed}
    if small:
        groups["observed_data"] = xr.Dataset(
            {k: ([f"{k}_dim_{d}" for d in range(v.ndim)], v) for k, v in small.items()}, attrs=attrs)
    return groups


def scales_provenance(config: Any) -> str:
    """Where the slab scales ``s_k`` and mixing weights ``pi_k`` come from: the posterior phase's
    sampled (tempered) ELBO with the greedy codes fixed, or, with ``posterior_epochs = 0``, the point phases."""
    if config.posterior_epochs > 0:
        beta = config.posterior_kl_weight
        return (f"learned from the data in the posterior phase ({config.posterior_epochs:g} epochs of the sampled "
                + ("ELBO" if beta == 1 else f"tempered ELBO, beta = {beta:g}") + ", mask and greedy codes fixed)")
    return ("not fitted to the data by a posterior phase (posterior_epochs = 0): the k-means start moved "
            "only by the point phases' objective")


def phase_objectives(history: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """The objective kinds each phase of ``history`` optimised, phases in order of first appearance."""
    kinds: dict[str, list[str]] = {}
    for r in history:
        if "objective_kind" in r and r["objective_kind"] not in kinds.setdefault(str(r["phase"]), []):
            kinds[str(r["phase"])].append(str(r["objective_kind"]))
    return kinds


def history_dataset(history: Sequence[Mapping[str, Any]], attrs: Mapping[str, str] | None = None) -> xr.Dataset:
    """The logged SVI records (those with an ``objective``) on dim ``step``; ``data_term = -nll``.

    ``objective`` is what SVI maximised, ``(data term - beta KL) / N``; ``attrs["objective"]``
    says whether that is an ELBO (sampled forward) or a surrogate (``mode="expected"``:
    ``log p(D | E_q W) - beta KL``, no bound). ``elbo = (data term - KL) / N`` (``beta = 1``)
    is present only for sampled runs.
    """
    rows = [r for r in history if "objective" in r]
    keys = HISTORY_STATS + (("elbo",) if rows and all("elbo" in r for r in rows) else ())
    cols = {key: ("step", np.array([r[key] for r in rows], dtype=np.float64)) for key in keys}
    cols["data_term"] = ("step", np.array([-r["nll"] for r in rows], dtype=np.float64))
    cols["phase"] = ("step", np.array([str(r["phase"]) for r in rows], dtype=str))
    kinds = sorted({str(r.get("objective_kind")) for r in rows})
    return xr.Dataset(cols, coords={"step": np.array([int(r["step"]) for r in rows], dtype=np.int64)},
                      attrs={**dict(attrs or {}), "objective": ", ".join(kinds),
                             "phase_objectives": json.dumps(phase_objectives(rows))})


def to_inference_data(result: Any, num_samples: int = 200, weights_per_layer: int = 32,
                      indices: Mapping[str, Sequence[int]] | None = None,
                      observed: Mapping[str, Any] | None = None, max_observed: int = 100_000,
                      seed: int = 0, backend: PosteriorBackend | None = None) -> Any:
    """An ArviZ object (``InferenceData`` on arviz < 1) of guide draws; see the module docstring.

    Args:
        result: a trained :class:`~sqs_pyro.infer.result.SQSResult`.
        num_samples: draws ``S``.
        weights_per_layer: size of the random subset of weights per tensor (seeded), unless
            ``indices`` gives a tensor's flat indices explicitly.
        observed: e.g. ``{"y": targets}``; arrays with more than ``max_observed`` values are left out.
        seed: seeds the subset and the draws.
    """
    groups = posterior_groups(result, num_samples, weights_per_layer, indices, observed, max_observed, seed)
    return (backend or default_backend()).build(groups)


def save_posterior(data: Any, path: str | os.PathLike, backend: PosteriorBackend | None = None) -> Path:
    """Write ``data`` to netCDF atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        (backend or default_backend()).save(data, tmp)
    return path


def load_posterior(path: str | os.PathLike, backend: PosteriorBackend | None = None) -> Any:
    """Read a file written by :func:`save_posterior` into memory."""
    return (backend or default_backend()).load(Path(path))


def posterior_summary(data: Any, var_names: Sequence[str] | None = None, hdi_prob: float = 0.9,
                      backend: PosteriorBackend | None = None) -> pd.DataFrame:
    """``az.summary(kind="stats")``: mean, sd and HDI; no chain diagnostics (see module docstring)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # constant codebook variables have sd 0
        return (backend or default_backend()).summary(data, list(var_names) if var_names else None, hdi_prob)
