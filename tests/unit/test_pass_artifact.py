"""Drafter artifacts: weight fingerprint, save/load round trip, and the errors of a wrong artifact."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from engine.train.artifact import ArtifactError, load_artifact, read_header, save_artifact, weight_fingerprint


def fake_model(path, seed: int = 0, **override):
    """A directory with a safetensors file shaped like a (very) small model."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {"model.embed_tokens.weight": torch.randn(32, 8, generator=gen),
               "model.layers.0.mlp.down_proj.weight": torch.randn(8, 16, generator=gen),
               "model.norm.weight": torch.ones(8)}
    tensors.update(override)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    return path


def test_fingerprint_is_stable_and_changes_with_any_matrix(tmp_path):
    a = fake_model(tmp_path / "a")
    assert weight_fingerprint(a) == weight_fingerprint(fake_model(tmp_path / "a2"))
    assert weight_fingerprint(a).startswith("sha256:")
    assert weight_fingerprint(a) != weight_fingerprint(fake_model(tmp_path / "b", seed=1))
    tweaked = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    tweaked[0, 3] += 1e-3  # one edge-row value of one layer
    assert weight_fingerprint(a) != weight_fingerprint(
        fake_model(tmp_path / "c", **{"model.layers.0.mlp.down_proj.weight": tweaked}))
    assert weight_fingerprint(a) != weight_fingerprint(fake_model(tmp_path / "d", **{"model.norm.weight": torch.full((8,), 2.0)}))


def test_round_trip(tmp_path):
    model = fake_model(tmp_path / "m")
    embeds = torch.randn(3, 8)
    path = save_artifact(tmp_path / "x.safetensors", {"lookahead": embeds}, method="pass", base_model="m",
                         base_model_hash=weight_fingerprint(model), num_lookahead=3, command="specd train pass")
    header = read_header(path)
    assert header["method"] == "pass" and header["num_lookahead"] == 3 and header["command"] == "specd train pass"
    artifact = load_artifact(path, "pass", model_dir=model)
    assert torch.equal(artifact.tensors["lookahead"], embeds)
    assert artifact.method == "pass"


def test_artifact_of_another_model_fails_clearly(tmp_path):
    model, other = fake_model(tmp_path / "m"), fake_model(tmp_path / "o", seed=7)
    path = save_artifact(tmp_path / "x.safetensors", {"lookahead": torch.zeros(2, 8)}, method="pass",
                         base_model="m", base_model_hash=weight_fingerprint(model))
    with pytest.raises(ArtifactError, match=r"trained for base model 'm'.*specd train pass"):
        load_artifact(path, "pass", model_dir=other)


def test_wrong_method_and_files_that_are_not_artifacts(tmp_path):
    model = fake_model(tmp_path / "m")
    path = save_artifact(tmp_path / "x.safetensors", {"heads": torch.zeros(2, 8)}, method="bpd", base_model="m",
                         base_model_hash=weight_fingerprint(model))
    with pytest.raises(ArtifactError, match="for method 'bpd', not 'pass'"):
        load_artifact(path, "pass", model_dir=model)
    with pytest.raises(ArtifactError, match="does not exist"):
        load_artifact(tmp_path / "missing.safetensors", "pass")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ArtifactError, match="not a safetensors file"):
        load_artifact(tmp_path / "junk.safetensors", "pass")
    save_file({"lookahead": torch.zeros(2, 8)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ArtifactError, match="no specd header"):
        load_artifact(tmp_path / "plain.safetensors", "pass")
