"""Artifacts DVC can trust: byte-identical rewrites, content changed after writing refused by its reader, the
stage graph recorded in dvc.yaml, and a failing stage's line on the terminal as well as in its log."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.numpy import load_file

from clipbackdoor.decomposition.cache import read_decomposition, write_decomposition
from clipbackdoor.decomposition.decompose import Decomposition
from clipbackdoor.pipeline.dvcgen import SHAPE_PREFIX, check_graph_shape, graph_shape
from clipbackdoor.errors import UserError
from clipbackdoor.io import load_safetensors, read_parquet, save_safetensors, write_parquet
from conftest import ROOT, copy_repo, run_cli


def flip_byte(path, offset):
    """Change one byte in place and give the file back its mtime: what DVC's and Snakemake's checks miss."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_safetensors_bytes_depend_only_on_values(tmp_path):
    """The safetensors library writes its metadata map in hash order: two identical prototype runs gave two
    files (two DVC hashes). Ours sorts the header; the file stays a valid safetensors file."""
    arrays = {"heads": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "val_index": np.arange(5)}
    meta = {f"key{i}": str(i) for i in range(12)}
    save_safetensors(tmp_path / "a.safetensors", arrays, meta)
    save_safetensors(tmp_path / "b.safetensors", dict(reversed(arrays.items())), dict(reversed(meta.items())))
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    loaded = load_file(str(tmp_path / "a.safetensors"))  # the library reads it
    assert np.array_equal(loaded["heads"], arrays["heads"])
    tensors, got = load_safetensors(tmp_path / "a.safetensors", "np", with_metadata=True)
    assert {k: got[k] for k in meta} == meta and len(got["content_sha256"]) == 64
    t = {"w": torch.randn(3, 5, dtype=torch.float32), "b": torch.zeros(2, dtype=torch.bfloat16)}
    save_safetensors(tmp_path / "t.safetensors", t, {"m": "1"})
    back = load_safetensors(tmp_path / "t.safetensors")
    assert torch.equal(back["w"], t["w"]) and back["b"].dtype == torch.bfloat16


def test_safetensors_changed_after_writing_is_refused(tmp_path):
    path = tmp_path / "p.safetensors"
    save_safetensors(path, {"x": np.linspace(0, 1, 1000, dtype=np.float32)}, {"target": "banana"})
    good = path.read_bytes()
    flip_byte(path, path.stat().st_size - 100)  # a value
    with pytest.raises(UserError, match="p.safetensors: content changed after it was written"):
        load_safetensors(path, "np")
    path.write_bytes(good.replace(b'"banana"', b'"bandit"'))  # the metadata a stage reads (same length)
    with pytest.raises(UserError, match="content changed after it was written"):
        load_safetensors(path, "np")


def test_safetensors_writer_takes_mixed_frameworks_and_refuses_non_string_metadata(tmp_path):
    save_safetensors(tmp_path / "m.safetensors", {"a": np.ones(3, np.int64), "b": torch.ones(2, 2, dtype=torch.bool),
                                                  "c": torch.tensor(1.5), "d": torch.empty(0, 4)})
    back = load_safetensors(tmp_path / "m.safetensors")
    assert back["a"].tolist() == [1, 1, 1] and back["b"].all() and back["c"].item() == 1.5
    assert back["d"].shape == (0, 4)
    save_safetensors(tmp_path / "z.safetensors", {"scalar": np.float32(2.5), "zero_d": np.array(7, np.int64),
                                                  "t": np.arange(6, dtype=">f4").reshape(2, 3).T})
    back = load_safetensors(tmp_path / "z.safetensors", "np")
    assert back["scalar"].shape == () and back["zero_d"].shape == () and back["zero_d"] == 7
    assert np.array_equal(back["t"], np.arange(6, dtype=np.float32).reshape(2, 3).T)
    with pytest.raises(TypeError, match="str to str"):
        save_safetensors(tmp_path / "n.safetensors", {"a": np.ones(1)}, {"steps": 3})


