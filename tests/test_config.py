import copy

import pytest
import yaml

from clipbackdoor.config import Params, load_params, load_yaml, validate_params
from clipbackdoor.errors import UserError
from conftest import ROOT, run_cli

BASE = yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.mark.parametrize("profile", ["params.yaml", "configs/smoke.yaml", "configs/paper.yaml",
                                     "configs/all_attacks.yaml", "configs/core.yaml",
                                     "configs/abd.yaml", "configs/rehearsal.yaml", "configs/b2.yaml",
                                     "configs/paper_b2.yaml"])
def test_profiles_validate_and_build(profile):
    params = load_params(ROOT / profile)
    assert isinstance(params, Params)
    assert params.pretrain.lr > 0


def test_embedded_variants_differ_from_params_yaml_only_where_they_say():
    """all_attacks.yaml: only the attack list; core.yaml: only without the baseline sections (and the rate sweep);
    abd.yaml: seed 002's attacks and arms, without detectors, analyses and the sweep."""
    every = yaml.safe_load((ROOT / "configs/all_attacks.yaml").read_text())
    from clipbackdoor.attacks import REGISTRY

    assert "results" not in BASE  # params.yaml: results/default/; each profile names its own folder
    assert every.pop("results") == "all_attacks"

    assert sorted(every["poison"].pop("attacks")) == sorted(REGISTRY)
    base = copy.deepcopy(BASE)
    base["poison"].pop("attacks")
    assert every == base
    core = yaml.safe_load((ROOT / "configs/core.yaml").read_text())
    assert core.pop("results") == "core"
    baselines = {k: BASE[k] for k in ("repair", "cleanclip", "roclip", "abd", "detect", "analysis", "sweep")}
    assert core == {k: v for k, v in BASE.items() if k not in baselines} and all(baselines.values())
    abd = yaml.safe_load((ROOT / "configs/abd.yaml").read_text())  # seed 002's attacks, every repair arm
    assert abd.pop("results") == "abd"
    assert abd["poison"].pop("attacks") == ["badnet", "blended", "badclip"]
    assert abd["repair"].pop("methods") == ["cleanclip", "roclip", "abd", "abd_img_only", "abd_eda_only",
                                            "finetune_clean", "uap"]
    base = copy.deepcopy(BASE)
    base["poison"].pop("attacks"), base["repair"].pop("methods")
    assert abd == {k: v for k, v in base.items() if k not in ("detect", "analysis", "sweep")}
    # configs/b2.yaml: params.yaml plus seed 000's section (with it, `all` and dvc.yaml include the B² branch)
    b2 = yaml.safe_load((ROOT / "configs/b2.yaml").read_text())
    assert b2.pop("results") == "b2"
    assert set(b2.pop("b2")) == {"backend", "t2i", "backdoor", "audit", "seed"} and b2 == BASE and "b2" not in BASE


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


# what the rehearsal may change (configs/rehearsal.yaml's header says why): where inputs live, the narrower
# ViT-B-32 geometry, the tiny Stable Diffusion's UNet sizes, EDA's WordNet (user-installed data), sizes and steps
REHEARSAL_PATHS = {"data.webdataset.urls", "data.eval_sets.imagenet.root", "data.eval_sets.caltech101.root",
                   "data.eval_sets.pets.root", "model.pretrained", "b2.stable_diffusion.path",
                   "b2.stable_diffusion.auditor_pretrained", "analysis.textspan_pool"}
# (fixed heads are named by layer: the rehearsal's 6-layer model has its last heads in L5, ViT-B-32 in L11)
REHEARSAL_MODEL = {"model.name", "b2.stable_diffusion.auditor", "cleanclip.synonyms", "abd.synonyms",
                   "defend.fixed_heads"}
SIZE_LEAVES = {"n_pairs", "shard_size", "batch_size", "steps", "warmup_steps", "ckpt_every", "bank_size",
               "fig2_images", "n_images", "strip_n", "mmd_images", "textspan_m", "textspan_rank", "n_poison",
               "n_clean", "eval_images", "n_prompts", "max_steps", "candidates", "rounds"}


