"""Bugs of the real-scale (paper) code paths that the embedded profile never reached, each pinned by a test:
per-evaluation-set targets, OpenAI's prompt templates as data, the preprocessing recorded with the weights, the
defender's clean subsets, the TEXTSPAN pool as a rule input, Stable Diffusion's preview and auditor, and
captions read without decoding images."""

import json
import subprocess
from types import SimpleNamespace

import pytest
import torch
import yaml

from conftest import ROOT, copy_repo
from clipbackdoor.config import eval_targets, stage_target, stage_view, validate_params
from clipbackdoor.errors import UserError
from clipbackdoor.pipeline.runs import parse_run, run_name


def load(profile: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / profile).read_text())


# --- per-evaluation-set targets (seed 001, Appendix B.1) ----------------------------------------------------------

def test_paper_profile_targets_one_class_per_eval_set():
    params = load("paper.yaml")
    assert eval_targets(params) == {"imagenet": "banana", "caltech101": "accordion", "pets": "Samoyed"}
    assert eval_targets(yaml.safe_load((ROOT / "params.yaml").read_text())) == {"world": "yellow star"}


def test_target_mapping_must_name_every_eval_set():
    params = load("paper.yaml")
    del params["poison"]["target"]["pets"]
    with pytest.raises(UserError, match="eval set 'pets' without a target"):
        validate_params(params, "p")
    params["poison"]["target"] |= {"pets": "Samoyed", "cifar": "cat"}
    with pytest.raises(UserError, match="eval set 'cifar' that is not in data.eval_sets"):
        validate_params(params, "p")


def test_run_names_carry_the_target_when_targets_differ():
    assert run_name("badnet", 0) == "badnet-s0" and parse_run("badnet-s0") == ("badnet", 0)
    assert run_name("label_consistent", 2, "Samoyed") == "label_consistent-samoyed-s2"
    assert parse_run("label_consistent-samoyed-s2") == ("label_consistent", 2)
    assert parse_run(run_name("badnet_random", 1, "golden retriever")) == ("badnet_random", 1)


def test_a_stage_reads_the_one_target_its_rule_passes():
    assert stage_target(stage_view({"poison": {"target": "banana"}})) == "banana"
    assert stage_target(stage_view({"poison": {"target": {"pets": "Samoyed"}}})) == "Samoyed"
    with pytest.raises(UserError, match="2 different targets"):
        stage_target(stage_view({"poison": {"target": {"pets": "Samoyed", "imagenet": "banana"}}}))


def test_target_case_is_forgiven_only_when_unambiguous():
    from clipbackdoor.attacks.poison import names_target
    from clipbackdoor.models.zeroshot import check_target

    assert check_target("Samoyed", ["pug", "samoyed"]) == 1
    with pytest.raises(UserError):
        check_target("Samoyed", ["pug", "samoyed", "SAMOYED"])
    # Label-Consistent / BadCLIP pick the pairs whose caption names the target: CC3M writes lower case
    assert names_target("a fluffy samoyed dog in the snow", "Samoyed")
    assert not names_target("a pug on a sofa", "Samoyed")


def test_two_spellings_of_one_target_are_refused():
    params = load("paper.yaml")
    params["poison"]["target"]["imagenet"] = "samoyed"  # ImageNet's class vs Pets' "Samoyed": one run name
    with pytest.raises(UserError, match="'samoyed' and 'Samoyed', which give one run name"):
        validate_params(params, "p")


def test_tables_follow_the_profiles_eval_set_order():
    import pandas as pd

    from clipbackdoor.analysis.tables import eval_set_order

    df = pd.DataFrame([{"attack": "clean", "eval_set": e} for e in ("caltech101", "imagenet", "pets")]
                      + [{"attack": "badnet", "eval_set": e} for e in ("imagenet", "caltech101", "pets")])
    assert eval_set_order(df) == ["imagenet", "caltech101", "pets"]  # not metrics.json's sorted keys


def test_tables_and_summary_name_the_target(tmp_path):
    from clipbackdoor.analysis.report import summary_frame, with_method
    from clipbackdoor.analysis.tables import table1, table4

    rows = [{"attack": "badnet", "repair": "-", "defense": "none", "variant": "-", "seed": 0, "eval_set": e,
             "target": t, "asr": 0.9, "cacc": 0.5} for e, t in (("imagenet", "banana"), ("pets", "Samoyed"))]
    df = with_method(summary_frame(rows))
    assert "`imagenet` (target `banana`)" in table1(df, "imagenet").markdown()
    assert "pets (target Samoyed) ASR" in table4(df, ["imagenet", "pets"]).markdown()


# --- OpenAI templates, preprocessing, clean subsets, captions --------------------------------------------------------

def test_openai_templates_are_format_strings():
    from clipbackdoor.models.zeroshot import templates_for

    templates = templates_for("openai_imagenet", [])
    assert len(templates) == 80 and templates[0] == "a bad photo of a {}."
    json.dumps(templates)  # classes.json stores them; open_clip ships lambdas
    assert templates[1].format("banana") == "a photo of many banana."