@pytest.fixture
def decomposition(tmp_path):
    g = torch.Generator().manual_seed(0)
    n, layers, heads, dim = 64, 2, 3, 16
    d = Decomposition(embed=torch.randn(n, dim, generator=g), heads=torch.randn(n, layers, heads, dim, generator=g),
                      mlps=torch.randn(n, layers, dim, generator=g), bias=torch.randn(n, dim, generator=g),
                      embedding=torch.randn(n, dim, generator=g), norm=torch.rand(n, generator=g))
    path = tmp_path / "d.parquet"
    write_decomposition(path, [f"k{i}" for i in range(n)], np.arange(n) % 5, False, d, {"model": "m"})
    return path


def test_a_flipped_fp16_value_in_a_cached_decomposition_is_refused(decomposition, tmp_path):
    path = decomposition
    before = read_decomposition(path)
    raw = path.read_bytes()
    # one fp16 value of head L1H2 (its bytes are stored raw, so they can be found in the file)
    needle = np.ascontiguousarray(before.heads[10, 1, 2].astype(np.float16)).tobytes()
    offset = raw.index(needle)
    flip_byte(path, offset + 3)
    with pytest.raises(UserError, match=r"d.parquet: column 'L1H2' changed after the file was written"):
        read_decomposition(path)
    # a reader of other columns (the first layer's heads only) is not concerned by the change
    assert np.array_equal(read_decomposition(path, layers=[0], with_mlps=False).heads[:, 0], before.heads[:, 0])
    # through a stage: one line, exit status 2, nothing written
    out = tmp_path / "protos.safetensors"
    proc = run_cli("prototypes", "--params", json.dumps({"prototypes.val_fraction": 0.2, "prototypes.split_seed": 0}),
                   "--decomp", path, "--out", out, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "column 'L1H2' changed after the file was written" in proc.stderr and not out.exists()


def test_parquet_column_hashes_follow_the_values_not_the_chunking(tmp_path):
    table = pa.table({"key": ["a", "b", "c"], "score": pa.array([0.5, float("nan"), 2.0], pa.float32()),
                      "label": pa.array([1, None, 3], pa.int32())})
    write_parquet(tmp_path / "one.parquet", table)
    write_parquet(tmp_path / "rg.parquet", table, row_group_size=1)  # three row groups, three chunks on read
    for name in ("one.parquet", "rg.parquet"):
        back = read_parquet(tmp_path / name)
        assert back.column("key").to_pylist() == ["a", "b", "c"] and back.column("label").null_count == 1
    assert read_parquet(tmp_path / "rg.parquet", ["score"]).column_names == ["score"]
    # nested types come back under other field names (list<item> -> list<element>): the values are what count
    nested = pa.table({"scores": pa.array([[0.1, 0.2], [], None], pa.list_(pa.float64()))})
    write_parquet(tmp_path / "nested.parquet", nested.replace_schema_metadata({"target": "3"}))
    assert read_parquet(tmp_path / "nested.parquet").column("scores").to_pylist() == [[0.1, 0.2], [], None]
    # the metadata a reader trusts (report.py reads `target` from defend's tables) is covered too
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "nested.parquet")
    meta = dict(table.schema.metadata)
    meta[b"target"] = b"4"
    pq.write_table(table.replace_schema_metadata(meta), tmp_path / "edited.parquet")
    with pytest.raises(UserError, match="edited.parquet: its metadata changed after the file was written"):
        read_parquet(tmp_path / "edited.parquet")


def test_graph_shape_edits_are_refused_under_dvc(tmp_path):
    params = {"data": {"source": "embedded", "eval_sets": {"world": {"kind": "embedded"}}},
              "poison": {"attacks": ["badnet"], "seeds": [0], "target": "t"}, "defend": {"eps": 0.1},
              "detect": {"detectors": ["strip", "teco"]}, "attacks": {"label_consistent": {"adv_eps": 0.03}}}
    dvc_yaml = tmp_path / "dvc.yaml"
    dvc_yaml.write_text("# GENERATED\n" + SHAPE_PREFIX + json.dumps(graph_shape(params)) + "\nstages: {}\n")
    assert "lc_adversarial" not in graph_shape(params)  # label_consistent does not run: its setting shapes nothing
    # edits that keep the stages: an ordinary value, one target for all sets, fewer detectors, the LC budget
    for edit in ({"defend": {"eps": 0.3}}, {"poison": {**params["poison"], "target": "u"}},
                 {"detect": {"detectors": ["strip"]}}, {"attacks": {"label_consistent": {"adv_eps": 0.0}}}):
        check_graph_shape({**params, **edit}, dvc_yaml)
    more = {**params, "poison": {**params["poison"], "attacks": ["badnet", "blended"]}}
    with pytest.raises(UserError, match=r"params.yaml's runs \(badnet-s0, blended-s0\) is not what dvc.yaml's stages "
                                        r"were generated for \(badnet-s0\)"):
        check_graph_shape(more, dvc_yaml)
    with pytest.raises(UserError, match="sections"):
        check_graph_shape({**params, "b2": {}}, dvc_yaml)
    with pytest.raises(UserError, match="detectors"):
        check_graph_shape({**params, "detect": {"detectors": []}}, dvc_yaml)


