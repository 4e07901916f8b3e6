"""Sharded runs on 8 simulated devices agree with the single-device run, for every rules preset."""

import numpy as np
import pytest

import nemotron_jax as nj
from nemotron_jax.sharding import MeshConfig

LAYOUTS = {
    "dp": MeshConfig(data=8, fsdp=1, rules="dp"),
    "fsdp": MeshConfig(data=2, fsdp=4, rules="fsdp"),
    "fsdp_tp": MeshConfig(data=1, fsdp=2, tensor=4, rules="fsdp_tp"),
}
TOKENS = np.random.default_rng(0).integers(0, 512, size=(8, 24))


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_sharded_logits_equal_single_device(tiny_hetero, name):
    layout = LAYOUTS[name].layout()
    sharded = nj.init(tiny_hetero.config, seed=0, layout=layout)
    embed = sharded.module.embed[...]
    assert len(embed.sharding.device_set) == 8
    np.testing.assert_allclose(sharded.logits(TOKENS), tiny_hetero.logits(TOKENS), rtol=2e-5, atol=2e-5)


def test_kv_heads_that_do_not_divide_are_replicated(tiny_hetero):
    layout = LAYOUTS["fsdp_tp"].layout()
    model = nj.init(tiny_hetero.config, layout=layout)
    k_gqa1 = model.module.layers[4].attention.k[...]  # 1 KV head cannot split over tensor=4
    q = model.module.layers[4].attention.q[...]  # 4 query heads can
    assert k_gqa1.sharding.spec[1] is None
    assert q.sharding.spec[1] == "tensor"


def test_save_on_one_mesh_restore_on_another(tiny_hetero, tmp_path):
    saved = nj.init(tiny_hetero.config, seed=0, layout=LAYOUTS["fsdp_tp"].layout())
    saved.save(tmp_path / "m")
    restored = nj.load(tmp_path / "m", layout=LAYOUTS["fsdp"].layout())
    gate = restored.module.layers[0].ffn.gate[...]
    assert gate.sharding.spec[0] == "fsdp"
    np.testing.assert_allclose(restored.logits(TOKENS), tiny_hetero.logits(TOKENS), rtol=2e-5, atol=2e-5)
    hf = nj.load(_hf_copy(tiny_hetero, tmp_path), layout=LAYOUTS["dp"].layout())
    np.testing.assert_allclose(hf.logits(TOKENS), tiny_hetero.logits(TOKENS), rtol=2e-5, atol=2e-5)


def _hf_copy(model, tmp_path):
    model.save_hf(tmp_path / "hf")
    return tmp_path / "hf"


def test_mesh_config_errors():
    with pytest.raises(ValueError, match="does not fit"):
        MeshConfig(data=3, fsdp=-1).layout()
    with pytest.raises(ValueError, match="at most one"):
        MeshConfig(data=-1, fsdp=-1).layout()
    with pytest.raises(ValueError, match="unknown sharding rules"):
        MeshConfig(rules="zero9").layout()
