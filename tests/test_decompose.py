import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from clipbackdoor.decomposition.cache import SCHEMA_VERSION, read_decomposition, read_meta, write_decomposition
from clipbackdoor.decomposition.decompose import component_names, decompose
from clipbackdoor.errors import UserError
from clipbackdoor.models.artifact import create


def model_with_random_biases(name):
    """Fresh open_clip models have zero biases and unit LayerNorm gains; randomise them so every bias path
    of the decomposition (b_O, MLP biases, ln_post beta/gamma) is really exercised."""
    model = create(name).model.eval()
    with torch.no_grad():
        for pname, p in model.visual.named_parameters():
            if pname.endswith("bias"):
                p.normal_(0, 0.5)
            elif "ln" in pname and pname.endswith("weight"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("name,size", [("clipbackdoor-tiny-vit-p8", 32), ("ViT-B-32", 224)])
@pytest.mark.parametrize("centering", ["reference", "projection"])
def test_terms_sum_to_encode_image(name, size, centering):
    torch.manual_seed(0)
    model = model_with_random_biases(name)
    x = torch.randn(3, 3, size, size)
    ref = model.encode_image(x)
    d = decompose(model.visual, x, centering=centering, normalize=False)
    rel = (d.total() - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert rel.max() < 1e-5
    dn = decompose(model.visual, x, centering=centering, normalize=True)
    assert torch.allclose(dn.total(), torch.nn.functional.normalize(ref, dim=-1), atol=1e-5)
    layers, heads = len(model.visual.transformer.resblocks), model.visual.transformer.resblocks[0].attn.num_heads
    assert dn.heads.shape == (3, layers, heads, ref.shape[-1]) and dn.mlps.shape == (3, layers, ref.shape[-1])


def test_centerings_differ_only_in_how_the_mean_is_shared():
    torch.manual_seed(1)
    model = model_with_random_biases("clipbackdoor-micro-vit-p8")
    x = torch.randn(2, 3, 32, 32)
    a = decompose(model.visual, x, centering="reference")
    b = decompose(model.visual, x, centering="projection")
    assert torch.allclose(a.total(), b.total(), atol=1e-5) and not torch.allclose(a.heads, b.heads)
    assert torch.count_nonzero(a.bias) == 0 and torch.count_nonzero(b.bias) > 0


def test_component_labels_follow_transformer_lens():
    names = component_names(2, 2)
    assert names == ["embed", "L0H0", "L0H1", "L1H0", "L1H1", "L0_mlp", "L1_mlp", "bias"]


@pytest.fixture
def cached(tmp_path):
    torch.manual_seed(2)
    model = create("clipbackdoor-micro-vit-p8").model.eval()
    d = decompose(model.visual, torch.randn(5, 3, 32, 32))
    path = tmp_path / "d.parquet"
    write_decomposition(path, [f"k{i}" for i in range(5)], np.arange(5), True, d, {"model": "m"})
    return path, d


def test_parquet_round_trip_fp16(cached):
    path, d = cached
    r = read_decomposition(path)
    assert r.keys == [f"k{i}" for i in range(5)] and r.triggered.all() and list(r.labels) == list(range(5))
    assert np.allclose(r.heads, d.heads.numpy(), atol=2e-3) and np.allclose(r.mlps, d.mlps.numpy(), atol=2e-3)
    assert np.allclose(r.total(), d.total().numpy(), atol=5e-3)
    assert r.meta["schema_version"] == SCHEMA_VERSION == "2" and r.meta["n_heads"] == "4"


def test_cache_size_is_close_to_raw_fp16(tmp_path):
    from clipbackdoor.decomposition.decompose import Decomposition

    n, layers, heads, dim = 1000, 3, 4, 64
    g = torch.Generator().manual_seed(0)
    d = Decomposition(embed=torch.randn(n, dim, generator=g), heads=torch.randn(n, layers, heads, dim, generator=g),
                      mlps=torch.randn(n, layers, dim, generator=g), bias=torch.randn(n, dim, generator=g),
                      embedding=torch.randn(n, dim, generator=g), norm=torch.rand(n, generator=g))
    path = tmp_path / "big.parquet"
    write_decomposition(path, [f"eval-{i:07d}" for i in range(n)], np.zeros(n), False, d, {})
    raw = (layers * heads + layers + 3) * dim * 2 * n  # fp16 bytes of every component
    assert path.stat().st_size < 1.05 * raw


def test_partial_read_loads_only_requested_layers(cached):
    path, d = cached
    r = read_decomposition(path, layers=[-1], with_mlps=False)
    assert np.allclose(r.heads[:, 2], d.heads[:, 2].numpy(), atol=2e-3)
    assert not r.heads[:, :2].any() and not r.mlps.any()


def test_wrong_schema_version_and_shapes_are_rejected(cached, tmp_path):
    path, _ = cached
    table = pq.read_table(path)
    meta = dict(table.schema.metadata)
    meta[b"schema_version"] = b"0"
    pq.write_table(table.replace_schema_metadata(meta), tmp_path / "old.parquet")
    with pytest.raises(UserError, match="schema version '0'"):
        read_meta(tmp_path / "old.parquet")
    meta[b"schema_version"] = SCHEMA_VERSION.encode()
    meta[b"n_heads"] = b"8"
    pq.write_table(table.replace_schema_metadata(meta), tmp_path / "shape.parquet")
    with pytest.raises(UserError, match="columns do not match"):
        read_decomposition(tmp_path / "shape.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(UserError, match="not a readable Parquet"):
        read_meta(tmp_path / "junk.parquet")