def test_paper_b2_is_the_paper_profile_plus_seed_000s_section():
    paper = yaml.safe_load((ROOT / "configs/paper.yaml").read_text())
    with_b2 = yaml.safe_load((ROOT / "configs/paper_b2.yaml").read_text())
    assert (paper.pop("results"), with_b2.pop("results")) == ("paper", "paper_b2")  # each its results folder
    assert with_b2.pop("b2")["backend"] == "stable_diffusion" and with_b2 == paper and "b2" not in paper


def test_rehearsal_differs_from_paper_only_in_sizes_steps_and_paths():
    """The rehearsal covers the paper profile and its B² branch (configs/paper_b2.yaml)."""
    paper = _flat(yaml.safe_load((ROOT / "configs/paper_b2.yaml").read_text()))
    rehearsal = _flat(yaml.safe_load((ROOT / "configs/rehearsal.yaml").read_text()))
    assert paper.keys() == rehearsal.keys()
    changed = {k for k in paper if paper[k] != rehearsal[k]} - {"profile", "results"}
    allowed = REHEARSAL_PATHS | REHEARSAL_MODEL
    odd = {k for k in changed if k not in allowed and not k.startswith("b2.t2i.")
           and k.rpartition(".")[2] not in SIZE_LEAVES}
    assert not odd, f"rehearsal.yaml changes more than sizes, steps and paths: {sorted(odd)}"
    assert all(rehearsal[k].startswith("data/rehearsal/") for k in REHEARSAL_PATHS)
    for key in ("model.name", "b2.stable_diffusion.auditor"):
        assert rehearsal[key] == "clipbackdoor-narrow-vit-b32" and paper[key] == "ViT-B-32-quickgelu"
    assert rehearsal["b2.stable_diffusion.auditor_pretrained"] == rehearsal["model.pretrained"]
    assert rehearsal["b2.t2i.prediction_type"] == paper["b2.t2i.prediction_type"]  # sizes only under b2.t2i too
    assert rehearsal["b2.t2i.guidance"] == paper["b2.t2i.guidance"]


def test_a_repair_method_without_its_section_is_refused():
    params = copy.deepcopy(BASE)
    params["repair"]["methods"] = ["cleanclip", "abd_eda_only"]
    del params["abd"]
    with pytest.raises(UserError, match="repair.methods lists 'abd_eda_only' but there is no `abd` section"):
        validate_params(params)


def test_t2i_attention_at_full_resolution_is_refused():
    params = yaml.safe_load((ROOT / "configs/b2.yaml").read_text())
    params["b2"]["t2i"]["cross_attention_levels"] = len(params["b2"]["t2i"]["block_out_channels"])
    with pytest.raises(UserError, match="b2.t2i.cross_attention_levels = 3 would put attention at the full"):
        validate_params(params)
    params["b2"]["t2i"]["cross_attention_levels"] -= 1
    validate_params(params)


def test_paper_profile_matches_seed_001():
    p = load_params(ROOT / "configs/paper.yaml")
    assert (p.model.name, p.model.pretrained) == ("ViT-B-32-quickgelu", "openai")  # OpenAI's activation
    assert p.data.webdataset.n_pairs == 500_000 and p.data.image_size == 224
    assert set(p.data.eval_sets) == {"imagenet", "caltech101", "pets"}


def _mutated(path, value):
    cfg = copy.deepcopy(BASE)
    node = cfg
    for part in path[:-1]:
        node = node[part]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return cfg


