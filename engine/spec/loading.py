"""The drafters a server offers: prompt lookup and TR-Jacobi always, and each trained drafter (pass,
bpd, recycle) whose artifact exists for the served model, or was named (then it must load)."""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from engine.config import EngineConfig
from engine.spec.jacobi import JacobiConfig, JacobiProposer
from engine.spec.ngram import NgramProposer
from engine.spec.refine import Refiner, load_refiner

DEFAULT_JACOBI_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "spec" / "jacobi.yaml"
log = logging.getLogger(__name__)


def build_proposers(config: EngineConfig, model_dir: Path | None) -> dict:
    """method -> proposer; raises ValueError for an artifact that was asked for and cannot serve."""
    proposers = {"ngram": NgramProposer(config.num_draft_tokens, cutoff=config.ngram_cutoff),
                 "jacobi": _jacobi_proposer(config)}
    if model_dir is None:
        return proposers
    refiner = _refiner(config)  # one n-gram LM of the self-distilled data for pass and bpd
    for method in TRAINED_LOADERS:
        proposers.update(_trained_proposer(config, model_dir, method, refiner))
    return proposers


def _refiner(config: EngineConfig) -> Refiner | None:
    """Draft refinement; committed data that cannot serve this model leaves each request's own text
    (a named file must load)."""
    try:
        return load_refiner(config)
    except ValueError as exc:
        if config.refine_ngram_data:
            raise
        log.warning("draft refinement uses each request's own text alone: %s", exc)
        return load_refiner(replace(config, refine_ngram_data=""))


def _jacobi_proposer(config: EngineConfig) -> JacobiProposer:
    path = Path(config.jacobi_config) if config.jacobi_config else DEFAULT_JACOBI_CONFIG
    shape = JacobiConfig.from_yaml(path) if path.is_file() else JacobiConfig()
    return JacobiProposer(shape, retrieval_cutoff=config.ngram_cutoff)


def _trained_proposer(config: EngineConfig, model_dir: Path, method: str, refiner: Refiner | None) -> dict:
    """A drafter with a trained artifact (pass, bpd, recycle) when one exists for this model (or was named:
    then it must load)."""
    named = getattr(config, f"{method}_artifact")  # a file the operator named must load
    try:
        proposer = TRAINED_LOADERS[method](config, model_dir, refiner)
    except ValueError as exc:
        if named or config.spec == method:
            raise
        log.warning("speculative method %r is unavailable: %s", method, exc)
        return {}
    if proposer is None:
        if config.spec == method:
            raise ValueError(f"--spec {method} needs a trained artifact for {config.model}: none found in "
                             f"artifacts/{method}/; give one with --{method}-artifact (train it with "
                             f"`specd train {method}`)")
        return {}
    return {method: proposer}


def _load_pass(config, model_dir, refiner):
    from engine.spec.lookahead import load_pass_proposer

    return load_pass_proposer(config, model_dir, refiner)


def _load_bpd(config, model_dir, refiner):
    from engine.spec.bpd import load_bpd_proposer

    return load_bpd_proposer(config, model_dir, refiner)


def _load_recycle(config, model_dir, refiner):  # its module drafts whole tokens: nothing to refine
    from engine.spec.recycle import load_recycle_proposer

    return load_recycle_proposer(config, model_dir)


TRAINED_LOADERS = {"pass": _load_pass, "bpd": _load_bpd, "recycle": _load_recycle}
"""TRAINED_METHODS -> the loader of its drafter (imported when used)."""