def test_the_committed_dvc_yaml_records_its_stage_graph_and_stages_check_it(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    text = (repo / "params.yaml").read_text()
    assert "blended" in text
    (repo / "params.yaml").write_text(text.replace("attacks: [badnet, blended, sig, badclip]", "attacks: [badnet]"))
    # a dvc.yaml command (`--params @params.yaml:...`) after `dvc exp run -S poison.attacks=[badnet]`
    proc = run_cli("prototypes", "--params", "@params.yaml:prototypes", "--decomp", "x.parquet", "--out", "p.st",
                   cwd=repo, check=False)
    assert proc.returncode == 2
    assert "params.yaml's runs (badnet-s0) is not what dvc.yaml's stages were generated for" in proc.stderr
    assert "python -m clipbackdoor dvc-yaml" in proc.stderr


def test_a_failing_stage_names_the_culprit_on_the_terminal_and_in_its_log(tmp_path):
    """Under Snakemake the terminal shows only "Error in rule X"; the stage's own line must be there too."""
    log = tmp_path / "logs" / "prototypes.log"
    proc = run_cli("prototypes", "--params", json.dumps({"prototypes.val_fraction": 0.2, "prototypes.split_seed": 0}),
                   "--decomp", tmp_path / "missing.parquet", "--out", tmp_path / "p.safetensors", "--log", log,
                   check=False)
    assert proc.returncode == 2
    line = "missing.parquet: decomposition cache not found"
    assert line in log.read_text() and line in proc.stderr and f"(log: {log})" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_b2_target_without_a_b2_section_is_one_line(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    proc = subprocess.run([sys.executable, "-m", "snakemake", "b2", "-n", "--cores", "1"], cwd=repo,
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "the b2 target needs parameters with a `b2` section" in proc.stderr
    assert "--configfile configs/b2.yaml" in proc.stderr and "Traceback" not in proc.stderr


def test_all_holds_the_b2_branch_exactly_when_the_parameters_have_it():
    dvc_yaml = (ROOT / "dvc.yaml").read_text()
    assert "t2i_pretrain" not in dvc_yaml  # params.yaml has no `b2` section: neither `all` nor dvc.yaml has B²
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", "configs/b2.yaml",
                           "--forceall"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert all(f"rule {r}:" in proc.stdout for r in ("t2i_pretrain", "t2i_backdoor", "b2_audit", "summary"))


def test_under_snakemake_the_failing_stages_line_reaches_the_terminal(tmp_path):
    """Snakemake prints "Error in rule prototypes ... log: ..."; the stage's own reason must be there too."""
    repo = copy_repo(tmp_path / "repo")
    broken = repo / "data/decomp/clean/world/none.parquet"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"PAR1 this is not a decomposition PAR1")
    proc = subprocess.run([sys.executable, "-m", "snakemake", "data/prototypes/clean/world.safetensors", "--cores", "1",
                           "--allowed-rules", "prototypes"], cwd=repo, capture_output=True, text=True)
    assert proc.returncode != 0 and "Error in rule prototypes" in proc.stdout + proc.stderr
    assert "clipbackdoor prototypes: error: data/decomp/clean/world/none.parquet: not a readable Parquet file" in proc.stderr
    assert "(log: data/logs/prototypes_clean_world.log)" in proc.stderr
    assert not (repo / "data/prototypes/clean/world.safetensors").exists()