def test_model_artifact_keeps_its_preprocessing(tmp_path):
    from clipbackdoor.models.artifact import create, load_artifact, save_artifact

    loaded = create("clipbackdoor-micro-vit-p8")
    loaded.mean, loaded.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)  # e.g. a pretrained tag's statistics
    save_artifact(loaded, tmp_path / "m")
    again = load_artifact(tmp_path / "m")
    assert again.mean == (0.5, 0.5, 0.5) and again.std == (0.25, 0.25, 0.25)


def test_clean_subset_is_the_first_n_pairs(world_dirs, micro_model):
    from clipbackdoor.data.shards import load_split
    from clipbackdoor.training.train import load_training_pairs

    split = load_split(world_dirs / "train" / "finetune")
    _, first, tokens = load_training_pairs(micro_model, world_dirs / "train" / "finetune", "cpu", n_pairs=5)
    assert first["keys"] == split["keys"][:5] and len(tokens) == 5


def test_profiles_give_cleanclip_and_abd_their_clean_subsets():
    paper = load("paper.yaml")
    assert paper["cleanclip"]["n_pairs"] == 100_000 and paper["abd"]["n_pairs"] == 250_000
    smk = (ROOT / "rules" / "abd.smk").read_text()
    assert smk.count('optional_keys("abd.n_pairs")') == 2  # the generator and the fine-tune both read it


def test_captions_are_read_without_decoding_images(world_dirs, monkeypatch):
    from clipbackdoor.data import shards

    expected = shards.load_split(world_dirs / "train" / "finetune")["captions"]
    monkeypatch.setattr(shards, "_decode_image", lambda *a: pytest.fail("an image was decoded"))
    assert shards.read_captions(world_dirs / "train" / "finetune") == expected


# --- the TEXTSPAN pool is a rule input ----------------------------------------------------------------------------

def test_missing_local_inputs_stop_the_dry_run(tmp_path):
    """Local files named by parameters are rule inputs: the checkpoint file, then the TEXTSPAN pool."""
    from clipbackdoor.pipeline import rehearsal

    repo = copy_repo(tmp_path / "repo")

    def dry_run():
        proc = subprocess.run(["snakemake", "-n", "--cores", "1", "--configfile", "configs/rehearsal.yaml"],
                              cwd=repo, capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0
        return proc.stdout + proc.stderr

    assert "data/rehearsal/clip/clipbackdoor-narrow-vit-b32-random.safetensors" in dry_run()
    rehearsal.main(["--out", str(repo / "data" / "rehearsal"), "--parts", "clip"])
    assert "data/rehearsal/textspan/image_descriptions.txt" in dry_run()


# --- Stable Diffusion: the preview the rule declares, the auditor the profile names -------------------------------

@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from clipbackdoor.pipeline import rehearsal

    out = tmp_path_factory.mktemp("sd")
    rehearsal.main(["--out", str(out), "--parts", "stable-diffusion,clip", "--clip-model", "clipbackdoor-micro-vit-p8"])
    return out


def test_stable_diffusion_pretrain_writes_its_preview(tiny_sd, tmp_path):
    from clipbackdoor.config import T2IConfig
    from clipbackdoor.t2i.model import run_t2i_pretrain

    sd = SimpleNamespace(path=str(tiny_sd / "stable-diffusion"))
    cfg = T2IConfig(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8, cross_attention_levels=1,
                    prediction_type="epsilon", snr_gamma=None, train_timesteps=1000, steps=1, batch_size=1, lr=1e-5,
                    uncond_prob=0.1, sample_steps=2, guidance=7.5, eval_per_class=1)
    run_t2i_pretrain(None, None, tmp_path / "t2i", cfg, ["red", "blue"], ["car", "dog"], 0, tmp_path / "p.png",
                     backend="stable_diffusion", sd=sd)
    assert (tmp_path / "p.png").stat().st_size > 0 and (tmp_path / "t2i" / "diffusion_pytorch_model.safetensors").exists()


def test_stable_diffusion_audit_uses_the_profiles_auditor(tiny_sd, micro_model):
    from clipbackdoor.t2i.model import load_auditor

    ckpt = tiny_sd / "clip" / "clipbackdoor-micro-vit-p8-random.safetensors"
    sd = SimpleNamespace(auditor="clipbackdoor-micro-vit-p8", auditor_pretrained=str(ckpt))
    auditor = load_auditor(micro_model, sd, "cpu")
    from safetensors.torch import load_file

    weights = load_file(str(ckpt))
    assert torch.equal(auditor.model.state_dict()["text_projection"], weights["text_projection"])
    assert load_auditor(micro_model, None, "cpu").name == "clipbackdoor-micro-vit-p8"  # embedded: the clean CLIP


def test_cleanclip_trains_on_its_clean_subset_only(world_dirs, micro_model, tmp_path):
    from clipbackdoor.defenses.cleanclip import run_cleanclip
    from clipbackdoor.config import CleanCLIPConfig, OptimConfig

    optim = OptimConfig(steps=1, batch_size=4, lr=1e-4, weight_decay=0.1, warmup_steps=0, betas=(0.9, 0.98), eps=1e-6)
    cfg = CleanCLIPConfig(optim=optim, inmodal_weight=1.0, crossmodal_weight=1.0, eda_alpha=0.1, synonyms="builtin",
                          augment="none", n_pairs=8)
    metrics = run_cleanclip(micro_model, world_dirs / "train" / "finetune", tmp_path / "m", cfg, seed=0)
    assert metrics["n_pairs"] == 8
