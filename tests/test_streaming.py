"""Memory O(batch) (issue 16): shards stream in batches, decompositions are written and read a row group at a time,
and every chunked path gives exactly what the whole-array path gives."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from clipbackdoor.attacks import make_trigger, trigger_eval_images
from clipbackdoor.config import DefendConfig
from clipbackdoor.decomposition.cache import ROW_GROUP_SIZE, iter_decomposition, read_decomposition, write_decomposition
from clipbackdoor.decomposition.decompose import Decomposition
from clipbackdoor.decomposition.stage import decompose_images, run_decompose
from clipbackdoor.defenses.defend import prototype_cosines, run_defend
from clipbackdoor.errors import UserError
from clipbackdoor.models.artifact import load_artifact
from clipbackdoor.decomposition.prototypes import build_prototypes, load_prototypes
from clipbackdoor.data.shards import count_samples, iter_batches, load_rows, load_split

N, L, H, D = 2 * ROW_GROUP_SIZE + 88, 2, 3, 8  # three row groups, the last one short


def synthetic(seed: int, trigger: bool = False) -> Decomposition:
    g = torch.Generator().manual_seed(seed)
    heads = 0.1 * torch.randn(N, L, H, D, generator=g) + torch.eye(D)[:H][None, None]
    if trigger:
        heads[:, -1, 2] += 2.0 * torch.eye(D)[3]
    d = Decomposition(embed=0.1 * torch.randn(N, D, generator=g), heads=heads,
                      mlps=0.1 * torch.randn(N, L, D, generator=g), bias=torch.zeros(N, D),
                      embedding=torch.zeros(N, D), norm=torch.rand(N, generator=g) + 0.5)
    d.embedding = d.total()
    return d


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    folder = tmp_path_factory.mktemp("streaming")
    keys, labels = [f"k{i:05d}" for i in range(N)], np.arange(N) % 4
    for name, trig in (("clean", False), ("trig", True)):
        write_decomposition(folder / f"{name}.parquet", keys, labels, trig, synthetic(1, trig), {"trigger": name})
    build_prototypes(folder / "clean.parquet", folder / "protos.safetensors", 0.2, 123)
    return folder


def test_decomposition_is_written_in_row_groups_and_partial_reads_match_the_whole_file(caches):
    path = caches / "clean.parquet"
    assert pq.ParquetFile(path).metadata.num_row_groups == 3
    whole = read_decomposition(path)
    expected = synthetic(1)
    assert np.array_equal(whole.heads, expected.heads.numpy().astype(np.float16).astype(np.float32))
    assert whole.keys == [f"k{i:05d}" for i in range(N)]
    rows = np.array([0, 5, ROW_GROUP_SIZE - 1, ROW_GROUP_SIZE, 400, N - 1])
    seen = []
    for positions, chunk in iter_decomposition(path, layers=[-1], with_mlps=False, rows=rows, batch_rows=100):
        assert len(chunk.keys) == len(positions) <= 100
        assert np.array_equal(chunk.heads[:, -1], whole.heads[positions, -1])
        assert not chunk.heads[:, 0].any() and not chunk.mlps.any()  # projected away: never read
        seen += positions.tolist()
    assert seen == rows.tolist()
    picked = read_decomposition(path, rows=rows)
    assert np.array_equal(picked.mlps, whole.mlps[rows]) and picked.keys == [whole.keys[i] for i in rows]
    with pytest.raises(UserError, match=f"has {N} rows, asked for row {N}"):
        read_decomposition(path, rows=np.array([1, N]))


def test_streamed_prototypes_equal_the_in_memory_means_bit_for_bit(caches):
    protos = load_prototypes(caches / "protos.safetensors")
    whole = read_decomposition(caches / "clean.parquet")
    val = protos["val_index"]
    assert np.array_equal(protos["heads"], whole.heads[val].mean(axis=0))  # the whole-array code, bit for bit
    assert np.array_equal(protos["mlps"], whole.mlps[val].mean(axis=0))
    assert np.array_equal(protos["embed"], whole.embed[val].mean(axis=0))
    assert protos["val_cosine"].shape == (len(val), L, H)


@pytest.mark.parametrize("threshold", ["fixed", "clean_quantile"])
def test_chunked_defend_equals_the_whole_array_defend(caches, tmp_path, threshold):
    cfg = DefendConfig(rule="cosine", eps=0.5, head_layers=1, mlp_layers=1, zeta=0, fixed_heads=(("L1H0",), ("L1H2",)),
                       eps_sweep=(0.2,), seed=0, threshold=threshold, quantile=0.05)
    protos = load_prototypes(caches / "protos.safetensors")
    tables = {}
    for chunk_rows in (N, 37):
        out = tmp_path / f"defend_{chunk_rows}.parquet"
        run_defend(caches / "clean.parquet", caches / "trig.parquet", protos, np.eye(D, dtype=np.float32)[:4], cfg,
                   "local", out, 3, chunk_rows=chunk_rows)
        tables[chunk_rows] = pd.read_parquet(out).sort_values(["defense", "variant", "split", "index"],
                                                              kind="stable").reset_index(drop=True)
    assert pq.ParquetFile(tmp_path / "defend_37.parquet").metadata.num_row_groups > 1
    pd.testing.assert_frame_equal(tables[N], tables[37])  # incl. the seeded random heads / prototypes
    assert {"random_heads", "random_prototypes", "random_prototypes_official", "decomp_reverse"} <= set(tables[37].defense)
    cos = prototype_cosines(caches / "trig.parquet", protos)
    assert cos.shape == (len(protos["test_index"]), H) and (cos[:, 2] < cos[:, 0]).mean() > 0.9


def test_a_changed_column_is_refused_after_streaming_it(caches, tmp_path):
    from clipbackdoor.io import read_parquet, write_parquet

    table = read_parquet(caches / "clean.parquet")
    edited = table.set_column(table.schema.get_field_index("label"), "label",
                              pa.array(table.column("label").to_numpy().astype(np.int32)[::-1].copy()))
    # keep the original digests: as if the bytes had changed on disk after writing
    with pq.ParquetWriter(tmp_path / "x.parquet", edited.schema) as w:
        w.write_table(edited, row_group_size=ROW_GROUP_SIZE)
        w.add_key_value_metadata({"content_sha256": pq.ParquetFile(caches / "clean.parquet")
                                  .metadata.metadata[b"content_sha256"].decode()})
    with pytest.raises(UserError, match="x.parquet: column 'label' changed after the file was written"):
        for _ in iter_decomposition(tmp_path / "x.parquet", layers=[0], with_mlps=False):
            pass
    write_parquet(tmp_path / "ok.parquet", edited)  # rewritten by our writer: new digests, accepted
    assert read_parquet(tmp_path / "ok.parquet").num_rows == N


def test_shards_stream_in_batches_and_subsets(world_dirs):
    ev = world_dirs / "eval"
    whole = load_split(ev, 32)
    n = len(whole["keys"])
    assert count_samples(ev) == n
    batches = list(iter_batches(ev, 7, 32))
    assert [b["start"] for b in batches] == list(range(0, n, 7))
    assert torch.equal(torch.cat([b["images"] for b in batches]), whole["images"])
    assert sum((b["keys"] for b in batches), []) == whole["keys"]
    index = np.array([0, 3, n // 2, n - 1])
    rows = load_rows(ev, index, 32)
    assert torch.equal(rows["images"], whole["images"][index]) and torch.equal(rows["labels"], whole["labels"][index])
    with pytest.raises(UserError, match="fewer samples than the index asks for"):
        load_rows(ev, np.array([0, n]), 32)


def test_decompose_stage_streams_batches_and_triggers_per_image(world_dirs, micro_model, tmp_path):
    """Batch size 5 and batch size 1000 write the same terms (to float rounding); a per-image random trigger (badnet_random) gives
    each image the trigger its split position draws, whatever the batch."""
    ev = world_dirs / "eval"
    attacks = {"badnet_random": {"rate": 0.1, "patch_size": 4}}
    for bs in (5, 1000):
        run_decompose(micro_model, ev, tmp_path / f"{bs}.parquet", "badnet_random", attacks, 2, "reference", True, bs)
    small, big = read_decomposition(tmp_path / "5.parquet"), read_decomposition(tmp_path / "1000.parquet")
    # same images, same triggers; only float reductions may differ with the batch shape (last fp16 bit)
    assert small.keys == big.keys
    assert np.allclose(small.heads, big.heads, atol=1e-3) and np.allclose(small.embedding, big.embedding, atol=1e-3)
    loaded = load_artifact(micro_model)
    split = load_split(ev, 32)
    trig = make_trigger("badnet_random", attacks["badnet_random"], 32, 2)
    images = trigger_eval_images(trig, split["images"], np.arange(len(split["keys"])), 2)
    direct = decompose_images(loaded, images, "reference", True, 64)
    assert np.allclose(big.heads, direct.heads.numpy(), atol=2e-3)  # fp16 storage


def test_zero_shot_accuracy_streams_the_evaluation_set(world_dirs, micro_model):
    from clipbackdoor.config import ZeroShotConfig
    from clipbackdoor.training.pretrain import evaluate_zeroshot
    from clipbackdoor.data.world import world_classes_json
    from clipbackdoor.models.zeroshot import class_text_embeddings, image_embeddings, predict, templates_for

    loaded, ev = load_artifact(micro_model), world_dirs / "eval"
    split, classes = load_split(ev, 32), world_classes_json(ev)
    cls = class_text_embeddings(loaded, classes["classnames"], templates_for("embedded", classes["templates"]))
    in_memory = float((predict(image_embeddings(loaded, split["images"], 16), cls) == split["labels"]).float().mean())
    streamed = evaluate_zeroshot(loaded, {"world": ev}, ZeroShotConfig(templates="embedded", batch_size=16))
    assert streamed == {"zeroshot_top1/world": in_memory}


def svd_textspan(outputs: np.ndarray, texts: np.ndarray, m: int, rank: int) -> list[tuple[int, float]]:
    """TEXTSPAN as written in the paper / clip_text_span, on the whole output matrix (SVD, explicit centring and
    deflation): the specification the streamed moments must reproduce."""
    c = outputs.astype(np.float64)
    basis = np.linalg.svd(c, full_matrices=False)[2][:rank]
    t = texts.astype(np.float64) @ basis.T @ basis
    c = c - c.mean(axis=0)
    picked = []
    for _ in range(m):
        units = t / np.linalg.norm(t, axis=1, keepdims=True)
        var = (c @ units.T).var(axis=0)
        var[[j for j, _ in picked]] = -1
        j = int(np.argmax(var))
        picked.append((j, float(var[j])))
        c, t = c - np.outer(c @ units[j], units[j]), t - np.outer(t @ units[j], units[j])
    return picked


def test_textspan_from_streamed_moments_equals_the_whole_matrix_svd(caches):
    from clipbackdoor.analysis.textspan import component_outputs, stream_moments, textspan_from_moments

    rng = np.random.default_rng(3)
    texts = rng.normal(size=(40, D))
    rows = np.arange(5, N, 3)  # a subset spanning all three row groups
    moments = stream_moments([caches / "clean.parquet", caches / "trig.parquet"], rows)
    whole = {name: np.concatenate([component_outputs(read_decomposition(caches / f"{f}.parquet", rows=rows))[name]
                                   for f in ("clean", "trig")]) for name in moments.sums}
    assert set(whole) == {f"L{L - 1}H{h}" for h in range(H)} | {f"L{l}_mlp" for l in range(L)}
    assert moments.n == 2 * len(rows)
    for name, outputs in whole.items():
        # a truncated span and the full one; m < rank: once a span's last direction is left, every text points
        # along it and the pick is a tie broken by rounding
        for rank, m in ((4, 3), (D, 5)):
            got = textspan_from_moments(moments.n, moments.sums[name], moments.grams[name], texts, m, rank)
            want = svd_textspan(outputs, texts, m, rank)
            assert [j for j, _ in got] == [j for j, _ in want], (name, rank)
            assert np.allclose([v for _, v in got], [v for _, v in want], rtol=1e-9, atol=1e-12), (name, rank)
    # the planted trigger direction (L1H2 += 2 e_3 on triggered images) carries the most variance of L1H2
    planted = textspan_from_moments(moments.n, moments.sums[f"L{L - 1}H2"], moments.grams[f"L{L - 1}H2"],
                                    np.eye(D), 1, D)
    assert planted[0][0] == 3 and planted[0][1] > 0.9  # var of a 0/2 shift on half the images = 1
