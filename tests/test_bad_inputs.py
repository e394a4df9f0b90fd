"""Bad input, whatever its bytes: one line naming the culprit (+ its fix), exit status 2, no traceback, nothing
written. Parameter files come from the corpus in tests/bad_inputs/; shards and artifacts are built here."""

import io
import json
import random
import shutil
import subprocess
import tarfile
import time

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import ROOT, copy_repo
from clipbackdoor.config import parse_params_text, validate_params
from clipbackdoor.errors import UserError

CORPUS = ROOT / "tests" / "bad_inputs"

# corpus file -> the culprit the message must name
PARAMS_CASES = {
    "params_not_text.yaml": "not UTF-8 text (byte 0x89 at offset 0)",
    "params_billion_laughs.yaml": "line 3: YAML alias *a",
    "params_nan_eps.yaml": "defend.eps = nan is not a finite number",
    "params_list_root.yaml": "expected a mapping of parameters at the top level, got list",
    "params_int_key.yaml": "key 1 under the top level is not a string",
    "params_duplicate_attack.yaml": "poison.attacks lists 'badnet' twice",
    "params_image_size.yaml": "data.image_size = 64 but model clipbackdoor-micro-vit-p8 takes 32-px images",
}


def cli(capsys, *args):
    """The CLI in this process (a subprocess would spend seconds importing torch): its exit status, stdout and
    stderr as a CompletedProcess."""
    from clipbackdoor.pipeline.cli import main

    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out, err)


def assert_refused(proc, culprit: str):
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert culprit in proc.stderr, proc.stderr
    assert "Traceback" not in out and "File \"" not in out, out
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "fix:" in proc.stderr  # one line with the culprit, then its fix


@pytest.mark.parametrize("name", sorted(PARAMS_CASES))
def test_validate_refuses_the_corpus(name, capsys):
    t0 = time.monotonic()
    assert_refused(cli(capsys, "validate", CORPUS / name), PARAMS_CASES[name])
    assert time.monotonic() - t0 < 30  # the alias bomb is refused while parsing, not after expanding


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return copy_repo(tmp_path_factory.mktemp("bad") / "repo")


@pytest.mark.parametrize("name", ["params_not_text.yaml", "params_billion_laughs.yaml", "params_nan_eps.yaml",
                                  "params_list_root.yaml", "params_image_size.yaml"])
def test_workflow_load_refuses_the_corpus_with_one_line(repo, name):
    shutil.copy(CORPUS / name, repo / "params.yaml")
    proc = subprocess.run(["snakemake", "-n", "--cores", "1"], cwd=repo, capture_output=True, text=True, timeout=300)
    assert_refused(proc, PARAMS_CASES[name])
    assert "params.yaml" in proc.stderr
    assert [p.name for p in (repo / "data").iterdir()] == ["README.md"]  # nothing written


def test_stage_params_json_refuses_non_finite_numbers(world_dirs, micro_model, tmp_path, capsys):
    params = '{"decompose":{"centering":"reference","normalize":true,"batch_size":NaN}}'
    proc = cli(capsys, "decompose", "--params", params, "--model", micro_model, "--eval-dir", world_dirs / "eval",
                   "--trigger", "none", "--out", tmp_path / "d.parquet")
    assert_refused(proc, "decompose.batch_size = nan is not a finite number")
    assert not list(tmp_path.iterdir())


# --- shards -------------------------------------------------------------------------------------------------------

def write_tar(path, members: list[tuple[str, bytes]]):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def png(seed=0, size=32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def sample(key, caption=b"a red circle", cls=0, image=None):
    return [(f"{key}.png", image or png()), (f"{key}.txt", caption), (f"{key}.json", json.dumps({"cls": cls}).encode())]


def decompose(capsys, shards, micro_model, tmp_path):
    params = '{"decompose":{"centering":"reference","normalize":true,"batch_size":4}}'
    return cli(capsys, "decompose", "--params", params, "--model", micro_model, "--eval-dir", shards, "--trigger",
               "none", "--out", tmp_path / "out" / "d.parquet")


@pytest.mark.parametrize("case,culprit", [
    ("caption_not_utf8", "sample 'k2': txt is not UTF-8 (byte 0xff at offset 2)"),
    ("duplicate_key_in_shard", "sample key 'k1' appears twice (k1.png)"),
    ("duplicate_key_across_shards", "sample key 'k1' also appears in an earlier shard"),
    ("json_not_json", "sample 'k2': json is not valid JSON"),
    ("corrupt_tar", "truncated or corrupt tar shard"),
])
def test_shard_reading_names_shard_and_key(case, culprit, micro_model, tmp_path, capsys):
    shards = tmp_path / "eval"
    a = shards / "shard-000000.tar"
    if case == "caption_not_utf8":
        write_tar(a, sample("k1") + sample("k2", caption=b"a \xff\xfe circle"))
    elif case == "duplicate_key_in_shard":
        write_tar(a, sample("k1") + sample("k1", caption=b"another caption"))
    elif case == "duplicate_key_across_shards":
        write_tar(a, sample("k1"))
        write_tar(shards / "shard-000001.tar", sample("k1", caption=b"another caption"))
    elif case == "json_not_json":
        write_tar(a, sample("k1") + [(n, b"{not json" if n.endswith(".json") else d) for n, d in sample("k2")])
    else:
        write_tar(a, sample("k1") + sample("k2"))
        a.write_bytes(b"\x1f\x8b" + a.read_bytes()[2:600])  # gzip magic on a truncated tar
    proc = decompose(capsys, shards, micro_model, tmp_path)
    assert_refused(proc, culprit)
    assert str(shards) in proc.stderr and not (tmp_path / "out").exists()


# --- artifacts ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content,culprit", [
    (b"\x80\x04\x95pickle-like bytes, not safetensors", "not a safetensors file (no valid header)"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": [1, 2, 3]x", "not a safetensors file (its header is not JSON)"),
    (None, "truncated safetensors file"),
])
def test_a_non_safetensors_model_file_is_refused(content, culprit, micro_model, world_dirs, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(micro_model, model)
    weights = model / "model.safetensors"
    weights.write_bytes(content if content is not None else weights.read_bytes()[:-1000])
    proc = decompose(capsys, world_dirs / "eval", model, tmp_path)
    assert_refused(proc, culprit)
    assert str(weights) in proc.stderr and not (tmp_path / "out").exists()


def test_unknown_pretrained_tag_fails_at_workflow_load(repo):
    params = yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text())
    params["model"]["pretrained"] = "opneai"
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run(["snakemake", "-n", "--cores", "1"], cwd=repo, capture_output=True, text=True, timeout=300)
    assert_refused(proc, "model.pretrained = 'opneai' is not a pretrained tag of ViT-B-32-quickgelu")
    assert "openai" in proc.stderr and "local open_clip checkpoint file" in proc.stderr