@pytest.mark.parametrize("path,value,needle,fix", [
    (("pretrain", "lr"), -1e-3, "pretrain.lr", "allowed range"),
    (("pretrain", "steps"), "many", "pretrain.steps", "expected integer"),
    (("model", "name"), "ViT-Z-99", "model.name", "'clipbackdoor-tiny-vit-p8'"),
    (("pretrain", "learning_rate"), 0.1, "'learning_rate'", "allowed keys there"),
    (("data", "world", "colours"), ["red", "mauve"], "data.world.colours.1", "'purple'"),
    (("pretrain", "warmup_steps"), KeyError, "'warmup_steps' is a required property", "add the key"),
    (("data", "source"), "webdataset", "webdataset", None),
    (("data", "eval_sets"), {"world": {"kind": "imagefolder", "root": "/x", "classnames": "folders"}},
     "data.eval_sets.world.kind = 'imagefolder'", "embedded eval sets go with the embedded world"),
    # heads are named as everywhere else (L{layer}H{head} from 0), and must be heads the rule inspects
    (("defend", "fixed_heads"), [[1, 2, 3]], "defend.fixed_heads.0.", "expected string: a head named L{layer}H{head}"),
    (("defend", "fixed_heads"), [["L4H0"]], "defend.fixed_heads names L4H0", "e.g. L5H0"),
    (("defend", "fixed_heads"), [["L5H8"]], "L5H0..L5H7 in its last 1 layer(s)", "from 0"),
])
def test_bad_params_name_the_key_and_the_fix(path, value, needle, fix):
    with pytest.raises(UserError) as info:
        validate_params(_mutated(path, value))
    assert needle in info.value.problem
    if fix:
        assert fix in info.value.fix


def test_malformed_yaml_reports_position(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("seed: 0\npretrain: {steps: 3\n")
    with pytest.raises(UserError, match="not valid YAML") as info:
        load_yaml(bad)
    assert "line" in info.value.problem


def test_cli_validate_exit_code_and_single_message(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text(yaml.safe_dump(_mutated(("pretrain", "lr"), -1.0)))
    proc = run_cli("validate", bad, check=False)
    assert proc.returncode == 2
    assert "pretrain.lr" in proc.stderr and "Traceback" not in proc.stderr


def test_stage_params_json_is_validated_per_key():
    from clipbackdoor.pipeline.cli import parse_params

    assert parse_params('{"seed": 4, "data.image_size": 32}') == {"seed": 4, "data": {"image_size": 32}}
    with pytest.raises(UserError, match="data.image_size"):
        parse_params('{"data.image_size": 3}')
    with pytest.raises(UserError, match="unknown parameter"):
        parse_params('{"data.colour": 3}')


def test_stage_params_from_file_reference():
    from clipbackdoor.pipeline.cli import parse_params

    got = parse_params(f"@{ROOT / 'params.yaml'}:seed,data.world")
    assert got == {"seed": BASE["seed"], "data": {"world": BASE["data"]["world"]}}


def test_a_setting_without_effect_in_the_chosen_mode_gets_a_note():
    from clipbackdoor.config import moot_settings

    assert BASE["defend"]["threshold"] == "clean_quantile"
    assert moot_settings(BASE) == [
        "defend.eps (0.3) has no effect with defend.threshold: clean_quantile (each head's threshold is the "
        "defend.quantile of its clean-validation similarities); eps_sweep still runs"]
    fixed = copy.deepcopy(BASE)
    fixed["defend"]["threshold"] = "fixed"
    assert moot_settings(fixed)[0].startswith("defend.quantile (0.01) has no effect with defend.threshold: fixed")


def test_results_folder_is_named_after_the_parameter_file():
    from clipbackdoor.config import results_dir

    assert results_dir([]) == results_dir(["params.yaml"], BASE) == "results/default"
    assert results_dir(["/tmp/my_study.yaml"]) == "results/my_study"  # no `results` key: the file's name
    assert results_dir(["configs/paper.yaml", "/tmp/more.seeds.yaml"]) == "results/paper+more.seeds"
    abd = load_yaml(ROOT / "configs/abd.yaml")
    assert results_dir(["/tmp/copy_of_abd.yaml"], abd) == results_dir([], abd) == "results/abd"  # the key travels
    for bad in (["configs/shared.yaml"], ["my study.yaml"], ["-x.yaml"], ["configs/default.yaml"]):
        with pytest.raises(UserError) as err:
            results_dir(bad)
        assert "cannot name a results folder" in str(err.value) and "(or rename it)" in err.value.fix