# --- property: the params loader never raises anything but UserError ------------------------------------------------

def random_yaml(rng: random.Random, depth=0):
    kinds = ["int", "float", "str", "bool", "null", "special"] + (["list", "dict"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.randint(-10**6, 10**6)
    if kind == "float":
        return rng.choice([rng.uniform(-1e3, 1e3), float("nan"), float("inf"), -float("inf"), 1e308 * 10])
    if kind == "str":
        return "".join(rng.choice("ab yz:-#&*!|>{}[],'\"\\\n\t") for _ in range(rng.randint(0, 12)))
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "special":
        return rng.choice([b"\x00\xff", (1, 2), {1, 2}, 3 + 4j])
    if kind == "list":
        return [random_yaml(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(["seed", "profile", "data", "model", 1, None, "x y"]): random_yaml(rng, depth + 1)
            for _ in range(rng.randint(0, 4))}


def test_params_loader_raises_only_user_errors_on_random_inputs():
    rng = random.Random(19)
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    for i in range(400):
        if i % 3 == 0:
            text = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 200))).decode("latin-1")
        elif i % 3 == 1:
            try:
                text = yaml.dump(random_yaml(rng), allow_unicode=True)  # full dump: python tags, sets, ...
            except yaml.YAMLError:
                continue
        else:  # a valid file with one random value swapped in
            tree = json.loads(json.dumps(base))
            section = rng.choice([k for k, v in tree.items() if isinstance(v, dict)])
            key = rng.choice(list(tree[section]))
            tree[section][key] = random_yaml(rng)
            try:
                text = yaml.dump(tree)
            except yaml.YAMLError:
                continue
        try:
            validate_params(parse_params_text(text, "random"), "random")
        except UserError as exc:
            assert "\n" not in exc.report("x").split("\n  fix:")[0]


@pytest.mark.parametrize("content,culprit", [(b"{\"name\": ", "model.json: not valid JSON"),
                                             (b"\xff\xfe{}", "model.json: not UTF-8 text")])
def test_a_broken_json_artifact_is_named(content, culprit, micro_model, world_dirs, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(micro_model, model)
    (model / "model.json").write_bytes(content)
    proc = decompose(capsys, world_dirs / "eval", model, tmp_path)
    assert_refused(proc, culprit)
    assert not (tmp_path / "out").exists()


def test_dvc_yaml_generation_passes_on_the_workflow_loads_line(repo, capsys):
    """dvc.yaml is generated through the Snakemake API with its output silenced: a refused params.yaml must still
    reach the user as our line, not as a bare exit status."""
    from clipbackdoor.pipeline.cli import main

    shutil.copy(CORPUS / "params_image_size.yaml", repo / "params.yaml")
    proc = subprocess.CompletedProcess([], main(["dvc-yaml", "--root", str(repo)]), *capsys.readouterr())
    assert_refused(proc, PARAMS_CASES["params_image_size.yaml"])


def test_embedded_target_case_is_forgiven_at_load_as_in_the_stage():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["poison"]["target"] = params["poison"]["target"].title()  # "Yellow Star"
    validate_params(params)


def test_command_line_config_still_overrides_params_yaml(repo):
    shutil.copy(ROOT / "configs" / "smoke.yaml", repo / "params.yaml")
    proc = subprocess.run(["snakemake", "-n", "--cores", "1", "--config", "seed=nan"], cwd=repo, capture_output=True,
                          text=True, timeout=300)
    assert_refused(proc, "seed = nan is not a finite number")  # --config reached the merged config
